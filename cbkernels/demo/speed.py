"""The demo's speed table: loss + gradient at iNaturalist 2018 scale, from the benchmark package.

Which providers run is a matter of time on a small CPU: every cbkernels backend (each backward strategy)
and naive autograd always; torch.compile of the naive loss unless --quick (compiling takes tens of
seconds per loss on two cores); the other peers (F.cross_entropy, a torchvision-style focal loss,
liger-kernel) with --full.
"""
from __future__ import annotations

import torch

from .. import losses

INAT_SHAPE = (1024, 8142)  # batch 1024, 8,142 classes (iNaturalist 2018, the paper's largest run)


def provider_names(device, compiled: bool, peers: bool) -> list[str] | None:
    """Names to pass to speed_table (None: every provider)."""
    from ..bench.providers import COMPILED, NAIVE, providers_for

    if peers:
        return None
    names = {p.name for spec in losses.LOSSES for p in providers_for(spec, device) if p.kind == "cbkernels"}
    names.add(NAIVE)
    if compiled:
        names.add(COMPILED)
    return sorted(names)


def speed_markdown(device, repeats: int, compiled: bool = True, peers: bool = False) -> str:
    from ..bench import format_markdown, speed_table

    device = torch.device(device)
    rows = speed_table(shape=INAT_SHAPE, dtype=torch.float32, device=str(device), losses=losses.LOSS_TYPES,
                       repeats=repeats, providers=provider_names(device, compiled, peers))
    return format_markdown(rows)
