"""How many programs a persistent launch starts: programs_per_sm times the device's SM count, never more
than there are row blocks; for a kernel that reads its rows twice, also no more than keep the rows in
flight within a share of L2 (program_cap). The device facts (SMs, L2 bytes) are read once per device and
cached: device properties, no sync.

Under TRITON_INTERPRET=1 (CPU tensors) the "device" has INTERPRETER_SMS and INTERPRETER_L2_BYTES: few
programs, so each one walks several rows, the path a GPU takes at large N; and an L2 small enough that the
tests' streamed softmax rows (fp32, C just above 8192: 3 rows fit half of it) meet the re-read cap.
"""
import functools

import torch

INTERPRETER_SMS = 2
INTERPRETER_L2_BYTES = 256 * 1024
# The share of L2 that the rows in flight of a two-read kernel may fill: the other half is left to
# everything else the GPU caches meanwhile (the gradient's stores, the next rows' first reads), so that
# the second read of a row still finds it (the CUDA launcher's stream_grid keeps the same share).
REREAD_L2_DIVISOR = 2


@functools.cache
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_L2_BYTES
    return torch.cuda.get_device_properties(device).L2_cache_size


def program_cap(programs_per_sm: int, sms: int, l2: int, reread_bytes_per_program: int = 0) -> int:
    """The most programs of a persistent grid: programs_per_sm per SM; when every program holds
    reread_bytes_per_program (> 0) of rows between their two reads, also no more than fit in
    l2 / REREAD_L2_DIVISOR, provided one program per SM fits. When it does not, the second read comes
    from DRAM whatever the grid, and fewer programs would only hold fewer bytes in flight: the grid stays."""
    cap = programs_per_sm * sms
    if reread_bytes_per_program:
        fit = l2 // REREAD_L2_DIVISOR // reread_bytes_per_program
        if fit >= sms:
            cap = min(cap, fit)
    return cap


def programs(device: torch.device, blocks, programs_per_sm: int, reread_bytes_per_program: int = 0):
    """min(blocks, program_cap) for this device. blocks is a SymInt under torch.compile (sym_min keeps it
    symbolic); the cap depends on the device and the plan only."""
    cap = program_cap(programs_per_sm, sm_count(device), l2_bytes(device), reread_bytes_per_program)
    if isinstance(blocks, int):
        return blocks if blocks < cap else cap
    return torch.sym_min(blocks, cap)
