"""Hostile numerics on every backend pair (the `backend` fixture: CPU, Triton and, on a GPU machine, the CUDA
pairs, which carry pytest.mark.gpu), against the reference backend in float64.

Non-finite logits (decided from the float64 reference, documented in docs/guarantees.md):
  - NaN in a non-ignored row: that row's loss is NaN and the gradient is NaN where the NaN sits
    (softmax: the whole row, every entry depends on the logsumexp); other rows are unaffected.
  - +-inf: where the reference's value is finite (a -inf non-target logit used as a class mask in
    softmax; +inf on the true class or -inf on a negative in the sigmoid family) the backend must give
    that finite value. Where the reference is not finite, the backend must not be finite either. Never
    a silently wrong finite number.
  - Ignored rows give loss 0 and gradient 0 whatever their logits (NaN, inf).
Losses come from the registry (cases.loss_cases); what differs between kernel families (which +-inf limits
are required, whether a NaN spreads over the row) is keyed by the family, the kernel's math.
"""
import math

import pytest
import torch

import cbkernels as cb
from cases import (GRAD_RTOL, LOSS_RTOL, REDUCTIONS, assert_finite_means_right, assert_grad_close,
                   assert_loss_close, assert_matches_reference, call, loss_cases, make_inputs)
from cbkernels import losses

INF, NAN = math.inf, math.nan
ROW_COUPLED = {"softmax_ce", "softmax_focal"}  # families whose every gradient entry depends on every logit of the row (lse)


def _rows_and_grad(backend, spec, hyper, logits, target, weight, upstream):
    """Per-row losses and d(sum_i upstream_i * loss_i)/d logits, as float64 on the CPU."""
    x = logits.detach().clone().requires_grad_(True)
    rows = call(spec, x, target, weight, backend=backend, reduction="none", hyper=hyper)
    (grad,) = torch.autograd.grad(rows, x, upstream.to(rows.dtype).to(rows.device))
    return rows.detach().double().cpu(), grad


def _both(backend, spec, hyper, logits, target, weight=None):
    """(rows, grad) of the backend on its device and of the float64 reference on the CPU."""
    upstream = torch.linspace(0.5, 1.5, logits.shape[0], dtype=torch.float64)
    device = backend.device
    got = _rows_and_grad(backend, spec, hyper, logits.to(device), target.to(device),
                         None if weight is None else weight.to(device), upstream.float())
    ref = _rows_and_grad("reference", spec, hyper, logits.double(), target,
                         None if weight is None else weight.double(), upstream)
    return got, ref


# --- NaN ---------------------------------------------------------------------------------------------

