"""Fused linear + class-balanced loss vs the unfused paths: time and peak extra memory of forward + backward.

Variants (each in its own subprocess, so peaks do not mix and a crash or OOM of one is reported, not fatal):
  naive      F.linear + reference.py autograd (the usual PyTorch implementation)
  unfused    F.linear + cbkernels' fused loss kernel (backend "auto")
  fused      cbkernels.linear.cb_linear_loss (backend "auto"): no (N, C) logits
  torch_lce  F.linear_cross_entropy with LinearCrossEntropyOptions() chunking (softmax only, when torch has it)
  baseline   inputs only (CPU: the peak RSS every variant is measured against)

Peak extra memory: CPU, the child's peak RSS (resource.getrusage ru_maxrss) minus the baseline child's, which
imports the same modules and builds the same inputs; CUDA, torch.cuda.max_memory_allocated() minus the bytes
allocated once the inputs exist. Both include the parameter gradients (.grad), the same for every variant.
Time: median of --repeats forward + backward steps after one warm-up step (the step that measured memory),
as wall-clock ms and, for a shared CPU machine where the wall clock mostly measures the neighbours, as the
process's CPU time (time.process_time, summed over its threads).

  python bench/bench_linear.py                                  # CPU, (4096, 512, 32768) fp32
  python bench/bench_linear.py --device cuda --out FILE.json    # GPU, (8192, 2048, 131072) bf16

cbkernels must be importable (installed, as `make venv` does in editable mode, or on PYTHONPATH): the
parent and each child process import it. By default one loss per kernel family runs (DEFAULT_LOSS_TYPES).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from cbkernels import losses

DEFAULT_SHAPE = {"cpu": (4096, 512, 32768, "float32"), "cuda": (8192, 2048, 131072, "bfloat16")}
VARIANTS = ("naive", "unfused", "fused", "torch_lce")
# By default one loss per kernel family: those that pin no hyperparameter. The others run the same kernels
# at a pinned value (sigmoid is focal at gamma 0), at the same cost.
DEFAULT_LOSS_TYPES = [spec.name for spec in losses.LOSSES if not spec.fixed]
MiB = 2.0**20


def _torch_lce_applies(spec) -> bool:
    """F.linear_cross_entropy computes softmax cross entropy only."""
    return spec.family is losses.SOFTMAX_CE


# --- child: one variant, one process ------------------------------------------------------------------

def _make_step(variant, loss_type, hidden, weight, bias, target, class_weight):
    import torch
    import torch.nn.functional as F

    from cbkernels import _backends, functional
    from cbkernels.linear import cb_linear_loss

    spec = losses.loss(loss_type)
    hyper = spec.defaults()

    def unfused_loss(backend):
        logits = F.linear(hidden, weight, bias)
        return functional.apply_loss(spec, logits, target, class_weight, "mean", -100, backend, hyper)

    if variant == "baseline":
        return lambda: None, "none"
    if variant == "naive":
        return lambda: unfused_loss("reference").backward(), "reference"
    auto = _backends.resolve("auto", hidden).name
    if variant == "unfused":
        return lambda: unfused_loss("auto").backward(), auto
    if variant == "fused":
        return lambda: cb_linear_loss(hidden, weight, target, class_weight, bias, loss_type, **hyper).backward(), auto
    if variant == "torch_lce":
        if not _torch_lce_applies(spec):
            raise NotImplementedError("F.linear_cross_entropy is softmax cross entropy only")
        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            raise NotImplementedError(f"torch {torch.__version__} has no F.linear_cross_entropy with chunking")
        options = torch.nn.LinearCrossEntropyOptions()
        return (lambda: F.linear_cross_entropy(hidden, weight, target, linear_bias=bias, weight=class_weight,
                                               options=options).backward()), "torch"
    raise ValueError(f"unknown variant {variant!r}")


def _child(args):
    import resource

    import torch

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    n, h, c = args.shape
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(c, h, generator=g) / h**0.5).to(device, dtype).requires_grad_(True)
    bias = torch.zeros(c).to(device, dtype).requires_grad_(True)
    target = torch.randint(0, c, (n,), generator=g).to(device)
    class_weight = (torch.rand(c, generator=g) + 0.5).to(device)
    params = (hidden, weight, bias)
    step, backend = _make_step(args.child, args.loss, hidden, weight, bias, target, class_weight)

    def run():
        for p in params:
            p.grad = None
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    run()  # the warm-up step measures memory
    if device.type == "cuda":
        peak_extra = (torch.cuda.max_memory_allocated() - base) / MiB
    else:
        peak_extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MiB  # absolute; parent subtracts
    times, cpu_times = [], []
    started = time.perf_counter()
    while len(times) < args.repeats and (not times or time.perf_counter() - started < args.time_cap):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
        cpu_times.append((time.process_time() - c0) * 1e3)
    print(json.dumps({"peak_mib": peak_extra, "ms": times, "cpu_ms": cpu_times, "backend": backend}))


# --- parent: runs every variant, time-boxed -----------------------------------------------------------

def _run_variant(args, variant, loss, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--loss", loss, "--device", args.device,
           "--dtype", args.dtype, "--shape", *map(str, args.shape), "--repeats", str(args.repeats),
           "--time-cap", str(max(1.0, timeout / 3))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        reason = "out of memory" if any("out of memory" in s.lower() for s in tail) else "failed"
        return {"error": f"{reason} (exit {proc.returncode}): {' | '.join(tail)}"}
    result = json.loads(lines[-1])
    ms, cpu_ms = result.pop("ms"), result.pop("cpu_ms")
    result.update(ms_median=statistics.median(ms), ms_min=min(ms), ms_max=max(ms), repeats=len(ms),
                  cpu_ms_median=statistics.median(cpu_ms))
    return result


def _summary(results, loss):
    rows = results[loss]
    out = {}

    def ok(name):
        return name in rows and "error" not in rows[name] and "skipped" not in rows[name]

    if ok("fused") and ok("naive"):
        out["fused_mem_vs_naive"] = rows["fused"]["peak_extra_mib"] / rows["naive"]["peak_extra_mib"]
    if ok("fused") and ok("unfused"):
        out["fused_time_vs_unfused"] = rows["fused"]["ms_median"] / rows["unfused"]["ms_median"]
        out["fused_cpu_time_vs_unfused"] = rows["fused"]["cpu_ms_median"] / rows["unfused"]["cpu_ms_median"]
        out["fused_mem_vs_unfused"] = rows["fused"]["peak_extra_mib"] / rows["unfused"]["peak_extra_mib"]
    if ok("fused") and ok("torch_lce"):
        out["fused_time_vs_torch_lce"] = rows["fused"]["ms_median"] / rows["torch_lce"]["ms_median"]
        out["fused_cpu_time_vs_torch_lce"] = rows["fused"]["cpu_ms_median"] / rows["torch_lce"]["cpu_ms_median"]
        out["fused_mem_vs_torch_lce"] = rows["fused"]["peak_extra_mib"] / rows["torch_lce"]["peak_extra_mib"]
    return out


def _markdown(report):
    lines = ["| loss | variant | backend | wall ms median (min-max, reps) | process CPU ms median | peak extra MiB |",
             "|---|---|---|---|---|---|"]
    for loss, rows in report["results"].items():
        for name, r in rows.items():
            if "ms_median" in r:
                lines.append(f"| {loss} | {name} | {r['backend']} | {r['ms_median']:.0f} ({r['ms_min']:.0f}-"
                             f"{r['ms_max']:.0f}, {r['repeats']}) | {r['cpu_ms_median']:.0f} | "
                             f"{r['peak_extra_mib']:.0f} |")
            else:
                lines.append(f"| {loss} | {name} | - | {r.get('error') or r.get('skipped')} | - | - |")
    for loss, s in report["summary"].items():
        lines.append(f"\n{loss}: " + ", ".join(f"{k} = {v:.3f}" for k, v in s.items()))
    return "\n".join(lines)


def _cuda_name(torch):
    try:
        return torch.cuda.get_device_name()
    except (AssertionError, RuntimeError) as exc:  # the report is still written when CUDA is unusable
        return f"unavailable ({exc})"


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("N", "H", "C"), help="default: per device")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: per device")
    parser.add_argument("--losses", nargs="+", default=DEFAULT_LOSS_TYPES, choices=losses.LOSS_TYPES)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=900.0, help="wall-clock budget for the whole run")
    parser.add_argument("--out", help="write the JSON report here (and FILE.md with the table)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--loss", help=argparse.SUPPRESS)
    parser.add_argument("--time-cap", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    n, h, c, dtype = DEFAULT_SHAPE[args.device]
    args.shape = args.shape or [n, h, c]
    args.dtype = args.dtype or dtype
    if args.child:
        return _child(args)

    import torch

    deadline = time.monotonic() + args.budget_s
    jobs = [(loss, v) for loss in args.losses for v in args.variants
            if v != "torch_lce" or _torch_lce_applies(losses.loss(loss))]
    results = {loss: {} for loss in args.losses}
    baseline = None
    if args.device == "cpu":
        base = _run_variant(args, "baseline", args.losses[0], max(10.0, deadline - time.monotonic()))
        baseline = base.get("peak_mib")
    for i, (loss, variant) in enumerate(jobs):
        left = deadline - time.monotonic()
        if left < 5:
            results[loss][variant] = {"skipped": "budget spent"}
            continue
        # Share what is left among the jobs still to run; the last ones inherit any time saved.
        r = _run_variant(args, variant, loss, left / (len(jobs) - i) * 1.5 if i < len(jobs) - 1 else left)
        if "peak_mib" in r:
            peak = r.pop("peak_mib")
            r["peak_extra_mib"] = peak - baseline if baseline is not None else peak
        results[loss][variant] = r
        print(f"{loss:8s} {variant:10s} {json.dumps(r)}", flush=True)
    report = {
        "bench": "bench_linear", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": _cuda_name(torch) if args.device == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "shape": {"N": args.shape[0], "H": args.shape[1], "C": args.shape[2]}, "dtype": args.dtype,
        "baseline_peak_rss_mib": baseline, "results": results,
        "summary": {loss: _summary(results, loss) for loss in args.losses},
    }
    table = _markdown(report)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
