"""Sweep the Triton kernels' launch configurations on a GPU; record the best per shape as JSON.

    python bench/sweep_triton.py --out $OUT/sweep_triton.json [--budget-s 150]
    TRITON_INTERPRET=1 python bench/sweep_triton.py --dry-run --out /tmp/sweep.json   (CPU: code paths only)

(cbkernels must be importable: installed, as `make venv` does in editable mode, or on PYTHONPATH.)

For each (family, N, C, dtype), every kernel family of the registry at its default hyperparameters
(cbkernels/bench/sweeps.py), in priority order (the (8192, 8142) speed-target shapes first):
  1. the float64 reference loss and gradient (reference.py) once;
  2. every configuration of the grid that makes sense for C: checked against the reference first (a
     wrong configuration is recorded and never timed), then forward + backward timed with the "fused"
     strategy (forward writes the gradient, backward scales it by the upstream grad);
  3. the best configuration timed again with the "recompute" strategy (forward loss only, backward
     recomputes), and the static table's configuration timed with both, for comparison.
Timing: triton.testing.do_bench (median over repetitions, L2 flushed before each). Useful bytes per
fwd+bwd = logits read once + gradient written once + targets + class weights; the device's copy
bandwidth (a clone of a 1 GiB tensor: bytes read + written) is measured in the same run, and each
result is reported as GB/s and % of it. The sweep stops itself after --budget-s seconds (what is done
so far is written, with "complete": false). At the end it prints a short table and, ready to paste
into cbkernels/triton/configs.py, the TABLE rows it recommends.

Ceiling of "% of copy" (a copy moves exactly the useful bytes: one read + one write of N x C): the
fused strategy moves the N x C bytes 4 times (forward: read logits, write grad; backward: read grad,
write scaled grad), so it tops out at 50%; recompute moves them 3 times (forward: read; backward: read,
write), so 67%. Only a forward that already writes the final gradient (upstream grad known in forward)
could approach 100%.
"""
import argparse
import dataclasses
import itertools
import os
import platform
import sys
import time

import torch

from cbkernels import losses
from cbkernels.bench.sweeps import (copy_bandwidth_gbps, family_shapes, mismatch, new_report,
                                    reference_rows_and_grad, strategies, sweep_inputs, useful_bytes, with_rates,
                                    write_report)
from cbkernels.triton import configs

