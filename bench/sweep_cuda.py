"""Sweep the CUDA kernels' launch configurations on a GPU; record the best per shape as JSON.

    python bench/sweep_cuda.py --out $OUT/sweep_cuda.json [--budget-s 120]

(cbkernels must be importable: installed, as `make venv` does in editable mode, or on PYTHONPATH.)

A configuration is (threads per block, rows per block, vector width in bytes, cached softmax rows, blocks
per SM of the persistent grid, 0 = as many as the kernel's launch bound keeps resident), passed to the
extension through CBKERNELS_CUDA_CONFIG (bindings.cpp reads it per call; the default table is
default_config in csrc/cuda/launch.cu). For each (family, N, C, dtype), every kernel family of the
registry at its default hyperparameters (cbkernels/bench/sweeps.py), the (8192, 8142) speed-target
shapes first, then a class sweep at N * C ~ 64M elements:
  1. the float64 reference (reference.py, on the GPU) loss and gradient once;
  2. the default configuration, then the grid in order of promise: each checked against the reference
     first (a wrong configuration is recorded and never timed), then forward + backward timed with the
     "fused" strategy (forward writes the gradient, backward scales it by the upstream grad);
  3. the best configuration timed again with "recompute" (forward loss only, backward recomputes).
Timing: triton.testing.do_bench (median, L2 flushed before each repetition), or CUDA events with an
explicit L2 flush where Triton is missing. Useful bytes per fwd+bwd = logits read once + gradient written
once + targets + class weights; the copy bandwidth (1 GiB clone, read + write) is measured in the same run
and each result is reported as GB/s and % of it. The sweep stops itself after --budget-s seconds and
writes what it measured ("complete": false); the JSON is rewritten after every shape.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from cbkernels import losses
from cbkernels.bench.sweeps import (copy_bandwidth_gbps, family_shapes, mismatch, new_report,
                                    reference_rows_and_grad, strategies, sweep_inputs, useful_bytes, with_rates,
                                    write_report)

ENV = "CBKERNELS_CUDA_CONFIG"
GPU_SHAPES = family_shapes([(8192, 8142, torch.bfloat16), (8192, 8142, torch.float32)]
                           + [(max(1, 2**26 // c), c, torch.bfloat16) for c in (1000, 32768, 262144)])
# The family whose CUDA kernel comes in two variants: rows cached in registers, or streamed (launch.cu).
CACHED_FAMILY = losses.SOFTMAX_CE.name
# The launcher's rules (csrc/cuda/kernels.cuh, launch.cu): elements a thread holds in the cached softmax
# (default_config gives each row enough threads for at most this many), the cached kernel's largest block,
# the threads per SM each kernel's launch bound keeps resident (the persistent grid's default depth), and
# the most threads default_config gives a row (half of those: two blocks per SM).
ELEMS_PER_THREAD = 64
CACHED_MAX_THREADS = 128
CACHED_RESIDENT_THREADS = 3 * 128
RESIDENT_THREADS = 1024
MAX_DEFAULT_ROW_THREADS = RESIDENT_THREADS // 2


@dataclass(frozen=True)
class Config:
    threads: int       # per block
    rows: int          # per block
    vec: int = 16      # bytes per vector access (16, 8) or 1 (one element)
    cache: int = 1     # softmax: keep rows that fit in registers (read once)
    ctas: int = 0      # blocks per SM of the persistent grid (0: resident threads / threads, launch.cu)

    def env(self) -> str:
        text = f"threads={self.threads},rows={self.rows},vec={self.vec},cache={self.cache}"
        return text + (f",ctas={self.ctas}" if self.ctas else "")


def default_tpr(c: int) -> int:
    """Threads per row of launch.cu's default_config (at most 64 elements per thread, 32 .. 512)."""
    tpr = 32
    while tpr < MAX_DEFAULT_ROW_THREADS and tpr * ELEMS_PER_THREAD < c:
        tpr *= 2
    return tpr


def cached(threads: int, tpr: int, c: int) -> bool:
    """Whether a softmax configuration runs the cached kernel on rows of C (launch.cu: cached_softmax)."""
    return threads <= CACHED_MAX_THREADS and c <= ELEMS_PER_THREAD * tpr


