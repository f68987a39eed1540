"""`python -m cbkernels audit`: a static audit of the GPU kernels, without a GPU.

Compiles every shipped kernel variant (Triton and CUDA, as the shipped code launches them) for the given
arch, reads registers, local memory and SASS, and prints per backend x kernel x loss x target kind (class
indices, dense) x dtype x GPU the resource use, per-element instruction and MUFU counts of the main loop,
global access widths, barriers in the main loop, and the predicted time and % of copy bandwidth of the
roofline model of docs/roofline.md, at (N, C) = (8192, 8142) or at the shapes given with --shape (then also a
table of the predicted % of copy per shape on the gated GPU). Exit status 1 when a gate (gates.py) fails, 2
when nothing could be audited or a variant could not be compiled.

What is compiled comes from triton_variants.py and cuda_variants.py, the only files that name kernels.
"""
from __future__ import annotations

import argparse
import re
import sys
import time

from . import gates, metrics, occupancy, report, roofline, toolchain
from .launches import DTYPES, ELEMENT_BYTES, LOSSES

DEFAULT_SHAPE = gates.PCT_COPY_SHAPE
BACKENDS = ("triton", "cuda")
# Class indices (N,), or a dense (N, C) target in the logits' dtype: one more N x C array read, which the copy
# floor of the loss's % of copy counts (roofline.copy_floor_ms).
TARGETS = ("index", "dense")


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


def _shape(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", text)
    if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 2:
        raise argparse.ArgumentTypeError(f"--shape must be N,C with N >= 1 and C >= 2, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def kernel_metrics(launch, kernel, n, c, dtype, arch) -> metrics.KernelMetrics:
    """One launch's metrics: its resident CTAs per SM, then the SASS counts (metrics.measure)."""
    cps = occupancy.ctas_per_sm(arch, kernel.resources.registers, launch.threads_per_cta,
                                kernel.resources.shared_bytes + kernel.dynamic_shared_bytes)
    return metrics.measure(launch, kernel, n, c, dtype, cps)


def _records(backend, loss, target, dtype, compiled_launches, arch, shape):
    """Kernel records and the loss's forward + backward record, for each GPU of the model, at shape (N, C)."""
    n, c = shape
    arrays = 3 if target == "dense" else 2  # the least N x C arrays forward + backward move
    measured = [(launch, kernel, kernel_metrics(launch, kernel, n, c, dtype, arch))
                for launch, kernel in compiled_launches]
    out = []
    for gpu in roofline.GPUS:
        common = dict(backend=backend, loss=loss, target=target, dtype=dtype, gpu=gpu.name, arch=f"sm_{arch}",
                      n=n, c=c)
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
                pipelined=m.pipelined, overlapped=p.overlapped, grid_ctas=launch.ctas, elements=m.load.elements,
                threads_per_cta=launch.threads_per_cta, nc_bytes_per_elem=launch.read_bytes_per_elem
                + launch.write_bytes_per_elem, reread_bytes_per_elem=launch.reread_bytes_per_elem,
                reread_from_l2=p.reread_from_l2 if launch.reread_bytes_per_elem else None,
                memory_ms=p.memory_ms, l2_ms=p.l2_ms, issue_ms=p.issue_ms, mufu_ms=p.mufu_ms,
                latency_ms=p.latency_ms, in_flight_factor=p.in_flight_factor, tail_factor=p.tail_factor,
                predicted_ms=p.ms, predicted_pct_copy=100.0 * own_floor / p.ms if p.ms else 0.0,
                failed_gates=failed, gates_passed=not failed))
        pct = 100.0 * roofline.copy_floor_ms(gpu, n * c, ELEMENT_BYTES[dtype], arrays) / total_ms
        shortfalls = gates.loss_failures(loss, dtype, gpu.name, shape, pct)
        gated = target in gates.PCT_COPY_GATED_TARGETS
        loss_failed += shortfalls if gated else []
        missed = [] if gated else shortfalls
        widths = lambda key: min((r[key] for r in rows if r[key] is not None), default=None)  # noqa: E731
        out += rows
        out.append(dict(
            common, level="loss", kernel=report.LOSS_LEVEL_KERNEL, symbol=None,
            registers=max(r["registers"] for r in rows), ctas_per_sm=min(r["ctas_per_sm"] for r in rows),
            local_bytes=max(r["local_bytes"] for r in rows), shared_bytes=max(r["shared_bytes"] for r in rows),
            # per element of the loss: a launch on a batch of the rows counts for its share of the elements
            instr_per_elem=sum(r["instr_per_elem"] * r["elements"] for r in rows) / (n * c),
            mufu_per_elem=sum(r["mufu_per_elem"] * r["elements"] for r in rows) / (n * c),
            load_width_bytes=widths("load_width_bytes"), store_width_bytes=widths("store_width_bytes"),
            barriers_in_main_loop=sum(r["barriers_in_main_loop"] for r in rows),
            overlapped=all(r["overlapped"] for r in rows), kernels=[r["kernel"] for r in rows],
            reread_from=report.reread_source(rows),
            predicted_ms=total_ms, predicted_pct_copy=pct, failed_gates=loss_failed, gates_passed=not loss_failed,
            missed_targets=missed))
    return out


