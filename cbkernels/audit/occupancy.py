"""Resident CTAs per SM from registers, threads and shared memory (the CUDA occupancy calculator's rules).

Per-SM limits by compute capability, from NVIDIA's CUDA C++ Programming Guide (table "Technical
Specifications per Compute Capability") and its occupancy calculator:
- sm_90 (H100, H200): 65536 32-bit registers, at most 255 per thread; 2048 resident threads (64 warps);
  32 resident CTAs; 228 KB shared memory per SM, of which the runtime reserves 1 KB per CTA.
- Registers are allocated per warp in units of 256 (a thread's count rounded up to a multiple of 8).
- Shared memory is allocated in units of 128 bytes.
"""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class SmLimits:
    registers: int
    max_threads: int
    max_ctas: int
    shared_bytes: int
    reserved_shared_per_cta: int
    register_unit: int       # registers allocated per warp in multiples of this
    shared_unit: int


LIMITS = {
    90: SmLimits(registers=65536, max_threads=2048, max_ctas=32, shared_bytes=228 * 1024,
                 reserved_shared_per_cta=1024, register_unit=256, shared_unit=128),
}


def limits(arch: int) -> SmLimits:
    if arch not in LIMITS:
        raise ValueError(f"no occupancy table for sm_{arch}; known: {', '.join(f'sm_{a}' for a in LIMITS)}")
    return LIMITS[arch]


def ctas_per_sm(arch: int, registers: int, threads_per_cta: int, shared_bytes: int) -> int:
    """Resident CTAs per SM: the smallest of the register, thread, CTA and shared-memory limits."""
    sm = limits(arch)
    warps = math.ceil(threads_per_cta / 32)
    per_warp = math.ceil(max(registers, 1) * 32 / sm.register_unit) * sm.register_unit
    by_registers = (sm.registers // per_warp) // warps
    by_threads = sm.max_threads // (warps * 32)
    smem = math.ceil(shared_bytes / sm.shared_unit) * sm.shared_unit + sm.reserved_shared_per_cta
    by_shared = sm.shared_bytes // smem
    return min(by_registers, by_threads, sm.max_ctas, by_shared)
