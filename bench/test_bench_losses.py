"""pytest-benchmark suite: forward + backward of every provider, grouped by loss and shape.

    python -m pytest bench/test_bench_losses.py --benchmark-enable [--benchmark-json out.json]

(pyproject's addopts disable timing, so a plain run only checks that every case works.) The device is
CUDA when there is one, else the CPU; CBKERNELS_BENCH_DEVICE overrides. Each provider is checked against
the float64 reference first (the same check as `python -m cbkernels bench`), then timed; the command
is the fuller tool (fwd / bwd apart, bandwidth, memory, plots), this suite plugs into pytest-benchmark's
comparison and history.
"""
import os

import pytest
import torch

from cbkernels.bench import providers as P
from cbkernels.bench import report, runner, timing

DEVICE = torch.device(os.environ.get("CBKERNELS_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
if DEVICE.type == "cuda":
    CASES = [(n, 8142, dt) for n in (1024, 8192) for dt in (torch.float32, torch.bfloat16)]
else:  # the CPU is slow at this size already; the 8192-row batch is in the command's inat preset
    CASES = [(1024, 8142, torch.float32)]

_META = report.provenance(str(DEVICE), [])
EXTRA_INFO = {k: _META.get(k) for k in ("device", "gpu", "cpu", "cpu_threads", "torch", "triton", "cbkernels")}


def _params():
    for loss in P.LOSSES:
        for n, c, dtype in CASES:
            for prov in P.providers_for(loss, DEVICE):
                yield pytest.param(loss, n, c, dtype, prov, id=f"{loss}-{n}x{c}-{str(dtype)[6:]}-{prov.name}")


@pytest.mark.parametrize("loss,n,c,dtype,prov", list(_params()))
def test_forward_backward(benchmark, loss, n, c, dtype, prov):
    if prov.unavailable:
        pytest.skip(prov.unavailable)
    benchmark.group = f"{loss} N={n} C={c} {str(dtype)[6:]} {DEVICE.type}"
    benchmark.extra_info.update(EXTRA_INFO, provider=prov.name, loss=loss, N=n, C=c, dtype=str(dtype)[6:])
    case = P.make_case(loss, n, c, dtype, DEVICE)
    ref_loss, ref_grad = runner.reference_loss_and_grad(case)
    with P.environment(prov.env):
        fn = prov.build(case)
        x = case.logits.detach().clone().requires_grad_(True)
        loss_val, grad = runner.loss_and_grad(fn, x)  # compiles here for torch.compile: not timed
        loss_err, grad_err = runner.rel_errors(loss_val.detach(), grad, ref_loss, ref_grad)
        tol = runner.CHECK_RTOL[dtype]
        assert loss_err <= tol and grad_err <= tol, f"{prov.name}: loss {loss_err:.1e}, grad {grad_err:.1e}"
        benchmark.extra_info.update(loss_rel_err=loss_err, grad_rel_err=grad_err)

        def step():  # synchronised so pytest-benchmark's host timer sees the device's work
            out = runner.loss_and_grad(fn, x)
            timing.sync(DEVICE)
            return out

        benchmark.pedantic(step, rounds=5 if DEVICE.type == "cpu" else 50, warmup_rounds=1, iterations=1)
