"""`python -m cbkernels bench`: every cbkernels backend against its peers, side by side on the same inputs.

    python -m cbkernels bench --preset inat --device cuda --out bench/results/h100-2026-11-27

prints a Markdown table per case and writes table.md, results.json, results.csv and PNG plots to --out.
On a GPU each forward + backward step is also replayed as a CUDA graph (device time without host overhead,
reported beside the eager time and the host time per call), and the speed targets are judged on those
device times (targets.py: targets.md, and the "targets" of results.json). --preset overhead times host
microseconds per call at tiny shapes instead (overhead.py; table.md and results.json only); --preset dense
times dense (N, C) targets against class indices (dense.py; table.md and results.json only).
The API below (speed_table, format_markdown) is what the demo uses.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from ..losses import LOSS_TYPES
from . import presets, report, runner, targets
from .report import format_markdown

__all__ = ["speed_table", "format_markdown", "main"]


def speed_table(shape=(1024, 8142), dtype=torch.float32, device="cpu", losses=LOSS_TYPES, repeats=5,
                providers=None) -> list[dict]:
    """One row per (registered loss named in `losses`, provider): "ms_median" / "ms_spread" (forward + backward), "speedup_vs_naive",
    "ok" (checked against the float64 reference and timed), and the rest of runner.run_case's fields.
    providers: names to run (e.g. ["naive", "cbkernels[cpu,fused]"]), None for all."""
    device = torch.device(device)
    warmup = presets.default_repeats(device)[1]
    n, c = shape
    rows = []
    for loss in losses:
        rows += runner.run_case(loss, n, c, dtype, device, repeats, warmup,
                                names=None if providers is None else set(providers))
    runner.add_cpu_memory(rows)
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cbkernels bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--loss", choices=LOSS_TYPES + ("all",), default="all")
    p.add_argument("--dtype", choices=sorted(presets.DTYPES), help="one dtype instead of the preset's")
    p.add_argument("--preset", choices=sorted(presets.PRESETS), default="inat")
    p.add_argument("--out", help="output folder (table.md, results.json, results.csv, *.png)")
    p.add_argument("--repeats", type=int, help="timed runs per measure (default: 30 on GPU, 5 on CPU)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for CPU runs")
    p.add_argument("--budget-s", type=float, help="start no new shape once this many seconds have passed")
    p.add_argument("--providers", help="comma-separated provider names to run (default: all)")
    p.add_argument("--exclude", help="comma-separated provider names to leave out (e.g. compiled)")
    p.add_argument("--render", metavar="DIR", help="only rewrite DIR's table.md and plots from its results.json")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory run")
    p.add_argument("--no-graph", action="store_true", help="GPU: skip the CUDA-graph replay and host timing")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when a cbkernels provider fails, disagrees with the reference or (GPU) cannot be "
                        "captured as a CUDA graph, or a case fails")
    p.add_argument("--rounds", type=int, help="--preset overhead / dense: interleaved timing rounds (default 15)")
    p.add_argument("--inner", type=int, help="--preset overhead: calls per provider per round (default 200)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    if args.render:
        return _render(args.render)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    preset = presets.PRESETS[args.preset]
    threads = args.threads or preset["threads"]
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(args, argv, device, preset)
    finally:  # main() may run inside another program (the tests): leave its thread count as it was
        torch.set_num_threads(saved_threads)


def _run(args, argv, device, preset) -> int:
    if args.preset == "overhead":
        return _run_overhead(args, argv, device, preset)
    if args.preset == "dense":
        return _run_dense(args, argv, device, preset)
    dtypes = [presets.DTYPES[args.dtype]] if args.dtype else preset["dtypes"]
    losses = LOSS_TYPES if args.loss == "all" else (args.loss,)
    repeats, warmup = presets.default_repeats(device)
    repeats = args.repeats or preset["repeats"] or repeats
    names = set(args.providers.split(",")) if args.providers else None
    exclude = set(preset["exclude"]) | (set(args.exclude.split(",")) if args.exclude else set())
    meta = report.provenance(str(device), argv)
    meta.update(preset=args.preset, repeats=repeats, warmup=warmup)
    print(report.provenance_markdown(meta), flush=True)

    rows, skipped, failed, start = [], [], [], time.perf_counter()
    for n, c in preset["shapes"]:
        for dtype in dtypes:
            if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                skipped.append(f"N={n}, C={c}, {str(dtype).replace('torch.', '')}")
                continue
            shape_rows = []
            for loss in losses:
                try:
                    shape_rows += runner.run_case(loss, n, c, dtype, device, repeats, warmup, names=names,
                                                  exclude=exclude, memory=not args.no_memory,
                                                  graph=not args.no_graph)
                except Exception as exc:  # e.g. out of memory for the inputs: report, go on to the next case
                    failed.append(f"{loss} N={n}, C={c}, {dtype}: {type(exc).__name__}: {exc}".splitlines()[0])
                    print(f"case failed: {failed[-1]}", flush=True)
            print(format_markdown(shape_rows), flush=True)
            rows += shape_rows
            if args.out:  # after every shape, so a run cut short still leaves its results
                _write(args.out, meta, rows, skipped, failed)
    if not args.no_memory:  # CPU: one child process for every case (cpu_memory.py); GPU: already done
        runner.add_cpu_memory(rows)
    print(_summaries(rows), flush=True)
    if skipped:
        print(f"--budget-s {args.budget_s:g} reached: skipped {'; '.join(skipped)}")
    if args.out:
        _write(args.out, meta, rows, skipped, failed, plots=True)
        print(f"wrote {args.out}/: table.md targets.md results.json results.csv and plots")
    problems = strict_problems(rows, failed)
    for problem in problems:
        print(f"strict: {problem}")
    return 1 if args.strict and problems else 0


def strict_problems(rows: list[dict], failed: list[str]) -> list[str]:
    """What --strict fails on: failed cases, and cbkernels providers that raise, disagree with the float64
    reference, or whose step cannot be captured as a CUDA graph (the op contract promises no host
    synchronisation). Peers' failures are reported, not fatal; so are missed speed targets."""
    problems = [f"case failed: {f}" for f in failed]
    for r in rows:
        if r["kind"] != "cbkernels":
            continue
        where = f"{r['provider']} {r['loss']} N={r['N']} C={r['C']} {r['dtype']}"
        if not r["ok"]:
            problems.append(f"{where}: {r['status']}: {r['error']}")
        elif r.get("graph_error"):
            problems.append(f"{where}: not capturable as a CUDA graph: {r['graph_error']}")
    return problems


