"""Named sets of shapes: (N, C) pairs with their default dtypes, losses and repeat counts."""
from __future__ import annotations

import torch

# Fixed N * C = 2^24 elements for the class sweep (64 MiB of fp32 logits: above any L2, like a real batch).
SWEEP_ELEMENTS = 2**24
SWEEP_CLASSES = (1000, 2048, 4096, 8142, 16384, 32768, 65536, 131072, 262144)

PRESETS = {
    # CI: small, CPU, seconds; compiling (tens of seconds a shape on a small CPU) is left out. One thread:
    # these shapes gain nothing from more, and OpenMP barriers on a busy CI machine cost milliseconds.
    "quick": {"shapes": [(64, 1000), (32, 4099)], "dtypes": [torch.float32], "exclude": ("compiled",),
              "repeats": 3, "threads": 1},
    # iNaturalist 2018: 8,142 classes, a larger batch and batch 1024 as in the paper. The larger batch first:
    # it is the speed targets' shape (targets.py), so a run that --budget-s cuts short has measured it.
    "inat": {"shapes": [(8192, 8142), (1024, 8142)], "dtypes": [torch.float32, torch.bfloat16], "exclude": (),
             "repeats": None, "threads": None},
    "sweep": {"shapes": [(max(SWEEP_ELEMENTS // c, 1), c) for c in SWEEP_CLASSES], "dtypes": [torch.float32],
              "exclude": (), "repeats": None, "threads": None},
    # Dense (N, C) targets against class indices at the iNaturalist shape, interleaved rounds (dense.py).
    "dense": {"shapes": [(1024, 8142)], "dtypes": [torch.float32], "exclude": (), "repeats": None,
              "threads": None, "rounds": 15},
    # Host overhead per forward + backward at tiny shapes, one thread, interleaved rounds (overhead.py).
    "overhead": {"shapes": [(8, 16), (64, 1000)], "dtypes": [torch.float32], "exclude": (), "repeats": None,
                 "threads": 1, "rounds": 15, "inner": 200},
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def default_repeats(device: torch.device) -> tuple[int, int]:
    """(repeats, warm-up runs): GPU runs are sub-millisecond, CPU runs up to seconds."""
    return (30, 5) if device.type == "cuda" else (5, 1)
