"""`python -m cbkernels audit`: a static audit of the GPU kernels, without a GPU.

Compiles every shipped kernel variant (Triton and CUDA, as the shipped code launches them) for the given
arch, reads registers, local memory and SASS, and prints per backend x kernel x loss x dtype x GPU the
resource use, per-element instruction and MUFU counts of the main loop, global access widths, barriers in
the main loop, and the predicted time and % of copy bandwidth at (8192, 8142) of the roofline model of
docs/roofline.md. Exit status 1 when a gate (gates.py) fails, 2 when nothing could be audited or a variant
could not be compiled.

What is compiled comes from triton_variants.py and cuda_variants.py, the only files that name kernels.
"""
from __future__ import annotations

import argparse
import re
import sys
import time

from . import gates, metrics, occupancy, report, roofline, toolchain
from .launches import DTYPES, ELEMENT_BYTES, LOSSES

N, C = 8192, 8142
BACKENDS = ("triton", "cuda")


def _arch(text: str) -> int:
    m = re.fullmatch(r"sm_(\d+)a?", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"--arch must look like sm_90, got {text!r}")
    arch = int(m.group(1))
    try:
        occupancy.limits(arch)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return arch


def kernel_metrics(launch, kernel, n, c, dtype, arch) -> metrics.KernelMetrics:
    """One launch's metrics: its resident CTAs per SM, then the SASS counts (metrics.measure)."""
    cps = occupancy.ctas_per_sm(arch, kernel.resources.registers, launch.threads_per_cta,
                                kernel.resources.shared_bytes + kernel.dynamic_shared_bytes)
    return metrics.measure(launch, kernel, n, c, dtype, cps)


def _records(backend, loss, dtype, compiled_launches, arch):
    """Kernel records and the loss's forward + backward record, for each GPU of the model."""
    measured = [(launch, kernel, kernel_metrics(launch, kernel, N, C, dtype, arch))
                for launch, kernel in compiled_launches]
    out = []
    for gpu in roofline.GPUS:
        common = dict(backend=backend, loss=loss, dtype=dtype, gpu=gpu.name, arch=f"sm_{arch}", n=N, c=C)
        total_ms, loss_failed, rows = 0.0, [], []
        for launch, kernel, m in measured:
            p = roofline.predict(gpu, m.load)
            own_floor = m.load.nc_bytes / (gpu.copy_gbps * 1e9) * 1e3
            failed = gates.kernel_failures(m, dtype)
            loss_failed += [f"{launch.kernel}: {f}" for f in failed]
            total_ms += p.ms
            rows.append(dict(
                common, level="kernel", kernel=launch.kernel, symbol=kernel.symbol, registers=m.registers,
                ctas_per_sm=m.ctas_per_sm, local_bytes=m.local_bytes, shared_bytes=m.shared_bytes,
                instr_per_elem=m.instr_per_elem, rare_instr_per_elem=m.rare_instr_per_elem,
                rare_functions=list(launch.rare_functions), mufu_per_elem=m.mufu_per_elem,
                load_width_bytes=m.load_width,
                store_width_bytes=m.store_width, barriers_in_main_loop=m.barriers_in_main_loop,
                calls_in_main_loop=m.calls_in_main_loop, main_loops=m.main_loops, unroll=list(m.unroll),
                pipelined=m.pipelined, overlapped=p.overlapped, grid_ctas=launch.ctas,
                threads_per_cta=launch.threads_per_cta, nc_bytes_per_elem=launch.read_bytes_per_elem
                + launch.write_bytes_per_elem, memory_ms=p.memory_ms, issue_ms=p.issue_ms, mufu_ms=p.mufu_ms,
                latency_ms=p.latency_ms, in_flight_factor=p.in_flight_factor, tail_factor=p.tail_factor,
                predicted_ms=p.ms, predicted_pct_copy=100.0 * own_floor / p.ms if p.ms else 0.0,
                failed_gates=failed, gates_passed=not failed))
        pct = 100.0 * roofline.copy_floor_ms(gpu, N * C, ELEMENT_BYTES[dtype]) / total_ms
        loss_failed += gates.loss_failures(loss, dtype, gpu.name, pct)
        widths = lambda key: min((r[key] for r in rows if r[key] is not None), default=None)  # noqa: E731
        out += rows
        out.append(dict(
            common, level="loss", kernel=report.LOSS_LEVEL_KERNEL, symbol=None,
            registers=max(r["registers"] for r in rows), ctas_per_sm=min(r["ctas_per_sm"] for r in rows),
            local_bytes=max(r["local_bytes"] for r in rows), shared_bytes=max(r["shared_bytes"] for r in rows),
            instr_per_elem=sum(r["instr_per_elem"] for r in rows), mufu_per_elem=sum(r["mufu_per_elem"] for r in rows),
            load_width_bytes=widths("load_width_bytes"), store_width_bytes=widths("store_width_bytes"),
            barriers_in_main_loop=sum(r["barriers_in_main_loop"] for r in rows),
            overlapped=all(r["overlapped"] for r in rows), kernels=[r["kernel"] for r in rows],
            predicted_ms=total_ms, predicted_pct_copy=pct, failed_gates=loss_failed, gates_passed=not loss_failed))
    return out


