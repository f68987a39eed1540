"""The demo's speed table: loss + gradient at iNaturalist 2018 scale, from the benchmark package."""
from __future__ import annotations

import torch

INAT_SHAPE = (1024, 8142)  # batch 1024, 8,142 classes (iNaturalist 2018, the paper's largest run)


def speed_markdown(device, repeats: int, providers=None) -> str:
    from ..bench import format_markdown, speed_table

    rows = speed_table(shape=INAT_SHAPE, dtype=torch.float32, device=str(device),
                       losses=("softmax", "sigmoid", "focal"), repeats=repeats, providers=providers)
    return format_markdown(rows)