def default_ctas(family: str, config: Config, c: int) -> int:
    """Blocks per SM the launcher takes for ctas=0 (launch.cu: blocks_per_sm)."""
    tpr = config.threads // config.rows
    on_cache = family == CACHED_FAMILY and config.cache and config.vec == 16 and cached(config.threads, tpr, c)
    return max(1, (CACHED_RESIDENT_THREADS if on_cache else RESIDENT_THREADS) // config.threads)


def config_grid(family: str, c: int) -> list[Config]:
    """Configurations worth trying for rows of C, most promising first: threads per row around the
    default's (about 64 elements per thread), several rows per block only where a row needs few threads,
    16- then 8-byte vectors, and for the softmax the streaming (two-read) variant of each; the default's
    persistent-grid depth varied right after the default itself."""
    tpr0 = default_tpr(c)
    tprs = sorted({t for t in (tpr0 // 4, tpr0 // 2, tpr0, tpr0 * 2) if 32 <= t <= 1024},
                  key=lambda t: (abs((t // tpr0).bit_length() - (tpr0 // t).bit_length()), -t))
    grid = []
    for vec in (16, 8):
        for tpr in tprs:
            for rows in (1, 2, 4, 8):
                threads = tpr * rows
                if threads > 1024 or (rows > 1 and threads > 512) or (rows > 1 and tpr > 256):
                    continue
                for cache in ((1, 0) if family == CACHED_FAMILY else (1,)):
                    if cache and family == CACHED_FAMILY and not cached(threads, tpr, c):
                        continue  # would run the streaming kernel anyway: a duplicate
                    grid.append(Config(threads, rows, vec, cache))
    # Right after the default, the persistent grid's depth around it: fewer blocks per SM than stay
    # resident, or more (the surplus waits for a free slot, as a non-persistent grid would).
    first = grid[0]
    grid[1:1] = [Config(first.threads, first.rows, first.vec, first.cache, ctas)
                 for ctas in (1, 2, 4, 8) if ctas != default_ctas(family, first, c)]
    return grid


def table_rows(report) -> list[str]:
    """The measured best configuration per shape as rows for launch.cu's default_config, to replace the
    static-model table there by hand (one row per family, C and dtype; the table is keyed on C and dtype)."""
    lines = []
    for e in report["shapes"]:
        b = e["best"]
        if b["config"] == "default":
            lines.append(f"// {e['family']} C={e['c']} {e['dtype']}: the default table was fastest")
            continue
        cfg = Config(**b["config"])
        lines.append(f"// {e['family']} C={e['c']} {e['dtype']}: {{threads={cfg.threads}, rows={cfg.rows}, "
                     f"vec={cfg.vec}, cache={cfg.cache}, ctas={cfg.ctas}}} ({b['pct_copy']}% of copy)")
    return lines


def gpu_timer():
    """Median milliseconds of fn() with L2 flushed before each run."""
    try:
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    except ImportError:
        pass
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")

    def events_median_ms(fn, reps=30):
        fn()
        times = []
        for _ in range(reps):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    return events_median_ms


class ConfigEnv:
    """Sets CBKERNELS_CUDA_CONFIG for a block (None: the default table) and restores it after."""

    def __init__(self, config: Config | None):
        self.value = None if config is None else config.env()

    def __enter__(self):
        self.saved = os.environ.get(ENV)
        if self.value is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = self.value

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = self.saved


def sweep_shape(family, n, c, dtype, time_ms, copy_gbps, deadline):
    """Measures one shape; stops trying configurations at `deadline` (time.monotonic())."""
    inputs = sweep_inputs(n, c, dtype, "cuda")
    ref_rows, ref_grad = reference_rows_and_grad(family, inputs)
    runs = strategies(torch.ops.cbkernels, family, inputs)
    nbytes = useful_bytes(n, c, dtype)
    entry = {"family": family, "n": n, "c": c, "dtype": str(dtype).replace("torch.", ""), "useful_bytes": nbytes,
             "configs": [], "best": None}

    def measure(config, strategy):
        with ConfigEnv(config):
            try:
                error = mismatch(runs[strategy](), ref_rows, ref_grad, dtype)
                result = {"error": error} if error else {"ms": time_ms(runs[strategy])}
            except RuntimeError as exc:  # e.g. a configuration the launcher rejects: record, go on
                result = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        return with_rates(result, nbytes, copy_gbps)

    entry["default"] = {s: measure(None, s) for s in ("fused", "recompute")}
    best, best_ms = None, entry["default"]["fused"].get("ms", float("inf"))
    for config in config_grid(family, c):
        if time.monotonic() > deadline:
            entry["stopped_by_budget"] = True
            break
        result = measure(config, "fused")
        entry["configs"].append({"config": asdict(config), "fused": result})
        if result.get("ms", float("inf")) < best_ms:
            best, best_ms = config, result["ms"]
    if best is None:  # nothing beat the default table
        entry["best"] = {"config": "default", **entry["default"]}
    else:
        entry["best"] = {"config": asdict(best), "fused": with_rates({"ms": best_ms}, nbytes, copy_gbps),
                         "recompute": measure(best, "recompute")}
    b = entry["best"]
    b["faster"] = min(("fused", "recompute"), key=lambda s: b[s].get("ms", float("inf")))
    b["pct_copy"] = b[b["faster"]].get("pct_copy")
    return entry


def summary_lines(report):
    lines = [f"copy bandwidth {report['copy_gbps']:.0f} GB/s on {report['device']}; "
             f"{report.get('elapsed_s', '?')} s; complete: {report['complete']}",
             f"{'family':14} {'N':>6} {'C':>7} {'dtype':9} {'best config':32} {'fused ms':>9} {'recomp ms':>9} "
             f"{'GB/s':>7} {'% copy':>7} {'default %':>9}"]
    for e in report["shapes"]:
        b = e["best"]
        cfg = b["config"] if b["config"] == "default" else Config(**b["config"]).env()
        default_pct = max((e["default"][s].get("pct_copy") or 0 for s in ("fused", "recompute")), default=0)
        fast = b[b["faster"]]
        lines.append(f"{e['family']:14} {e['n']:6} {e['c']:7} {e['dtype']:9} {cfg:32} "
                     f"{b['fused'].get('ms', float('nan')):9.4f} {b['recompute'].get('ms', float('nan')):9.4f} "
                     f"{fast.get('gbps', float('nan')):7.0f} {fast.get('pct_copy') or float('nan'):7.1f} "
                     f"{default_pct:9.1f}")
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--budget-s", type=float, default=120.0, help="stop after this many seconds")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    if not torch.cuda.is_available():
        print("sweep_cuda: needs a CUDA device", file=sys.stderr)
        return 2
    from cbkernels import _ops

    if not _ops.extension_has_kernel("CUDA"):
        print("sweep_cuda: cbkernels._C has no CUDA kernels (build with CBKERNELS_BUILD_CUDA=1)", file=sys.stderr)
        return 2
    time_ms = gpu_timer()
    copy_gbps = copy_bandwidth_gbps(time_ms, "cuda")
    report = new_report(torch.cuda.get_device_name(), args.budget_s, copy_gbps,
                        "median, L2 flushed (triton.testing.do_bench, else CUDA events)")
    for i, (family, n, c, dtype) in enumerate(GPU_SHAPES):
        now = time.monotonic()
        if now > deadline:
            report["complete"] = False
            break
        shape_deadline = now + (deadline - now) / (len(GPU_SHAPES) - i)  # equal shares of what is left
        entry = sweep_shape(family, n, c, dtype, time_ms, copy_gbps, shape_deadline)
        report["complete"] &= not entry.get("stopped_by_budget", False)
        report["shapes"].append(entry)
        torch.cuda.empty_cache()
        write_report(report, args.out)
    report["elapsed_s"] = round(time.monotonic() - start, 1)
    write_report(report, args.out)
    print("\n".join(summary_lines(report)))
    print("\n".join(["launch.cu default_config, measured rows:"] + table_rows(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