# (N, C, dtype) of the speed target, timed for every family first; then iNat batch 1024, then the class
# sweep at N * C ~ 64M elements.
TARGET_SHAPES = [(8192, 8142, torch.bfloat16), (8192, 8142, torch.float32)]
GPU_SHAPES = family_shapes(TARGET_SHAPES + [(1024, 8142, torch.bfloat16)]
                           + [(max(1, 2**26 // c), c, torch.bfloat16) for c in (262144, 131072, 32768, 1000)])
N_TARGET_SHAPES, TARGET_WEIGHT = len(family_shapes(TARGET_SHAPES)), 3  # the target's shapes get 3 shares of time
# The dry run: one tiny shape per family, the shapes taken in turn.
DRY_SHAPES = [(family.name, n, c, dtype) for family, (n, c, dtype)
              in zip(losses.FAMILIES, itertools.cycle([(5, 33, torch.float32), (3, 70, torch.bfloat16)]))]


def config_grid(c, dry_run, first=None):
    """Configurations worth trying for C columns, most promising first (`first`, then about 16 values
    per thread). Tiles wider than next_pow2(C) would duplicate the single-tile one (the launcher clips
    them); several rows per tile only pays when a row is one tile. The pipelined loop's depth
    (num_stages), the persistent grid's programs per SM, and for a single tile a register cap of 64
    (2 CTAs/SM at 16 warps) are swept with it."""
    if dry_run:
        return [configs.LaunchConfig(block=16, rows=1, num_warps=1, num_stages=2, programs_per_sm=1),
                configs.LaunchConfig(block=128, rows=2, num_warps=1)]
    c_pow2 = 1 << (c - 1).bit_length()
    grid = []
    for block in sorted({min(b, c_pow2) for b in (1024, 2048, 4096, 8192, 16384, 32768)}):
        single_tile = block >= c_pow2
        for rows in ((1, 2, 4, 8) if single_tile else (1,)):
            for num_warps in (4, 8, 16, 32):
                per_thread = block * rows // (32 * num_warps)
                if block * rows > 32768 or not 4 <= per_thread <= 64:
                    continue
                for num_stages in ((1, 2) if single_tile else (2, 3, 4)):
                    for programs_per_sm in (2, 4):
                        for maxnreg in ((None, 64) if single_tile and num_warps >= 16 else (None,)):
                            grid.append(configs.LaunchConfig(block=block, rows=rows, num_warps=num_warps,
                                                             num_stages=num_stages, programs_per_sm=programs_per_sm,
                                                             maxnreg=maxnreg))

    def promise(config):
        per_thread = config.block * config.rows // (32 * config.num_warps)
        return (config != first, abs(per_thread.bit_length() - 5), -config.num_stages, -config.block)

    return sorted(grid, key=promise)


def timer(dry_run):
    if not dry_run:
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))

    def cpu_median_ms(fn, reps=1):
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[len(times) // 2]

    return cpu_median_ms


def as_dict(config):
    return None if config is None else dataclasses.asdict(config)


def sweep_shape(family, n, c, dtype, device, time_ms, copy_gbps, deadline, dry_run):
    """Measures one shape; stops trying configurations at `deadline` (time.monotonic())."""
    inputs = sweep_inputs(n, c, dtype, device)
    ref_rows, ref_grad = reference_rows_and_grad(family, inputs)
    runs = strategies(torch.ops.cbkernels_triton, family, inputs)
    nbytes = useful_bytes(n, c, dtype)
    entry = {"family": family, "n": n, "c": c, "dtype": str(dtype).replace("torch.", ""),
             "useful_bytes": nbytes, "configs": [], "best": None}

    def measure(config, strategy):
        try:
            with configs.override(config, family):
                error = mismatch(runs[strategy](), ref_rows, ref_grad, dtype)
                if error is not None:
                    return {"error": error}
                return {"ms": time_ms(runs[strategy])}
        except Exception as exc:  # e.g. out of shared memory / registers for this tile: record, go on
            return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}

    def record(result):
        return with_rates(result, nbytes, copy_gbps)

    table = configs.pick(family, c, dtype)
    entry["table"] = {"config": as_dict(table),
                      **{s: record(measure(table, s)) for s in ("fused", "recompute")}}
    best, best_ms = None, float("inf")
    for config in config_grid(c, dry_run, first=table):
        if time.monotonic() > deadline:
            entry["stopped_by_budget"] = True
            break
        result = record(measure(config, "fused"))
        entry["configs"].append({"config": as_dict(config), "fused": result})
        if "ms" in result and result["ms"] < best_ms:
            best, best_ms = config, result["ms"]
    if best is not None:
        fused = record({"ms": best_ms})
        recompute = record(measure(best, "recompute"))
        faster = "recompute" if recompute.get("ms", float("inf")) < best_ms else "fused"
        entry["best"] = {"config": as_dict(best), "fused": fused, "recompute": recompute, "faster": faster,
                         "pct_copy": (recompute if faster == "recompute" else fused)["pct_copy"]}
    return entry


def paste_ready_table(shapes):
    """configs.py TABLE rows from the best configuration measured per (family, dtype group, C)."""
    by_key = {}
    for entry in shapes:
        if entry["best"] is None:
            continue
        group = configs.dtype_group(getattr(torch, entry["dtype"]))
        by_key.setdefault((entry["family"], group), {})[entry["c"]] = entry["best"]["config"]
    lines = ["# measured by bench/sweep_triton.py; paste into TABLE in cbkernels/triton/configs.py"]
    for (family, group), per_c in sorted(by_key.items()):
        lines.append(f'TABLE["{family}"]["{group}"] = [')
        cs = sorted(per_c)
        for i, c in enumerate(cs):
            cfg = per_c[c]
            c_max = "None" if i == len(cs) - 1 else str(1 << (c - 1).bit_length())
            fields = ", ".join(f"{k}={v}" for k, v in cfg.items())
            lines.append(f"    ({c_max}, LaunchConfig({fields})),")
        lines.append("]")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--budget-s", type=float, default=150.0, help="stop after this many seconds")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes and grid on the CPU under TRITON_INTERPRET=1 (exercises the code)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--dry-run runs the kernels on the CPU: set TRITON_INTERPRET=1")
        device, shapes = "cpu", DRY_SHAPES
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA device (or --dry-run with TRITON_INTERPRET=1)")
        device, shapes = "cuda", GPU_SHAPES
    import triton  # after the TRITON_INTERPRET check: the variable must be set before this import

    import cbkernels.triton.ops  # noqa: F401  (registers torch.ops.cbkernels_triton)

    time_ms = timer(args.dry_run)
    copy_gbps = copy_bandwidth_gbps(time_ms, device, 2**20 if args.dry_run else 2**30)
    report = new_report(torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                        args.budget_s, copy_gbps,
                        "triton.testing.do_bench median, L2 flushed" if not args.dry_run else "CPU perf_counter",
                        versions={"triton": triton.__version__}, dry_run=args.dry_run)
    for i, (family, n, c, dtype) in enumerate(shapes):
        now = time.monotonic()
        if now > deadline:
            report["complete"] = False
            break
        # each remaining shape gets its share of the remaining time; the speed-target shapes count triple
        weights = [TARGET_WEIGHT if j < N_TARGET_SHAPES else 1 for j in range(i, len(shapes))]
        shape_deadline = now + (deadline - now) * weights[0] / sum(weights)
        entry = sweep_shape(family, n, c, dtype, device, time_ms, copy_gbps, shape_deadline, args.dry_run)
        report["complete"] &= not entry.get("stopped_by_budget", False)
        report["shapes"].append(entry)
        write_report(report, args.out)  # after every shape: a killed run keeps what it measured
    report["elapsed_s"] = round(time.monotonic() - start, 1)
    write_report(report, args.out)

    print(f"copy bandwidth {copy_gbps:.0f} GB/s on {report['device']}; {report['elapsed_s']} s; "
          f"complete: {report['complete']}")
    print(f"{'family':14} {'N':>6} {'C':>7} {'dtype':9} {'best (LaunchConfig fields)':32} "
          f"{'fused ms':>9} {'recomp ms':>9} {'% copy':>7} {'table %':>7}")
    for e in report["shapes"]:
        b = e["best"]
        table_pct = max((e["table"][s].get("pct_copy", 0) for s in ("fused", "recompute")), default=0)
        if b is None:
            print(f"{e['family']:14} {e['n']:6} {e['c']:7} {e['dtype']:9} no valid configuration")
            continue
        cfg = b["config"]
        print(f"{e['family']:14} {e['n']:6} {e['c']:7} {e['dtype']:9} "
              f"{str(tuple(cfg.values())):32} "
              f"{b['fused']['ms']:9.4f} {b['recompute'].get('ms', float('nan')):9.4f} {b['pct_copy']:7.1f} "
              f"{table_pct:7.1f}")
    print(paste_ready_table(report["shapes"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
