"""Launch configurations of the Triton kernels: a static table, no autotuning at call time.

Autotuning inside forward would benchmark (and synchronise) on the first call of every shape, which
breaks CUDA-graph capture and makes torch.compile traces depend on timing. Instead `pick` reads this
table, keyed by loss family, number of classes C and dtype group; bench/sweep_triton.py measures a
grid of configurations on a GPU and prints replacement rows for TABLE.

Where the rows come from: compiling the kernels for sm_90 on a CPU machine (triton.compile + ptxas -v,
no GPU needed) and reading register counts, spills and vector widths:
- A program handles rows * block elements per tile; 8-16 values per thread keep each thread on
  16-byte vector accesses (4 fp32 or 8 bf16/fp16 values) with a couple in flight, at 40-80 registers,
  i.e. 2-4 resident blocks per SM. 16 values per thread in the sigmoid kernel cost ~150 registers.
- Small C: several rows per program, so a program still moves a useful amount of data.
- Sigmoid family: one pass, so a 2048-column tile looped over the row is enough.
- Softmax: when the whole row fits one tile the logits are read once (the row stays in registers):
  8192 fp32 columns at 16 warps (64 registers, no spill), 16384 half columns at 32 warps (54
  registers); 16384 fp32 columns spill. Above that, two passes over 4096-column tiles.

What a GPU measured: bench/results/gpu-h200-2026-11-27/sweep_triton.log and .json (H200, triton 3.6)
time these rows (the JSON's "table" entries are exactly this TABLE's configurations) next to a grid of
alternatives, forward + backward kernels, both strategies. The sweep stopped at its 50 s budget
("complete": false: no alternative was timed at (256, 262144) or (67108, 1000)), so the rows it prints
cover only part of the table. Among the configurations it did time:
- sigmoid_focal: the table row (block 2048, 1 row, 8 warps) was the fastest at every shape.
- softmax_ce: the table rows were slower than the best alternative at every shape, e.g. (8192, 8142)
  fp32 fused / recompute 0.5052 / 0.4997 ms against 0.3837 / 0.2775 ms for block 2048, 1 row, 4 warps,
  and bf16 0.7000 / 0.6736 ms against 0.4728 / 0.2556 ms for the same configuration.
To change rows, rerun bench/sweep_triton.py on a GPU with a budget that completes the grid and paste the
rows it prints.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from ..losses import FAMILIES as _REGISTERED


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    block: int       # columns per tile (power of two); the launcher uses min(block, next_pow2(C))
    rows: int        # rows per program (power of two)
    num_warps: int
    num_stages: int = 1

    def __post_init__(self):
        for name in ("block", "rows"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"LaunchConfig.{name} must be a power of two, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"LaunchConfig.num_warps must be a power of two up to 32, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"LaunchConfig.num_stages must be >= 1, got {self.num_stages}")


FAMILIES = tuple(family.name for family in _REGISTERED)
DTYPE_GROUPS = ("fp32", "half")  # half: float16 and bfloat16 (same bytes per element)

# TABLE[family][dtype group]: rows (c_max, config), C ascending; the first row with C <= c_max applies,
# the last row (c_max None) covers everything larger. A family not in TABLE uses DEFAULT_TABLE (below).
# Small C: several rows per program, so that a program still moves a useful amount of data.
_SMALL_C = [
    (64, LaunchConfig(block=64, rows=32, num_warps=4)),
    (512, LaunchConfig(block=512, rows=4, num_warps=4)),
]
# One pass streaming the row in 2048-column tiles, one configuration for both dtype groups: the sigmoid
# family's rows, and the default of a family that TABLE does not list.
_STREAMING_ROWS = _SMALL_C + [(None, LaunchConfig(block=2048, rows=1, num_warps=8))]
# The table of a family without its own TABLE entry (a new family of the registry, until
# bench/sweep_triton.py has measured it): the streaming rows. The kernels of kernels.py loop over a row in
# BLOCK-wide tiles, so they run correctly at any of these rows: a default that works, not a tuned one.
DEFAULT_TABLE = {"fp32": _STREAMING_ROWS, "half": _STREAMING_ROWS}
TABLE = {
    "sigmoid_focal": DEFAULT_TABLE,
    "softmax_ce": {
        "fp32": _SMALL_C + [
            (2048, LaunchConfig(block=2048, rows=1, num_warps=8)),
            (8192, LaunchConfig(block=8192, rows=1, num_warps=16)),
            (None, LaunchConfig(block=4096, rows=1, num_warps=16)),
        ],
        "half": _SMALL_C + [
            (2048, LaunchConfig(block=2048, rows=1, num_warps=8)),
            (16384, LaunchConfig(block=16384, rows=1, num_warps=32)),
            (None, LaunchConfig(block=4096, rows=1, num_warps=16)),
        ],
    },
}

# Set by `override`: family -> LaunchConfig applied to every C and dtype of that family.
_OVERRIDES: dict[str, LaunchConfig] = {}


def dtype_group(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def pick(family: str, num_classes: int, dtype: torch.dtype) -> LaunchConfig:
    """The configuration for one call (an override if one is active, else the table row)."""
    if family in _OVERRIDES:
        return _OVERRIDES[family]
    for c_max, config in TABLE.get(family, DEFAULT_TABLE)[dtype_group(dtype)]:
        if c_max is None or num_classes <= c_max:
            return config
    raise AssertionError(f"the table of {family!r} has no catch-all row (c_max None)")


@contextlib.contextmanager
def override(config: LaunchConfig, families=FAMILIES):
    """Use `config` for every call of these families inside the block (the sweep and the tests do).

    Read at call time on the host, so under torch.compile it applies to what is traced inside the block.
    """
    families = (families,) if isinstance(families, str) else tuple(families)
    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    saved = dict(_OVERRIDES)
    _OVERRIDES.update({family: config for family in families})
    try:
        yield config
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)
