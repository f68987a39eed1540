"""Hostile numerics on every available backend, against reference.py in float64.

Non-finite logits (decided from the float64 reference, documented in docs/guarantees.md):
  - NaN in a non-ignored row: that row's loss is NaN and the gradient is NaN where the NaN sits
    (softmax: the whole row, every entry depends on the logsumexp); other rows are unaffected.
  - +-inf: where the reference's value is finite (a -inf non-target logit used as a class mask in
    softmax; +inf on the true class or -inf on a negative in the sigmoid family) the backend must give
    that finite value. Where the reference is not finite, the backend must not be finite either. Never
    a silently wrong finite number.
  - Ignored rows give loss 0 and gradient 0 whatever their logits (NaN, inf).
"""
import math

import pytest
import torch

import cbkernels as cb
from backend_cases import GRAD_RTOL, LOSS_RTOL, assert_matches_reference, make_inputs

BACKENDS = cb.available_backends("cpu")
LOSSES = {"softmax": 0.0, "sigmoid": 0.0, "focal": 2.0}  # loss -> its parameter (label smoothing / gamma)
INF, NAN = math.inf, math.nan


def _family(loss):
    return "softmax" if loss == "softmax" else "focal"


def _rows_and_grad(backend, loss, logits, target, weight, param, upstream):
    """Per-row losses and d(sum_i upstream_i * loss_i)/d logits."""
    x = logits.detach().clone().requires_grad_(True)
    if loss == "softmax":
        rows = cb.cb_softmax_cross_entropy(x, target, weight, "none", -100, param, backend=backend)
    else:
        rows = cb.cb_focal_loss(x, target, weight, param, "none", -100, backend=backend)
    (grad,) = torch.autograd.grad(rows, x, upstream.to(rows.dtype))
    return rows.detach().double(), grad.double()


def _both(backend, loss, logits, target, weight=None, param=None):
    param = LOSSES[loss] if param is None else param
    upstream = torch.linspace(0.5, 1.5, logits.shape[0], dtype=torch.float64)
    got = _rows_and_grad(backend, loss, logits, target, weight, param, upstream.float())
    ref = _rows_and_grad("reference", loss, logits.double(), target, None if weight is None else weight.double(),
                         param, upstream)
    return got, ref


def _assert_finite_means_right(got, ref, rtol, what):
    """Elementwise: a finite result must be the reference's (finite) value; a non-finite reference
    must give a non-finite result."""
    ref_finite, got_finite = torch.isfinite(ref), torch.isfinite(got)
    assert not (got_finite & ~ref_finite).any(), (
        f"{what}: finite result where the reference is not finite:\n got {got}\n ref {ref}")
    both = got_finite & ref_finite
    scale = float(ref[both].abs().max()) if both.any() else 0.0
    torch.testing.assert_close(got[both], ref[both], rtol=rtol, atol=rtol * scale + 1e-30, msg=lambda m: f"{what}: {m}")


# --- NaN ---------------------------------------------------------------------------------------------

