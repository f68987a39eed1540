"""How many programs a persistent launch starts: programs_per_sm times the device's SM count (read once
per device, cached: a device property, no sync), never more than there are row blocks.

Under TRITON_INTERPRET=1 (CPU tensors) the "device" has INTERPRETER_SMS: few programs, so each one walks
several rows, the path a GPU takes at large N.
"""
import functools

import torch

INTERPRETER_SMS = 2


@functools.cache
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def programs(device: torch.device, blocks, programs_per_sm: int):
    """min(blocks, programs_per_sm * SMs); blocks is a SymInt under torch.compile (sym_min keeps it symbolic)."""
    cap = programs_per_sm * sm_count(device)
    if isinstance(blocks, int):
        return blocks if blocks < cap else cap
    return torch.sym_min(blocks, cap)
