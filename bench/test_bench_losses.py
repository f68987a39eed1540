"""pytest-benchmark suite: forward + backward of every provider of every registered loss, grouped by loss and
shape.

    python -m pytest bench/test_bench_losses.py --benchmark-enable [--benchmark-json out.json]

Two modes, chosen by pytest-benchmark's own switch. Timed (--benchmark-enable): iNaturalist shapes, every
provider. Disabled (pyproject's addopts, so every plain `pytest` run, CI's included, since bench/ is in
testpaths): a smoke test of the same code at the quick preset's first shape without its excluded
providers (torch.compile), seconds on a CPU. The device is CUDA when there is one, else the CPU;
CBKERNELS_BENCH_DEVICE overrides. Each provider is checked against the float64 reference first (the same
check as `python -m cbkernels bench`), then timed; the command is the fuller tool (fwd / bwd apart,
bandwidth, memory, plots), this suite plugs into pytest-benchmark's comparison and history.
"""
import os

import pytest
import torch

from cbkernels import losses
from cbkernels.bench import presets, report, runner, timing
from cbkernels.bench import providers as P
from cbkernels.bench.cases import loss_and_grad, make_case

DEVICE = torch.device(os.environ.get("CBKERNELS_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
if DEVICE.type == "cuda":
    TIMED_CASES = [(n, 8142, dt) for n in (1024, 8192) for dt in (torch.float32, torch.bfloat16)]
else:  # the CPU is slow at this size already; the 8192-row batch is in the command's inat preset
    TIMED_CASES = [(1024, 8142, torch.float32)]
SMOKE = presets.PRESETS["quick"]
SMOKE_CASES = [(*SMOKE["shapes"][0], SMOKE["dtypes"][0])]

_META = report.provenance(str(DEVICE), [])
EXTRA_INFO = {k: _META.get(k) for k in ("device", "gpu", "cpu", "cpu_threads", "torch", "triton", "cbkernels")}


def _timed(config) -> bool:
    # pytest-benchmark's rule: --benchmark-enable wins over --benchmark-disable (pyproject's addopts).
    return not config.getoption("benchmark_disable") or config.getoption("benchmark_enable")


def pytest_generate_tests(metafunc):
    timed = _timed(metafunc.config)
    shapes = TIMED_CASES if timed else SMOKE_CASES
    params = []
    for spec in losses.LOSSES:
        for n, c, dtype in shapes:
            for prov in P.providers_for(spec, DEVICE):
                if timed or prov.name not in SMOKE["exclude"]:
                    params.append(pytest.param(spec, n, c, dtype, prov,
                                               id=f"{spec.name}-{n}x{c}-{str(dtype)[6:]}-{prov.name}"))
    metafunc.parametrize("spec,n,c,dtype,prov", params)


def test_forward_backward(benchmark, spec, n, c, dtype, prov):
    if prov.unavailable:
        pytest.skip(prov.unavailable)
    benchmark.group = f"{spec.name} N={n} C={c} {str(dtype)[6:]} {DEVICE.type}"
    benchmark.extra_info.update(EXTRA_INFO, provider=prov.name, loss=spec.name, N=n, C=c, dtype=str(dtype)[6:],
                                **spec.defaults())
    case = make_case(spec, n, c, dtype, DEVICE)
    ref_loss, ref_grad = runner.reference_loss_and_grad(case)
    with P.environment(prov.env):
        fn = prov.build(case)
        x = case.logits.detach().clone().requires_grad_(True)
        loss_val, grad = loss_and_grad(fn, x)  # compiles here for torch.compile: not timed
        loss_err, grad_err = runner.rel_errors(loss_val.detach(), grad, ref_loss, ref_grad)
        tol = runner.CHECK_RTOL[dtype]
        assert loss_err <= tol and grad_err <= tol, f"{prov.name}: loss {loss_err:.1e}, grad {grad_err:.1e}"
        benchmark.extra_info.update(loss_rel_err=loss_err, grad_rel_err=grad_err)

        def step():  # synchronised so pytest-benchmark's host timer sees the device's work
            out = loss_and_grad(fn, x)
            timing.sync(DEVICE)
            return out

        benchmark.pedantic(step, rounds=5 if DEVICE.type == "cpu" else 50, warmup_rounds=1, iterations=1)
