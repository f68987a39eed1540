"""Timers and the peak-memory probe, one implementation per device type.

GPU: CUDA events around each run, the L2 cache flushed before each (a write larger than any current
L2), one synchronize after all repeats, so nothing but the timed work sits between the events. An eager
run's events also enclose the gaps in which the GPU waits for the host to issue the next kernel, so on
a GPU there are two more timers: the same run captured once as a CUDA graph and replayed (the kernels
back to back, no host in between: the device time alone), and the host's own time to issue one call.
CPU: perf_counter around each run (CPU ops are synchronous, eager time is host time); caches are not
flushed: the benchmark tensors are larger than the last-level cache anyway, and a flush would cost more
than the small runs.
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


def cuda_graph_replay_ms(run: Callable, device: torch.device, repeats: int, warmup: int) -> list[float]:
    """run() captured once as a CUDA graph, then `repeats` replays timed as measure_ms times a run.

    Warm-up calls on a side stream first, as CUDA graph capture requires (lazy initialisation, cuBLAS
    workspaces, torch.compile's first-call compilation of its backward must not happen while capturing).
    A run that synchronises with the host (e.g. .item()) cannot be captured: the RuntimeError propagates.
    The capture's outputs stay alive until the replays are done (replays write into them)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    graph = torch.cuda.CUDAGraph()
    # The outer stream context restores the caller's stream even when capture_end raises (torch.cuda.graph
    # exits its own stream context only after a successful capture_end).
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 2)):
            run()
        with torch.cuda.graph(graph, stream=side):
            outputs = run()
    torch.cuda.current_stream(device).wait_stream(side)
    samples = measure_ms(graph.replay, device, repeats, warmup)
    del outputs, graph
    return samples


def host_us_per_call(run: Callable, device: torch.device, calls: int) -> list[float]:
    """Host microseconds to issue one run(): perf_counter around the call alone, the device synchronised
    before each (untimed), so every call starts with an empty launch queue and never waits for it. On a
    GPU this is the Python, dispatch, autograd and launch cost per call that eager timing pays whenever
    the kernels finish faster than the host issues them."""
    samples = []
    for _ in range(calls):
        sync(device)
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1e6)
    sync(device)
    return samples


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