def _nan_case(num_classes, nan_at_target):
    g = torch.Generator().manual_seed(num_classes)
    logits = torch.randn(4, num_classes, generator=g)
    target = torch.tensor([0, num_classes - 1, 1 % num_classes, num_classes // 2])
    rows_with_nan = {1: num_classes - 1 if nan_at_target else 0, 3: num_classes - 1}  # incl. first / last column
    for row, col in rows_with_nan.items():
        logits[row, col] = NAN
    return logits, target, rows_with_nan


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("nan_at_target", [True, False])
def test_nan_logit_gives_nan_for_its_row_only(loss, backend, nan_at_target):
    # C = 37 spans a 16- and an 8-wide vector body plus a scalar tail; triton's interpreter gets C = 5.
    num_classes = 5 if backend == "triton" else 37
    logits, target, nan_rows = _nan_case(num_classes, nan_at_target)
    (rows, grad), (ref_rows, ref_grad) = _both(backend, loss, logits, target, torch.rand(num_classes) + 0.5)
    for row, col in nan_rows.items():
        assert torch.isnan(rows[row]), f"row {row}: NaN logit gave loss {rows[row]}, not NaN"
        assert torch.isnan(grad[row, col]), f"row {row}: NaN logit gave gradient {grad[row, col]}, not NaN"
        if loss == "softmax":
            assert torch.isnan(grad[row]).all(), "softmax: every gradient entry depends on the NaN"
    clean = [r for r in range(4) if r not in nan_rows]
    torch.testing.assert_close(rows[clean], ref_rows[clean], rtol=LOSS_RTOL, atol=1e-6)
    torch.testing.assert_close(grad[clean], ref_grad[clean], rtol=1e-5, atol=1e-6)


# --- inf ---------------------------------------------------------------------------------------------

# (name, row of logits (class 0 is the target), losses that must give the reference's finite limit).
# Required where the limit is of practical use: a -inf logit masks a class out (every loss), and a +inf
# true-class logit in the sigmoid family is a term of exactly 0. Elsewhere the general rule applies:
# non-finite, or exactly the reference's value (softmax with z_y = +inf: the reference's limit is loss 0,
# gradient 0, while a kernel's z - max = inf - inf gives NaN; both are allowed).
INF_ROWS = [
    ("target_plus_inf", [INF, 1.0, -2.0, 3.0], {"sigmoid", "focal"}),
    ("target_minus_inf", [-INF, 1.0, -2.0, 3.0], set()),
    ("negative_plus_inf", [0.5, INF, -2.0, 3.0], set()),
    ("negative_minus_inf", [0.5, -INF, -2.0, 3.0], {"softmax", "sigmoid", "focal"}),
    ("all_minus_inf", [-INF, -INF, -INF, -INF], set()),
    ("all_plus_inf", [INF, INF, INF, INF], set()),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("case", INF_ROWS, ids=[c[0] for c in INF_ROWS])
def test_inf_logits_follow_the_reference_limit(case, loss, backend):
    name, row, required = case
    logits = torch.tensor([row, [0.3, -0.2, 0.1, 0.9]])  # a clean second row must stay right
    target = torch.tensor([0, 2])
    (rows, grad), (ref_rows, ref_grad) = _both(backend, loss, logits, target, torch.tensor([1.5, 0.5, 2.0, 1.0]))
    if loss in required:
        assert torch.isfinite(ref_rows[0]) and torch.isfinite(ref_grad[0]).all(), "the reference lost this limit"
        assert torch.isfinite(rows[0]) and torch.isfinite(grad[0]).all(), f"{name}: got {rows[0]}, {grad[0]}"
    _assert_finite_means_right(rows, ref_rows, LOSS_RTOL, f"{backend} {loss} {name} loss")
    _assert_finite_means_right(grad, ref_grad, 1e-5, f"{backend} {loss} {name} grad")
    torch.testing.assert_close(rows[1], ref_rows[1], rtol=LOSS_RTOL, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_class_mask_with_label_smoothing_is_infinite(backend):
    # Smoothing puts target mass eps/C on every class, so a -inf (masked) class makes the softmax loss
    # +inf (the sigmoid family has no such coupling: see the table above).
    logits = torch.tensor([[0.5, -INF, -2.0, 3.0]])
    (rows, _), (ref_rows, _) = _both(backend, "softmax", logits, torch.tensor([0]), param=0.1)
    assert ref_rows[0] == INF and not torch.isfinite(rows[0])


# --- large finite logits -----------------------------------------------------------------------------

def _extreme_logits(value, dtype, num_classes):
    g = torch.Generator().manual_seed(5)
    signs = torch.where(torch.rand(6, num_classes, generator=g) < 0.5, -1.0, 1.0)
    logits = signs * value
    logits[:, 1] = 0.0  # mixed with ordinary values
    logits[1] = value  # a row of equal maxima
    return logits.to(dtype), torch.tensor([0, 1, num_classes - 1, 2, 0, num_classes - 1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("value,dtype", [(1e4, torch.float32), (1e4, torch.bfloat16), (1e4, torch.float16),
                                         (65504.0, torch.float16)])
def test_large_finite_logits_match_reference(value, dtype, loss, backend):
    # fp16's largest finite value is 65504: softplus and logsumexp of it must not overflow in fp32.
    # Gradient tolerance: the dtype's rounding plus the fp32 logsumexp's own error. lse ~ |z| carries an
    # absolute error of ~|z| 2^-24 and softmax(z) = exp(z - lse) inherits it as a relative error (torch's
    # logsumexp backward, hence the reference backend in fp32, does the same), so the bound widens by
    # 4 |z| 2^-24: 2.4e-3 at 1e4, 1.6e-2 at 65504. It still catches overflow, NaN and wrong saturation.
    # (exp((z - m) - log s), with z - m exact, would keep the plain dtype tolerance.)
    num_classes = 5 if backend == "triton" else 33
    logits, target = _extreme_logits(value, dtype, num_classes)
    weight = torch.rand(num_classes, generator=torch.Generator().manual_seed(6)) + 0.5
    rtol = GRAD_RTOL[dtype] + 4 * value * 2.0**-24
    for param in ([LOSSES[loss], 0.5] if loss != "sigmoid" else [0.0]):
        (rows, grad), (ref_rows, ref_grad) = _both(backend, loss, logits, target, weight, param)
        assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(rows, ref_rows, rtol=LOSS_RTOL, atol=1e-6 * float(ref_rows.abs().max()))
        torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=rtol * float(ref_grad.abs().max()))


# --- all rows ignored --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_gives_zero_not_nan(reduction, loss, backend):
    # NaN and inf logits in ignored rows must not leak either.
    logits = torch.tensor([[NAN, 1.0, 2.0], [INF, -INF, 0.0], [1.0, 2.0, 3.0]]).requires_grad_(True)
    target = torch.full((3,), -100)
    if loss == "softmax":
        out = cb.cb_softmax_cross_entropy(logits, target, torch.ones(3), reduction, backend=backend)
    else:
        out = cb.cb_focal_loss(logits, target, torch.ones(3), LOSSES[loss], reduction, backend=backend)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    assert out.dtype == torch.float32 and torch.equal(out, torch.zeros_like(out)), out
    assert torch.equal(grad, torch.zeros_like(grad)), grad


# --- gamma and beta sweeps ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 1.0, 2.0, 5.0])
def test_gamma_sweep(gamma, dtype, backend):
    n, c = (3, 5) if backend == "triton" else (9, 70)
    logits, target, weight = make_inputs(n, c, dtype, "cpu", generator=torch.Generator().manual_seed(11))
    logits[0, :3] = 0.0  # u = 0: where the focal gradient's (1 - p)^gamma factor has its kink for gamma < 1
    for reduction in ("mean", "none"):
        assert_matches_reference(backend, "focal", logits, target, weight, reduction=reduction, param=gamma)


COUNTS = [5000, 1200, 300, 40, 7, 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["softmax", "sigmoid", "focal"])
@pytest.mark.parametrize("beta", [0.0, 0.9, 0.999, 0.9999, 1.0])
def test_beta_sweep_through_the_module(beta, loss_type, backend):
    module = cb.ClassBalancedLoss(COUNTS, loss_type, beta=beta, gamma=0.5, backend=backend)
    weight = module.class_weight
    assert torch.isfinite(weight).all() and (weight > 0).all()
    torch.testing.assert_close(weight.sum(), torch.tensor(float(len(COUNTS))), rtol=1e-6, atol=0)
    counts = torch.tensor(COUNTS, dtype=torch.float64)
    if beta == 0.0:  # no re-weighting
        torch.testing.assert_close(weight, torch.ones(len(COUNTS)), rtol=1e-6, atol=0)
    if beta == 1.0:  # inverse frequency
        expected = (1 / counts) / (1 / counts).sum() * len(COUNTS)
        torch.testing.assert_close(weight.double(), expected, rtol=1e-6, atol=0)
    logits, target, _ = make_inputs(8, len(COUNTS), torch.float32, "cpu", generator=torch.Generator().manual_seed(3))
    x = logits.clone().requires_grad_(True)
    out = module(x, target)
    (grad,) = torch.autograd.grad(out, x)
    reference = cb.ClassBalancedLoss(COUNTS, loss_type, beta=beta, gamma=0.5, backend="reference").double()
    xr = logits.double().requires_grad_(True)
    ref = reference(xr, target)
    (ref_grad,) = torch.autograd.grad(ref, xr)
    torch.testing.assert_close(out.double(), ref, rtol=LOSS_RTOL, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5 * float(ref_grad.abs().max()))


# --- confident predictions in bf16 -------------------------------------------------------------------

# (loss, its parameter, margins). Softmax: 1 - p_y ~ (C-1) e^-margin, up to margin 30 (2e-12, the
# classic failure). Sigmoid: q = e^-margin straight from e = exp(-|u|), so even margin 80 (2e-35) must
# hold. Focal (gamma 0.5): the true-class gradient ~ (1 + gamma) q^(1 + gamma) stays a normal fp32
# number up to margin 30 (e^-45); beyond it may flush to 0 legitimately.
CONFIDENT = [("softmax", 0.0, m) for m in (10.0, 20.0, 30.0)] + [("sigmoid", 0.0, m) for m in (10.0, 30.0, 80.0)] \
    + [("focal", 0.5, m) for m in (10.0, 30.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss,param,margin", CONFIDENT)
def test_confident_true_class_gradient_keeps_bf16_precision(loss, param, margin, backend):
    # z_y = margin, others 0: 1 - p_y is about (C-1) e^-margin (softmax) or e^-margin (sigmoid), far
    # below bf16's epsilon 2^-8, so forming p_y in bf16 (or 1 - p) rounds the true-class gradient
    # -(1 - p_y) * alpha to 0. Each entry must keep bf16's relative precision on its own value (atol 0).
    num_classes = 4 if backend == "triton" else 24
    logits = torch.zeros(2, num_classes, dtype=torch.bfloat16)
    logits[0, 0] = margin
    logits[1, num_classes - 1] = margin
    target = torch.tensor([0, num_classes - 1])
    weight = torch.linspace(0.5, 2.0, num_classes)
    (rows, grad), (ref_rows, ref_grad) = _both(backend, loss, logits, target, weight, param)
    true_class = grad[[0, 1], [0, num_classes - 1]]
    assert (true_class < 0).all(), f"true-class gradient rounded away: {true_class}"
    torch.testing.assert_close(grad, ref_grad, rtol=GRAD_RTOL[torch.bfloat16], atol=0)
    # The softmax loss lse - z_y cancels in fp32: its absolute error is ~ |z_y| 2^-24 (the contract's
    # formula), so the loss is held to that, not to a relative bound on its tiny value.
    torch.testing.assert_close(rows, ref_rows, rtol=LOSS_RTOL, atol=2.0**-22 * margin * float(weight.max()))
