"""Predicted against measured: the audit's model run on kernels that a GPU measured.

    python -m cbkernels.audit.validate CASES.py [--arch sm_90] [--gpu H200]

CASES.py describes one GPU run. It is kept beside the tree that run measured (reconstructed read-only with
`git archive <commit> | tar -x -C DIR`), not in this repository, and defines:
    ROOT: that tree (Path);
    CUDA_SOURCES, CUDA_PROBE: its CUDA translation units and a probe program (compile_cuda.Build), or None;
    cases() -> list[Case]: each measured configuration with the launches it timed (launches.Launch records
      whose TritonKernel functions are imported from ROOT) and the measured milliseconds.
The launches are compiled and modelled exactly as the audit does (metrics.measure, roofline.predict); a
Case's `copy_passes` are elementwise passes outside the project's kernels (torch.mul of a gradient), each
charged one read and one write of N x C at copy bandwidth. Prints one markdown row per case and the
spread of predicted / measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import statistics
import sys

from . import _arch, kernel_metrics, roofline
from .launches import ELEMENT_BYTES, CudaKernel, Launch


@dataclasses.dataclass(frozen=True)
class Case:
    label: str
    n: int
    c: int
    dtype: str
    launches: tuple[Launch, ...]
    measured_ms: float
    copy_passes: int = 0
    group: str = ""  # cases summarised together (e.g. kernel time only / with a pass outside the kernels)


def _load(path: str):
    spec = importlib.util.spec_from_file_location("cbk_validation_cases", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def predict_case(case: Case, compile_launch, arch: int, gpu: roofline.Gpu) -> tuple[float, list]:
    """(predicted ms, [(launch, metrics, prediction)]) of one case."""
    total, parts = 0.0, []
    for launch in case.launches:
        m = kernel_metrics(launch, compile_launch(launch), case.n, case.c, case.dtype, arch)
        p = roofline.predict(gpu, m.load)
        total += p.ms
        parts.append((launch, m, p))
    total += case.copy_passes * roofline.copy_floor_ms(gpu, case.n * case.c, ELEMENT_BYTES[case.dtype])
    return total, parts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbkernels.audit.validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", help="the run's CASES.py")
    parser.add_argument("--arch", type=_arch, default=90)
    parser.add_argument("--gpu", choices=[g.name for g in roofline.GPUS], default="H200")
    args = parser.parse_args(argv)
    gpu = next(g for g in roofline.GPUS if g.name == args.gpu)
    module = _load(args.cases)
    from . import compile_cuda, compile_triton

    build = None
    if module.CUDA_SOURCES:
        build = compile_cuda.Build(args.arch, root=module.ROOT, sources=module.CUDA_SOURCES, probe=module.CUDA_PROBE)
    cache = {}

    def compile_launch(launch):
        code = launch.code
        if isinstance(code, CudaKernel):
            return build.kernel(code.demangled)
        key = (code.fn, repr(code.args), repr(sorted(code.constexprs.items())), code.num_warps, code.num_stages)
        if key not in cache:
            cache[key] = compile_triton.compile_kernel(code, args.arch)
        return cache[key]

    ratios: dict[str, list[float]] = {}
    print("| case | measured ms | predicted ms | pred / meas | per launch: instr/el, CTA/SM, bound |")
    print("|---|---:|---:|---:|---|")
    try:
        for case in module.cases():
            predicted, parts = predict_case(case, compile_launch, args.arch, gpu)
            ratio = predicted / case.measured_ms
            ratios.setdefault(case.group, []).append(ratio)
            detail = "; ".join(
                f"{m.instr_per_elem:.0f}, {m.ctas_per_sm}, "
                + max((("mem", p.memory_ms * p.tail_factor), ("issue", p.issue_ms * p.tail_factor),
                       ("mufu", p.mufu_ms * p.tail_factor), ("path", p.latency_ms)), key=lambda kv: kv[1])[0]
                + (f", re-read from {'L2' if p.reread_from_l2 else 'DRAM'}" if launch.reread_bytes_per_elem else "")
                for launch, m, p in parts)
            print(f"| {case.label} | {case.measured_ms:.3f} | {predicted:.3f} | {ratio:.2f} | {detail} |")
    finally:
        if build is not None:
            build.close()
    print()
    for group, values in ratios.items():
        mean = math.exp(statistics.fmean(math.log(r) for r in values))
        print(f"{group or 'all'}: {len(values)} cases, predicted / measured geometric mean {mean:.2f}, "
              f"median {statistics.median(values):.2f}, range {min(values):.2f} .. {max(values):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
