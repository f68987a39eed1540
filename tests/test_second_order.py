"""Second-order gradients and repeated backward passes: never a silently wrong value.

The kernel backends' gradient is computed by the kernels, not by differentiable torch ops, so a backward
run with create_graph=True (input-gradient penalties, double backprop) is refused with an error that
points to backend="reference", whose plain autograd differentiates twice correctly (checked here against
torch.autograd.gradgradcheck). A second backward through a retained graph is a different pattern with
its own error under the "fused" strategy.
"""
import pytest
import torch

import cbkernels as cb
from cbkernels import losses


def _inputs(device, dtype=torch.float32):
    logits = torch.randn(5, 7, dtype=dtype, device=device)
    target = torch.tensor([0, 6, 3, -100, 2], device=device)
    return logits, target, (torch.rand(7) + 0.1).to(device)


@pytest.mark.parametrize("spec", losses.LOSSES, ids=lambda s: s.name)
def test_create_graph_is_refused_by_kernel_backends(spec, kernel_backend):
    logits, target, weight = _inputs(kernel_backend.device)
    x = logits.requires_grad_(True)
    loss = getattr(cb, spec.function)(x, target, weight, backend=kernel_backend.name)
    with pytest.raises(RuntimeError, match="create_graph=True .* not supported .* backend='reference'"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("spec", losses.LOSSES, ids=lambda s: s.name)
def test_reference_backend_gives_correct_second_order_gradients(spec):
    logits, target, weight = _inputs("cpu", torch.float64)
    hyper = {h.name: 0.5 if h.name == "gamma" else 0.1 for h in spec.hyperparameters}
    function = getattr(cb, spec.function)

    def loss(x):
        return function(x, target, weight.double(), backend="reference", **hyper)

    assert torch.autograd.gradgradcheck(loss, (logits.requires_grad_(True),))
    # An input-gradient penalty through the public function equals the same penalty through the spec.
    x = logits.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(x), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), x)
    y = logits.detach().requires_grad_(True)
    (h,) = torch.autograd.grad(spec.reference(y, target, weight.double(), **hyper), y, create_graph=True)
    (hh,) = torch.autograd.grad(h.square().sum(), y)
    torch.testing.assert_close(gg, hh)


def test_second_backward_through_a_retained_graph_names_its_cause(monkeypatch):
    if "cpu" not in cb.available_backends("cpu"):
        pytest.skip("the C++ CPU kernels are not built")
    monkeypatch.setenv("CBKERNELS_BACKWARD", "fused")
    logits, target, weight = _inputs("cpu")
    x = logits.requires_grad_(True)
    loss = cb.cb_focal_loss(x, target, weight, backend="cpu")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"backward\(retain_graph=True\) called twice.*CBKERNELS_BACKWARD=recompute"):
        loss.backward()
    monkeypatch.setenv("CBKERNELS_BACKWARD", "recompute")
    y = logits.detach().requires_grad_(True)
    loss = cb.cb_focal_loss(y, target, weight, backend="cpu")
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(y.grad, 2 * x.grad)