def _nan_case(num_classes, nan_at_target, dtype):
    logits = torch.randn(5, num_classes).to(dtype)
    target = torch.tensor([0, num_classes - 1, 1 % num_classes, num_classes // 2, -100])
    rows_with_nan = {1: num_classes - 1 if nan_at_target else 0, 3: num_classes - 1}  # incl. first / last column
    for row, col in rows_with_nan.items():
        logits[row, col] = NAN
    logits[4, 1], logits[4, 2] = NAN, INF  # an ignored row: loss 0 and gradient 0 regardless
    return logits, target, rows_with_nan


@pytest.mark.parametrize("spec,hyper", loss_cases(full=False))
@pytest.mark.parametrize("nan_at_target", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_nan_logit_gives_nan_for_its_row_only(backend, spec, hyper, nan_at_target, dtype):
    # C = 37 spans a 16- and an 8-wide vector body plus a scalar tail.
    _, num_classes = backend.pick((5, 37), (5, 5))
    logits, target, nan_rows = _nan_case(num_classes, nan_at_target, dtype)
    (rows, grad), (ref_rows, ref_grad) = _both(backend, spec, hyper, logits, target, torch.rand(num_classes) + 0.5)
    grad = grad.double().cpu()
    for row, col in nan_rows.items():
        assert torch.isnan(rows[row]), f"row {row}: NaN logit gave loss {rows[row]}, not NaN"
        assert torch.isnan(grad[row, col]), f"row {row}: NaN logit gave gradient {grad[row, col]}, not NaN"
        if spec.family.name in ROW_COUPLED:
            assert torch.isnan(grad[row]).all(), "softmax: every gradient entry depends on the NaN"
        else:  # independent binary terms: as in the reference, only the NaN entries' gradients are NaN
            assert torch.equal(torch.isnan(grad[row]), torch.isnan(logits[row].double())), grad[row]
    assert rows[4] == 0 and (grad[4] == 0).all(), "ignored row with NaN/inf logits: loss and gradient exactly 0"
    clean = [r for r in range(5) if r not in nan_rows]
    assert_loss_close(rows[clean], ref_rows[clean], f"{backend.id} clean rows")
    assert_grad_close(grad[clean], ref_grad[clean], dtype, f"{backend.id} clean rows")


# --- inf ---------------------------------------------------------------------------------------------

# (name, row of logits (class 0 is the target), families that must give the reference's finite limit).
# Required where the limit is of practical use: a -inf logit masks a class out (every loss), and a +inf
# true-class logit in the sigmoid family is a term of exactly 0. Elsewhere the general rule applies:
# non-finite, or exactly the reference's value (softmax with z_y = +inf: the reference's limit is loss 0,
# gradient 0, while a kernel's z - max = inf - inf gives NaN; both are allowed).
ALL_FAMILIES = {family.name for family in losses.FAMILIES}
INF_ROWS = [
    ("target_plus_inf", [INF, 1.0, -2.0, 3.0], {"sigmoid_focal"}),
    ("target_minus_inf", [-INF, 1.0, -2.0, 3.0], set()),
    ("negative_plus_inf", [0.5, INF, -2.0, 3.0], set()),
    ("negative_minus_inf", [0.5, -INF, -2.0, 3.0], ALL_FAMILIES),
    ("all_minus_inf", [-INF, -INF, -INF, -INF], set()),
    ("all_plus_inf", [INF, INF, INF, INF], set()),
]


@pytest.mark.parametrize("spec,hyper", loss_cases(full=False))
@pytest.mark.parametrize("case", INF_ROWS, ids=[c[0] for c in INF_ROWS])
def test_inf_logits_follow_the_reference_limit(backend, spec, hyper, case):
    name, row, required = case
    logits = torch.tensor([row, [0.3, -0.2, 0.1, 0.9]])  # a clean second row must stay right
    target = torch.tensor([0, 2])
    (rows, grad), (ref_rows, ref_grad) = _both(backend, spec, hyper, logits, target, torch.tensor([1.5, 0.5, 2.0, 1.0]))
    if spec.family.name in required:
        assert torch.isfinite(ref_rows[0]) and torch.isfinite(ref_grad[0]).all(), "the reference lost this limit"
        assert torch.isfinite(rows[0]) and torch.isfinite(grad[0]).all(), f"{name}: got {rows[0]}, {grad[0]}"
    what = f"{backend.id} {spec.name} {name}"
    assert_finite_means_right(rows, ref_rows, f"{what} loss")
    assert_finite_means_right(grad, ref_grad, f"{what} grad", grad_dtype=torch.float32)
    assert_loss_close(rows[1], ref_rows[1], f"{what} clean row")


@pytest.mark.parametrize("spec,hyper", loss_cases())
def test_minus_inf_class_mask(backend, spec, hyper):
    # A -inf non-target logit masks its class out: finite and equal to the reference where the reference is
    # finite. With label smoothing the target puts mass eps/C on every class, so the softmax loss is +inf:
    # the backend must not be finite there either (the sigmoid family has no such coupling).
    logits = torch.tensor([[0.5, -INF, -2.0, 3.0], [1.0, 0.25, -INF, -INF]])
    target = torch.tensor([0, 1])
    (rows, grad), (ref_rows, ref_grad) = _both(backend, spec, hyper, logits, target, torch.tensor([1.5, 0.5, 2.0, 1.0]))
    what = f"{backend.id} {spec.name} {hyper}"
    assert_finite_means_right(rows, ref_rows, f"{what} loss")
    assert_finite_means_right(grad, ref_grad, f"{what} grad", grad_dtype=torch.float32)
    finite = torch.isfinite(ref_rows)
    assert torch.isfinite(rows[finite]).all(), f"{what}: a masked class made a finite loss non-finite: {rows}"


# --- large finite logits -----------------------------------------------------------------------------

def _extreme_logits(value, dtype, num_classes):
    signs = torch.where(torch.rand(6, num_classes) < 0.5, -1.0, 1.0)
    logits = signs * value
    logits[:, 1] = 0.0  # mixed with ordinary values
    logits[1] = value  # a row of equal maxima
    return logits.to(dtype), torch.tensor([0, 1, num_classes - 1, 2, 0, num_classes - 1])


@pytest.mark.parametrize("spec,hyper", loss_cases(full=False))
@pytest.mark.parametrize("value,dtype", [(1e4, torch.float32), (1e4, torch.bfloat16), (1e4, torch.float16),
                                         (65504.0, torch.float16)], ids=str)
def test_large_finite_logits_match_reference(backend, spec, hyper, value, dtype):
    # fp16's largest finite value is 65504: softplus and logsumexp of it must not overflow in fp32.
    # Gradient tolerance: the dtype's rounding plus the fp32 logsumexp's own error. lse ~ |z| carries an
    # absolute error of ~|z| 2^-24 and softmax(z) = exp(z - lse) inherits it as a relative error (torch's
    # logsumexp backward, hence the reference backend in fp32, does the same), so the bound widens by
    # 4 |z| 2^-24: 2.4e-3 at 1e4, 1.6e-2 at 65504. It still catches overflow, NaN and wrong saturation.
    _, num_classes = backend.pick((6, 33), (6, 5))
    logits, target = _extreme_logits(value, dtype, num_classes)
    weight = torch.rand(num_classes) + 0.5
    for case in spec.test_cases():  # every tested hyperparameter value of this loss
        (rows, grad), (ref_rows, ref_grad) = _both(backend, spec, case, logits, target, weight)
        assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
        assert_loss_close(rows, ref_rows, f"{backend.id} {spec.name} {case}")
        assert_grad_close(grad, ref_grad, dtype, f"{backend.id} {spec.name} {case}", extra_rtol=4 * value * 2.0**-24)


# --- all rows ignored --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,hyper", loss_cases())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored_gives_zero_not_nan(backend, spec, hyper, reduction):
    # NaN and inf logits in ignored rows must not leak either.
    logits = torch.tensor([[NAN, 1.0, 2.0], [INF, -INF, 0.0], [1.0, 2.0, 3.0]], device=backend.device)
    logits.requires_grad_(True)
    target = torch.full((3,), -100, device=backend.device)
    out = call(spec, logits, target, torch.ones(3, device=backend.device), backend=backend, reduction=reduction,
               hyper=hyper)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    assert out.dtype == torch.float32 and torch.equal(out, torch.zeros_like(out)), out
    assert torch.equal(grad, torch.zeros_like(grad)), grad


# --- gamma and beta sweeps ---------------------------------------------------------------------------

GAMMAS = [0.0, 0.25, 0.5, 1.0, 2.0, 5.0]
WITH_GAMMA = [spec for spec in losses.LOSSES if "gamma" in spec.hyperparameter_names]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gamma", GAMMAS)
def test_gamma_sweep(backend, gamma, dtype):
    n, c = backend.pick((9, 70), (3, 5))
    logits, target, weight = make_inputs(n, c, dtype, backend.device)
    logits[0, :3] = 0.0  # u = 0: where the focal gradient's (1 - p)^gamma factor has its kink for gamma < 1
    assert WITH_GAMMA, "no registered loss has a gamma"
    for spec in WITH_GAMMA:
        for reduction in ("mean", "none"):
            assert_matches_reference(backend, spec, {**spec.defaults(), "gamma": gamma}, logits, target, weight,
                                     reduction=reduction)


COUNTS = [5000, 1200, 300, 40, 7, 1]


@pytest.mark.parametrize("loss_type", losses.LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.9, 0.999, 0.9999, 1.0])
def test_beta_sweep_through_the_module(backend, beta, loss_type):
    module = cb.ClassBalancedLoss(COUNTS, loss_type, beta=beta, gamma=0.5, backend=backend.name).to(backend.device)
    weight = module.class_weight.cpu()
    assert torch.isfinite(weight).all() and (weight > 0).all()
    torch.testing.assert_close(weight.sum(), torch.tensor(float(len(COUNTS))), rtol=1e-6, atol=0)
    counts = torch.tensor(COUNTS, dtype=torch.float64)
    if beta == 0.0:  # no re-weighting
        torch.testing.assert_close(weight, torch.ones(len(COUNTS)), rtol=1e-6, atol=0)
    if beta == 1.0:  # inverse frequency
        expected = (1 / counts) / (1 / counts).sum() * len(COUNTS)
        torch.testing.assert_close(weight.double(), expected, rtol=1e-6, atol=0)
    logits, target, _ = make_inputs(8, len(COUNTS), torch.float32, backend.device)
    x = logits.clone().requires_grad_(True)
    out = module(x, target)
    (grad,) = torch.autograd.grad(out, x)
    reference = cb.ClassBalancedLoss(COUNTS, loss_type, beta=beta, gamma=0.5, backend="reference").double()
    xr = logits.double().cpu().requires_grad_(True)
    ref = reference(xr, target.cpu())
    (ref_grad,) = torch.autograd.grad(ref, xr)
    assert_loss_close(out, ref, f"{backend.id} {loss_type} beta={beta}")
    assert_grad_close(grad, ref_grad, torch.float32, f"{backend.id} {loss_type} beta={beta}")


# --- confident predictions in bf16 -------------------------------------------------------------------

# z_y = margin, others 0: 1 - p_y is about (C-1) e^-margin (softmax) or e^-margin (sigmoid), far below
# bf16's epsilon 2^-8, so forming p_y in bf16 (or 1 - p) rounds the true-class gradient -(1 - p_y) * alpha
# to 0. Softmax: 1 - p_y ~ 1e-12 at margin 30 (the classic failure). Sigmoid: q = e^-margin straight from
# e = exp(-|u|), so even margin 80 (2e-35) must hold. Focal (gamma > 0): the true-class gradient
# ~ (1 + gamma) q^(1 + gamma) leaves fp32's normal range (2^-126) beyond margin ~87 / (1 + gamma), where it
# may flush to 0 legitimately: such (loss, margin) pairs are skipped, decided from the reference.
MARGINS = [10.0, 20.0, 30.0, 80.0]
FP32_NORMAL_MIN = 2.0**-126


@pytest.mark.parametrize("spec,hyper", loss_cases(full=False))
@pytest.mark.parametrize("margin", MARGINS)
def test_confident_true_class_gradient_keeps_bf16_precision(backend, spec, hyper, margin):
    # Each entry must keep bf16's relative precision on its own value (atol 0).
    num_classes = 24 if backend.fits(2, 24) else 4
    logits = torch.zeros(2, num_classes, dtype=torch.bfloat16)
    logits[0, 0] = margin
    logits[1, num_classes - 1] = margin
    target = torch.tensor([0, num_classes - 1])
    weight = torch.linspace(0.5, 2.0, num_classes)
    (rows, grad), (ref_rows, ref_grad) = _both(backend, spec, hyper, logits, target, weight)
    ref_true = ref_grad[[0, 1], [0, num_classes - 1]]
    if ref_true.abs().min() < FP32_NORMAL_MIN:
        pytest.skip(f"{spec.name} {hyper} at margin {margin}: the exact true-class gradient {ref_true.tolist()} "
                    "leaves fp32's normal range (may flush to 0)")
    grad = grad.double().cpu()
    true_class = grad[[0, 1], [0, num_classes - 1]]
    assert (true_class < 0).all(), f"true-class gradient rounded away: {true_class}"
    torch.testing.assert_close(grad, ref_grad, rtol=GRAD_RTOL[torch.bfloat16], atol=0)
    # The softmax loss lse - z_y cancels in fp32: its absolute error is ~ |z_y| 2^-24 (the contract's
    # formula), so the loss is held to that, not to a relative bound on its tiny value.
    torch.testing.assert_close(rows, ref_rows, rtol=LOSS_RTOL, atol=2.0**-22 * margin * float(weight.max()))


def test_target_masked_with_minus_inf_gives_plus_inf_not_nan(backend):
    """A target class masked out with -inf: p_y = 0, so the loss is +inf on every backend and for every
    loss (a NaN would hide which rows went wrong); the rows around it keep their finite values."""
    logits = torch.tensor([[float("-inf"), 0.0, 1.0], [0.0, 1.0, 2.0]], device=backend.device)
    target = torch.tensor([0, 1], device=backend.device)
    for spec in losses.LOSSES:
        rows = call(spec, logits, target, backend=backend.name, reduction="none")
        assert rows[0].item() == float("inf"), (spec.name, rows)
        assert torch.isfinite(rows[1]), (spec.name, rows)
