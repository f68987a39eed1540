"""torch.compile and the backward strategies, on every kernel pair (the `kernel_backend` fixture: CPU and
Triton here; the CUDA pairs carry pytest.mark.gpu and run by `make gpu-check`).

- torch.compile(fullgraph=True) of the public functions of every registered loss: no graph break, and the
  losses AND the gradient match the float64 reference (the tolerance table of cases.py), not merely the
  eager result (which would pass a bug shared by both paths).
- A second backward through one graph (retain_graph=True): eagerly, "recompute" allows it and "fused"
  raises naming CBKERNELS_BACKWARD=recompute, with the first gradient untouched; under torch.compile both
  strategies allow it (docs/guarantees.md), and the gradient doubles.
"""
import os

import pytest
import torch

from cases import GRAD_RTOL, REDUCTIONS, assert_grad_close, assert_loss_close, call, make_inputs
from cbkernels import losses

SLOW = os.environ.get("CBKERNELS_SLOW") == "1"


def _all_losses(backend):
    """f(x, target, weight) -> the registered losses stacked, each at the last tested value of its
    hyperparameters, reductions taking turns ("none" summed over its rows)."""

    def fn(x, t, w):
        out = []
        for i, spec in enumerate(losses.LOSSES):
            reduction = REDUCTIONS[i % len(REDUCTIONS)]
            value = call(spec, x, t, w, backend=backend, reduction=reduction, hyper=spec.test_cases()[-1])
            out.append(value.sum() if reduction == "none" else value)
        return torch.stack(out)

    return fn


def _inputs(backend, dtype):
    n, c = backend.pick((64, 1000), (4, 9))
    return make_inputs(n, c, dtype, backend.device)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_losses_and_gradient_match_reference(kernel_backend, compiler, dtype):
    if compiler == "inductor" and kernel_backend.device == "cpu" and not SLOW:
        pytest.skip("inductor on CPU tensors compiles C++ (slow); set CBKERNELS_SLOW=1 to run")
    torch._dynamo.reset()
    logits, target, weight = _inputs(kernel_backend, dtype)
    upstream = torch.tensor([1.0, -0.5, 2.0][:len(losses.LOSSES)] + [1.0] * max(0, len(losses.LOSSES) - 3))
    compiled = torch.compile(_all_losses(kernel_backend), fullgraph=True, backend=compiler)
    x = logits.clone().requires_grad_(True)
    out = compiled(x, target, weight)
    (grad,) = torch.autograd.grad(out, x, upstream.to(out.device))
    xr = logits.detach().double().cpu().requires_grad_(True)
    ref = _all_losses("reference")(xr, target.cpu(), weight.double().cpu())
    (ref_grad,) = torch.autograd.grad(ref, xr, upstream.double())
    what = f"{kernel_backend.id} compiled ({compiler}) {dtype}"
    assert_loss_close(out, ref, f"{what} losses")
    # The three losses' gradients are summed into one tensor of the logits' dtype: compiled code may add
    # them in another order, or in fp32 before one rounding, so up to three roundings of the dtype.
    assert_grad_close(grad, ref_grad, dtype, f"{what} grad", extra_rtol=2 * GRAD_RTOL[dtype])


def _sum_of_losses(backend):
    fn = _all_losses(backend)
    return lambda x, t, w: fn(x, t, w).sum()


def test_backward_twice_eager(kernel_backend):
    logits, target, weight = _inputs(kernel_backend, torch.float32)
    x = logits.clone().requires_grad_(True)
    out = _sum_of_losses(kernel_backend)(x, target, weight)
    out.backward(retain_graph=True)
    first = x.grad.clone()
    if kernel_backend.strategy == "fused":
        with pytest.raises(RuntimeError, match="CBKERNELS_BACKWARD=recompute"):
            out.backward()
        torch.testing.assert_close(x.grad, first, rtol=0, atol=0)  # the first gradient is untouched
    else:
        out.backward()
        torch.testing.assert_close(x.grad, 2 * first)


def test_backward_twice_under_compile(kernel_backend):
    torch._dynamo.reset()
    logits, target, weight = _inputs(kernel_backend, torch.float32)
    compiled = torch.compile(_sum_of_losses(kernel_backend), fullgraph=True, backend="aot_eager")
    x = logits.clone().requires_grad_(True)
    out = compiled(x, target, weight)
    out.backward(retain_graph=True)
    first = x.grad.clone()
    out.backward()
    torch.testing.assert_close(x.grad, 2 * first, rtol=1e-6, atol=0)
