"""Timers and the peak-memory probe, one implementation per device type.

GPU: CUDA events around each run, the L2 cache flushed before each (a write larger than any current
L2), one synchronize after all repeats, so nothing but the timed kernels sits between the events.
CPU: perf_counter around each run (CPU ops are synchronous); caches are not flushed: the benchmark
tensors are larger than the last-level cache anyway, and a flush would cost more than the small runs.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

_L2_FLUSH_BYTES = 256 * 2**20  # > the 50 MiB L2 of an H100 / H200


def summarize(samples_ms: list[float]) -> tuple[float, float]:
    """(median, spread) in ms; spread is the interquartile range (robust to a stray slow run)."""
    if len(samples_ms) < 4:
        return statistics.median(samples_ms), max(samples_ms) - min(samples_ms)
    q1, _, q3 = statistics.quantiles(samples_ms, n=4)
    return statistics.median(samples_ms), q3 - q1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ms(run: Callable, device: torch.device, repeats: int, warmup: int,
               prepare: Callable | None = None) -> list[float]:
    """Times run(prepare()) (or run()) `repeats` times after `warmup` untimed calls; prepare is untimed."""
    def once():
        return run(prepare()) if prepare is not None else run()

    for _ in range(warmup):
        once()
    if device.type == "cuda":
        return _cuda_ms(run, device, repeats, prepare)
    samples = []
    for _ in range(repeats):
        arg = prepare() if prepare is not None else None
        start = time.perf_counter()
        run(arg) if prepare is not None else run()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def _cuda_ms(run, device, repeats, prepare):
    flush = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        arg = prepare() if prepare is not None else None
        flush.zero_()
        start.record()
        run(arg) if prepare is not None else run()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def cuda_peak_extra_bytes(run: Callable, device: torch.device) -> int:
    """Peak memory allocated by one run(), above what was allocated before it (its result included).
    (CPU: cpu_memory.py, in a child process.)"""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = run()
    torch.cuda.synchronize(device)
    del result
    return torch.cuda.max_memory_allocated(device) - base
