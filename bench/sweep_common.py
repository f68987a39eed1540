"""What the two launch-configuration sweeps (sweep_cuda.py, sweep_triton.py) share: the inputs of a case,
its float64 reference, the two backward strategies over a backend's ops, the correctness check that gates
every timing, and the useful-byte count."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cbkernels import _ops, reference  # noqa: E402

PARAM = {"sigmoid_focal": 0.5, "softmax_ce": 0.1}  # the paper's focal gamma; a typical smoothing
# tests/backend_cases.py's table: one rounding of fp32 math to the dtype, with 4x headroom.
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}


def make_case(n, c, dtype, device):
    """Logits (N, C), targets with some ignored rows, class weights and an upstream gradient, seeded by shape."""
    g = torch.Generator(device="cpu").manual_seed(n * 131 + c)
    logits = (torch.randn(n, c, generator=g) * 3).to(dtype).to(device)
    target = torch.randint(0, c, (n,), generator=g)
    target[::17] = -100  # some ignored rows
    weight = (torch.rand(c, generator=g) * 2 + 0.1).to(device)
    grad_loss = torch.randn(n, generator=g).to(device)
    return logits, target.to(device), weight, grad_loss


def reference_rows_and_grad(family, logits, target, weight, grad_loss):
    """float64 reference loss rows and upstream-scaled gradient, on the logits' device."""
    x = logits.detach().double().requires_grad_(True)
    if family == "sigmoid_focal":
        rows = reference.sigmoid_focal_rows(x, target, weight.double(), PARAM[family], -100)
    else:
        rows = reference.softmax_rows(x, target, weight.double(), -100, PARAM[family])
    (grad,) = torch.autograd.grad(rows, x, grad_loss.double())
    return rows.detach(), grad


def strategies(ops, family, logits, target, weight, grad_loss):
    """{"fused": fn, "recompute": fn}, each returning (loss rows, upstream-scaled gradient) through `ops`
    (torch.ops.cbkernels or torch.ops.cbkernels_triton) exactly as the autograd formula of _ops.py does."""
    fwd = getattr(ops, f"{family}_forward")
    bwd = getattr(ops, f"{family}_backward")
    param = PARAM[family]

    def fused():
        loss, grad = fwd(logits, target, weight, param, -100, True)
        return loss, _ops.scale_rows(grad, grad_loss, in_place=True)

    def recompute():
        loss, _ = fwd(logits, target, weight, param, -100, False)
        return loss, bwd(logits, target, weight, grad_loss, param, -100)

    return {"fused": fused, "recompute": recompute}


def mismatch(result, ref_rows, ref_grad, dtype):
    """None when (loss, scaled grad) match the float64 reference, else what differs."""
    loss, grad = result
    scale = float(ref_rows.abs().max())
    if not torch.allclose(loss.double(), ref_rows, rtol=2e-5, atol=1e-6 * scale):
        return f"loss differs by {float((loss.double() - ref_rows).abs().max()):.3g}"
    rtol = GRAD_RTOL[dtype]
    if not torch.allclose(grad.double(), ref_grad, rtol=rtol, atol=rtol * float(ref_grad.abs().max())):
        return f"grad differs by {float((grad.double() - ref_grad).abs().max()):.3g}"
    return None


def useful_bytes(n, c, dtype):
    """Logits read once + gradient written once + targets (int64) + class weights (fp32)."""
    return 2 * n * c * torch.empty((), dtype=dtype).element_size() + 8 * n + 4 * c