def _summaries(rows: list[dict]) -> str:
    """The eager summary, and on a GPU the CUDA-graph summary and the targets."""
    text = "## Summary (forward + backward, eager)\n\n" + report.summary_markdown(rows)
    graph = report.summary_markdown(rows, mode="graph")
    if graph:
        text += ("\n## Summary (forward + backward replayed as a CUDA graph: device time; eager ms and host us "
                 "per eager call beside)\n\n" + graph)
    judged = targets.markdown(targets.evaluate(rows))
    if judged:
        text += "\n## Targets (judged on CUDA-graph times)\n\n" + judged
    return text


def _run_overhead(args, argv, device, preset) -> int:
    from . import overhead

    losses = LOSS_TYPES if args.loss == "all" else (args.loss,)
    rounds, inner = args.rounds or preset["rounds"], args.inner or preset["inner"]
    threads = args.threads or preset["threads"]
    meta = report.provenance(str(device), argv)
    meta.update(preset=args.preset, rounds=rounds, inner=inner, measure_threads=threads,
                commit=overhead.git_commit())
    print(report.provenance_markdown(meta), flush=True)
    rows = overhead.measure(losses, preset["shapes"], device, rounds, inner, threads,
                            echo=lambda md: print(md, flush=True))
    print("## Summary (host us per forward + backward call)\n\n" + overhead.summary_markdown(rows), flush=True)
    if args.out:
        _write_overhead(args.out, meta, rows)
        print(f"wrote {args.out}/: table.md results.json")
    return 0


def _run_dense(args, argv, device, preset) -> int:
    from . import dense

    losses = LOSS_TYPES if args.loss == "all" else (args.loss,)
    dtypes = [presets.DTYPES[args.dtype]] if args.dtype else preset["dtypes"]
    rounds = args.rounds or preset["rounds"]
    meta = report.provenance(str(device), argv)
    meta.update(preset=args.preset, rounds=rounds)
    print(report.provenance_markdown(meta), flush=True)
    rows = []
    for dtype in dtypes:
        rows += dense.measure(losses, preset["shapes"], dtype, device, rounds, echo=lambda md: print(md, flush=True))
    table = dense.table_markdown(rows) + "\n" + dense.verdict_markdown(rows)
    print("## Summary (ms per forward + backward)\n\n" + table, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "table.md"), "w") as fh:
            fh.write(report.provenance_markdown(meta) + "\n" + table)
        report.write_json(os.path.join(args.out, "results.json"), meta, rows)
        print(f"wrote {args.out}/: table.md results.json")
    return 0


def _write_overhead(out: str, meta: dict, rows: list[dict]) -> None:
    from . import overhead

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table.md"), "w") as fh:
        fh.write(overhead.table_markdown(meta, rows))
    report.write_json(os.path.join(out, "results.json"), meta, rows)


def _render(out: str) -> int:
    """Table and plots again from a run's results.json (e.g. after a change to the report's layout)."""
    with open(os.path.join(out, "results.json")) as fh:
        data = json.load(fh)
    meta = data["meta"]
    if meta.get("preset") == "overhead":
        _write_overhead(out, meta, data["rows"])
        print(f"rewrote {out}/ from its results.json")
        return 0
    _write(out, meta, data["rows"], meta.get("skipped_by_budget", []), meta.get("failed_cases", []), plots=True)
    print(f"rewrote {out}/ from its results.json")
    return 0


def _write(out: str, meta: dict, rows: list[dict], skipped: list[str], failed: list[str],
           plots: bool = False) -> None:
    os.makedirs(out, exist_ok=True)
    meta = dict(meta, skipped_by_budget=skipped, failed_cases=failed)
    judged = targets.evaluate(rows)
    table = (report.provenance_markdown(meta) + "\n" + _summaries(rows)
             + "\n## Every provider\n\n" + format_markdown(rows))
    if skipped:
        table += f"\nNot run (time budget): {'; '.join(skipped)}\n"
    if failed:
        table += "\nFailed cases:\n" + "".join(f"- {f}\n" for f in failed)
    with open(os.path.join(out, "table.md"), "w") as fh:
        fh.write(table)
    with open(os.path.join(out, "targets.md"), "w") as fh:
        fh.write(targets.markdown(judged) or "No target judged: no CUDA-graph times in this run.\n")
    report.write_json(os.path.join(out, "results.json"), meta, rows, targets=judged)
    report.write_csv(os.path.join(out, "results.csv"), meta, rows)
    if plots:
        try:
            from . import plots as plotting
        except ModuleNotFoundError as exc:
            print(f"plots not written: {exc.name} is not installed (pip install \"cbkernels[bench]\")")
            return
        try:
            plotting.write_all(out, rows, meta)
        except Exception as exc:  # plots are a convenience: never lose the numbers for them
            print(f"plots not written: {type(exc).__name__}: {exc}")