def _audit_triton(arch, shapes):
    from . import compile_triton, triton_variants
    cache = {}
    records = []
    for shape in shapes:
        for loss in LOSSES:
            for target in TARGETS:
                for dtype in DTYPES:
                    pairs = _triton_pairs(triton_variants, compile_triton, cache, loss, target, dtype, shape, arch)
                    records += _records("triton", loss, target, dtype, pairs, arch, shape)
    return records


def _triton_pairs(triton_variants, compile_triton, cache, loss, target, dtype, shape, arch):
    """(launch, compiled kernel) of each launch of the loss at shape, compiled once per distinct launch."""
    pairs = []
    for launch in triton_variants.launches(loss, dtype, *shape, dense=target == "dense"):
        code = launch.code
        key = (code.fn, repr(code.args), repr(sorted(code.constexprs.items())), code.num_warps, code.num_stages)
        if key not in cache:
            cache[key] = compile_triton.compile_kernel(code, arch)
        pairs.append((launch, cache[key]))
    return pairs


def _audit_cuda(build, arch, shapes):
    from . import cuda_variants
    records = []
    for shape in shapes:
        n, c = shape
        for dtype in DTYPES:
            config = build.config(*cuda_variants.probe_arguments(n, c, dtype))
            for loss in LOSSES:
                for target in TARGETS:
                    pairs = [(launch, build.kernel(launch.code.demangled)) for launch
                             in cuda_variants.launches(loss, dtype, n, c, config, dense=target == "dense")]
                    records += _records("cuda", loss, target, dtype, pairs, arch, shape)
    return records


def run(arch: int, backends, shapes=(DEFAULT_SHAPE,)) -> tuple[list[dict], dict[str, str]]:
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
                records += _audit_triton(arch, shapes)
        if build is not None:
            records += _audit_cuda(build, arch, shapes)
    finally:
        if build is not None:
            build.close()
    return records, skipped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbkernels audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=_arch, default=90, help="target architecture (default sm_90)")
    parser.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    parser.add_argument("--backend", choices=("all",) + BACKENDS, default="all")
    parser.add_argument("--shape", type=_shape, action="append", metavar="N,C",
                        help=f"an (N, C) to audit, repeatable (default {DEFAULT_SHAPE[0]},{DEFAULT_SHAPE[1]}); "
                             "the %% of copy gates apply at that shape only")
    args = parser.parse_args(argv)
    backends = BACKENDS if args.backend == "all" else (args.backend,)
    shapes = list(dict.fromkeys(args.shape or [DEFAULT_SHAPE]))
    started = time.perf_counter()
    try:
        records, skipped = run(args.arch, backends, shapes)
    except Exception as exc:  # a variant that does not compile or match: the audit itself failed
        print(f"audit: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    for n, c in shapes:
        print(f"Static audit for sm_{args.arch} at (N, C) = ({n}, {c}); times are predicted by the roofline model "
              "of docs/roofline.md, not measured.")
        at_shape = [r for r in records if (r["n"], r["c"]) == (n, c)]
        if at_shape:
            print(report.table(at_shape))
    if args.shape and records:
        print(f"Predicted % of copy bandwidth of forward + backward on the {gates.PCT_COPY_GPU} (not measured; "
              "L2 / DRAM: where the second read of a streamed row is served):")
        print(report.sweep_table(records, shapes, gates.PCT_COPY_GPU))
    for backend, why in skipped.items():
        print(f"SKIPPED: the {backend} half: {why}")
    if args.json:
        report.write_json(records, args.json)
    failing = [r for r in records if not r["gates_passed"]]
    for r in records:
        if r["level"] == "loss" and (r in failing or r["missed_targets"]):
            at = "" if (r["n"], r["c"]) == DEFAULT_SHAPE else f" at ({r['n']}, {r['c']})"
            which = f"{r['backend']} {r['loss']} ({r['target']} target) {r['dtype']} {r['gpu']}{at}"
            if r in failing:
                print(f"GATE FAILED: {which}: {'; '.join(r['failed_gates'])}")
            if r["missed_targets"]:
                print(f"TARGET MISSED (reported, not gated): {which}: {'; '.join(r['missed_targets'])}")
    print(f"audit took {time.perf_counter() - started:.1f} s")
    if not records:
        print("audit: nothing was audited", file=sys.stderr)
        return 2
    return 1 if failing else 0
