"""Accuracy, in fp32 ulps, of the CPU kernels' inline exp / log1p (csrc/cpu/vec_math.h) through the ops.

One class per row makes each output a single element-wise term, so the error of the vector math shows
undiluted: sigmoid/focal loss and gradient for u = z from -110 to 110 (exp over its whole range down to
the subnormals, log1p over [0, 1]), and softmax over two classes [0, d] (p = sigmoid(d)). The expected
values are reference.py in float64. Bounds: the maxima over every fp32 z with 2^-10 <= |z| <= 110, measured
exhaustively (one class, t = +1) in the AVX-512, AVX2 and generic builds, with half an ulp or more of
headroom. Loss / gradient ulps: sigmoid 2.80 / 2.83, focal 0.5 5.10 / 6.23, gamma 1 6.02 / 7.39, gamma 2
9.15 / 10.97 (the generic build at z = 6.146; the vector builds 10.62 at z = 1.820), gamma 3.7 77.4 / 78.1;
softmax gradient 1.98 (z = -1.95), loss 1.49. The worst inputs are among those checked here, so every run
checks them. (Earlier bounds came from this file's sample alone, 9.0 ulp for the gamma-2 gradient, and
an unseeded draw in the child processes sometimes hit an fp32 input above them: 10.1 ulp at z = 3.3337.)
The Sleef functions the inline math replaced gave, on that sample, 1.5 / 2.4, 3.5 / 4.5, 4.1 / 5.5,
6.9 / 8.3, 74 / 75 and 8.4.
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
FOCAL_BOUNDS = [(0.0, 3.0, 3.0), (0.5, 5.6, 6.8), (1.0, 6.6, 8.0), (2.0, 9.7, 11.5), (3.7, 82.0, 82.0)]
# The exhaustive scan's worst inputs (argmax of the loss or gradient error, per gamma and build).
WORST_INPUTS = [2.757007598876953, 1.9542444944381714, 3.2135908603668213, 2.494511604309082, 6.744369983673096,
                3.447589159011841, 1.9273138046264648, 5.892563819885254, 1.717761754989624, 1.8201957941055298,
                6.146009922027588, 18.436294555664062, 18.764511108398438, 18.7642822265625, -1.949583649635315,
                -1.9491143226623535, 3.3337128162384033]
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
    worst = torch.tensor(WORST_INPUTS, dtype=torch.float64)
    # Seeded here: the checks also run in child processes (test_other_variants), which no fixture seeds.
    draws = torch.rand(100000, dtype=torch.float64, generator=torch.Generator().manual_seed(20261203))
    values = torch.cat([grid, tiny, -tiny, edges, -edges, worst, (draws - 0.5) * 220])
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
