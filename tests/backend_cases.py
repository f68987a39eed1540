"""The shared backend test-suite: any backend against reference.py in float64, fresh random inputs.

Inputs are drawn in the backend's dtype; the reference runs on exactly those values upcast to float64,
so the only differences left are the kernel's fp32 arithmetic and the final rounding of the gradient to
the logits' dtype. One tolerance table for every backend:
  loss (always float32 out): rtol 2e-5 of the value + 1e-6 of the row's scale; fp32 sums over up to
    ~10^5 terms carry a relative error of a few 1e-6 (pairwise/blocked accumulation), so 2e-5 is 4x headroom.
  grad: one rounding to the dtype (unit roundoff 2^-24, 2^-11, 2^-8) after fp32 math:
    rtol = 4 * unit roundoff (at least 1e-5 for fp32), atol = rtol * max|grad_ref| (tiny entries), plus
    2^-24 for fp16: below 2^-14 fp16 is subnormal with a fixed spacing of 2^-24, so one rounding there
    has an absolute, not relative, error (a (1, 1) fp16 gradient can be subnormal).
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

import cbkernels

GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}
LOSS_RTOL = 2e-5


def make_inputs(n, c, dtype, device, *, scale=3.0, ignore_frac=0.2, weighted=True, target_dtype=torch.int64,
                ignore_index=-100, noncontiguous=False, generator=None):
    g = generator if generator is not None else torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    if noncontiguous:  # every other column of a wider tensor: row stride != C
        base = torch.randn(n, 2 * c, generator=g, dtype=torch.float64) * scale
        logits = base.to(dtype).to(device)[:, ::2]
    else:
        logits = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    target = torch.randint(0, c, (n,), generator=g)
    if n >= 2:  # the edges of the class range always appear
        target[0], target[-1] = 0, c - 1
    ignored = torch.rand(n, generator=g) < ignore_frac
    if n >= 3:
        ignored[0] = ignored[-1] = False
    target = torch.where(ignored, torch.full_like(target, ignore_index), target).to(target_dtype).to(device)
    weight = (torch.rand(c, generator=g) * 2 + 0.1).to(device) if weighted else None
    return logits, target, weight


def call(loss, logits, target, weight, *, backend, reduction, param=0.0, ignore_index=-100):
    if loss == "softmax":
        return cbkernels.cb_softmax_cross_entropy(logits, target, weight, reduction, ignore_index, param, backend=backend)
    return cbkernels.cb_focal_loss(logits, target, weight, param, reduction, ignore_index, backend=backend)


def loss_and_grad(loss, logits, target, weight, upstream, **kw):
    # detach() keeps the strides and storage offset (clone() would make a dense copy): a non-contiguous or
    # misaligned input reaches the backend as it is.
    x = logits.detach().requires_grad_(True)
    out = call(loss, x, target, weight, **kw)
    grad_out = upstream if out.dim() else upstream.reshape(())
    (gx,) = torch.autograd.grad(out, x, grad_out)
    return out.detach(), gx


def assert_matches_reference(backend, loss, logits, target, weight, *, reduction="mean", param=0.0,
                             ignore_index=-100, upstream_scale=None, unit_upstream=False):
    """Loss and gradient of `backend` vs the float64 reference on the same input values.

    The upstream gradient is random (times upstream_scale), or exactly 1 with unit_upstream (what
    loss.backward() passes, and the case where the fused backward skips its scaling pass).
    """
    n = logits.shape[0]
    g = torch.Generator().manual_seed(1234)
    upstream = torch.randn(n if reduction == "none" else 1, generator=g, dtype=torch.float64)
    if unit_upstream:
        upstream = torch.ones_like(upstream)
    if upstream_scale is not None:
        upstream = upstream * upstream_scale
    if reduction != "none":
        upstream = upstream.reshape(())
    kw = dict(reduction=reduction, param=param, ignore_index=ignore_index)
    out, grad = loss_and_grad(loss, logits, target, weight, upstream.to(torch.float32).to(logits.device),
                              backend=backend, **kw)
    ref_out, ref_grad = loss_and_grad(loss, logits.double().cpu(), target.cpu(),
                                      None if weight is None else weight.double().cpu(), upstream,
                                      backend="reference", **kw)
    assert out.dtype == torch.float32, out.dtype
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    out, grad = out.double().cpu(), grad.double().cpu()
    assert not torch.isnan(out).any() and not torch.isnan(grad).any(), "NaN from finite inputs"

    scale = float(ref_out.abs().max()) if ref_out.numel() else 0.0
    torch.testing.assert_close(out, ref_out, rtol=LOSS_RTOL, atol=1e-6 * scale + 1e-12,
                               msg=lambda m: f"{backend} {loss} loss: {m}")
    rtol = GRAD_RTOL[logits.dtype]
    atol = rtol * (float(ref_grad.abs().max()) if ref_grad.numel() else 0.0) + (2.0**-24 if logits.dtype == torch.float16 else 1e-30)
    torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=atol, msg=lambda m: f"{backend} {loss} grad: {m}")
    ignored = target.cpu() == ignore_index
    assert (grad[ignored] == 0).all(), "ignored rows must get exactly zero gradient"


def run_under_cpu_capability(script: str, capability: str) -> None:
    """Runs `script` in a fresh interpreter with ATEN_CPU_CAPABILITY=capability (ATen's override, which the
    CPU extension follows when it picks its instruction-set variant), the tests folder on sys.path and the
    capability checked to have taken effect; fails with the child's stderr if the script fails."""
    prologue = ("import sys, torch\n"
                "sys.path.insert(0, sys.argv[1])\n"
                "assert torch.backends.cpu.get_cpu_capability() == sys.argv[2].upper(), "
                "torch.backends.cpu.get_cpu_capability()\n")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    result = subprocess.run([sys.executable, "-c", prologue + script, tests_dir, capability], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