def _audit_triton(arch):
    from . import compile_triton, triton_variants
    cache = {}
    records = []
    for loss in LOSSES:
        for dtype in DTYPES:
            pairs = []
            for launch in triton_variants.launches(loss, dtype, N, C):
                code = launch.code
                key = (code.fn, repr(code.args), repr(sorted(code.constexprs.items())), code.num_warps,
                       code.num_stages)
                if key not in cache:
                    cache[key] = compile_triton.compile_kernel(code, arch)
                pairs.append((launch, cache[key]))
            records += _records("triton", loss, dtype, pairs, arch)
    return records


def _audit_cuda(build, arch):
    from . import cuda_variants
    records = []
    for dtype in DTYPES:
        config = build.config(C, dtype)
        for loss in LOSSES:
            pairs = [(launch, build.kernel(launch.code.demangled))
                     for launch in cuda_variants.launches(loss, dtype, N, C, config)]
            records += _records("cuda", loss, dtype, pairs, arch)
    return records


def run(arch: int, backends) -> tuple[list[dict], dict[str, str]]:
    """(records, {backend: why it was skipped}). Compile errors propagate."""
    from . import compile_cuda, compile_triton
    records, skipped, build = [], {}, None
    if "cuda" in backends:
        try:
            compile_cuda.check_tools()
            build = compile_cuda.Build(arch)  # nvcc runs in the background while Triton compiles
        except toolchain.ToolMissing as exc:
            skipped["cuda"] = str(exc)
    try:
        if "triton" in backends:
            try:
                compile_triton.check_tools()
            except toolchain.ToolMissing as exc:
                skipped["triton"] = str(exc)
            else:
                records += _audit_triton(arch)
        if build is not None:
            records += _audit_cuda(build, arch)
    finally:
        if build is not None:
            build.close()
    return records, skipped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbkernels audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=_arch, default=90, help="target architecture (default sm_90)")
    parser.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    parser.add_argument("--backend", choices=("all",) + BACKENDS, default="all")
    args = parser.parse_args(argv)
    backends = BACKENDS if args.backend == "all" else (args.backend,)
    started = time.perf_counter()
    try:
        records, skipped = run(args.arch, backends)
    except Exception as exc:  # a variant that does not compile or match: the audit itself failed
        print(f"audit: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(f"Static audit for sm_{args.arch} at (N, C) = ({N}, {C}); times are predicted by the roofline model "
          "of docs/roofline.md, not measured.")
    if records:
        print(report.table(records))
    for backend, why in skipped.items():
        print(f"SKIPPED: the {backend} half: {why}")
    if args.json:
        report.write_json(records, args.json)
    failing = [r for r in records if not r["gates_passed"]]
    for r in failing:
        if r["level"] == "loss":
            print(f"GATE FAILED: {r['backend']} {r['loss']} {r['dtype']} {r['gpu']}: {'; '.join(r['failed_gates'])}")
    print(f"audit took {time.perf_counter() - started:.1f} s")
    if not records:
        print("audit: nothing was audited", file=sys.stderr)
        return 2
    return 1 if failing else 0
