"""Accuracy, in fp32 ulps, of the CPU kernels' inline exp / log1p (csrc/cpu/vec_math.h) through the ops.

One class per row makes each output a single element-wise term, so the error of the vector math shows
undiluted: sigmoid/focal loss and gradient for u = z from -110 to 110 (exp over its whole range down to
the subnormals, log1p over [0, 1]), and softmax over two classes [0, d] (p = sigmoid(d)). The expected
values are reference.py in float64. Bounds: the measured maxima, over the AVX-512, AVX2 and generic
builds, with a little headroom (measured: sigmoid loss 2.4 / gradient 2.4 ulp, focal 0.5 4.3 / 5.2,
gamma 1 4.9 / 5.8, gamma 2 7.5 / 9.0, gamma 3.7 76 / 75, softmax gradient 1.9; the Sleef functions these
replaced gave 1.5 / 2.4, 3.5 / 4.5, 4.1 / 5.5, 6.9 / 8.3, 74 / 75 and 8.4 on the same inputs).
"""
from __future__ import annotations

import pytest
import torch

from cbkernels import _ops, reference

from cases import run_under_cpu_capability

pytestmark = pytest.mark.skipif(not _ops.extension_has_kernel("CPU"),
                                reason="the C++ extension is not built (pip install -e . builds it)")

# (gamma, loss ulps, gradient ulps). gamma = 3.7 runs the general modulator exp(-gamma * softplus(u)):
# at u ~ 18 its argument is ~67, and the argument's own rounding (half an ulp, relative 2^-25) becomes
# 67 * 2^-25 relative in the result, ~34 ulp, once in the loss and again in the gradient: the exp's
# condition number, not its implementation (Sleef measured the same 74 ulp).
FOCAL_BOUNDS = [(0.0, 3.0, 3.0), (0.5, 5.0, 6.0), (1.0, 6.0, 7.0), (2.0, 8.5, 10.0), (3.7, 82.0, 82.0)]
SOFTMAX_GRAD_BOUND = 3.0


def ulp_error(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """|got - expected| in units of the fp32 spacing at expected (2^-149 in the subnormal range)."""
    magnitude = expected.abs().clamp_min(2.0**-126)
    ulp = torch.exp2(torch.floor(torch.log2(magnitude)) - 23)
    return (got.double() - expected).abs() / ulp


def logits_column() -> torch.Tensor:
    grid = torch.linspace(-110, 110, 200001, dtype=torch.float64)
    tiny = torch.logspace(-40, 2, 10000, dtype=torch.float64)
    edges = torch.tensor([0.0, 87.3, 88.7, 103.97, 104.0, 1e4], dtype=torch.float64)
    values = torch.cat([grid, tiny, -tiny, edges, -edges, (torch.rand(100000, dtype=torch.float64) - 0.5) * 220])
    return values.float().unsqueeze(1)


def check_accuracy() -> None:
    z = logits_column()
    target = torch.zeros(z.shape[0], dtype=torch.long)
    for gamma, loss_bound, grad_bound in FOCAL_BOUNDS:
        loss, grad = torch.ops.cbkernels.sigmoid_focal_forward(z, target, None, gamma, -100, True)
        x = z.double().requires_grad_()
        expected = reference.sigmoid_focal_rows(x, target, None, gamma=gamma)
        expected.sum().backward()
        loss_err, grad_err = ulp_error(loss, expected.detach()), ulp_error(grad, x.grad)
        assert loss_err.max() <= loss_bound, (gamma, loss_err.max().item(), z[loss_err.argmax()].item())
        assert grad_err.max() <= grad_bound, (gamma, grad_err.max().item(), z[grad_err.argmax()].item())

    two_classes = torch.cat([torch.zeros_like(z), z], 1)
    loss, grad = torch.ops.cbkernels.softmax_ce_forward(two_classes, target, None, 0.0, -100, True)
    x = two_classes.double().requires_grad_()
    expected = reference.softmax_rows(x, target, None)
    expected.sum().backward()
    grad_err = ulp_error(grad, x.grad)
    assert grad_err.max() <= SOFTMAX_GRAD_BOUND, (grad_err.max().item(), grad_err.argmax().item())
    # The loss log(1 + e^d) is formed in double from the fp32 sum; below ~1e-6 of scale it is exempt, as
    # everywhere (cases.py): log(s) of s = 1 + 5e-22 is 0.
    significant = expected.detach().abs() > 1e-6
    assert ulp_error(loss[significant], expected.detach()[significant]).max() <= 2.0


def test_native_variant():
    check_accuracy()


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_other_variants(capability):
    """The generic and AVX2 builds of the same functions, chosen through ATen's override."""
    run_under_cpu_capability("import test_cpu_math_accuracy\ntest_cpu_math_accuracy.check_accuracy()\n", capability)
