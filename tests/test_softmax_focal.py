"""The softmax focal loss against float64 formulas written from its definition (issue text, docs/math.md
section 13), independent of reference.py, on every backend pair (the `backend` fixture); its stability on
confident rows; gamma = 0 as the softmax cross entropy; its bad inputs.

    loss_i = alpha_y sum_c q'_c (1 - p_c)^gamma (-log p_c),  p = softmax(z),  q' = (1 - eps) onehot(y) + eps / C

The generic tests (test_matches_reference.py and the others iterating losses.LOSSES) already compare every
backend with reference.py; here the oracle is the plain formula, so a wrong reference cannot pass.
"""
import pytest
import torch
import torch.nn.functional as F

import cbkernels as cb
from cbkernels import losses
from cases import DTYPES, REDUCTIONS, assert_grad_close, assert_loss_close, loss_and_grad, make_inputs

GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)
SMOOTHING = (0.0, 0.1)


def formula_rows(logits, target, weight, gamma, eps, ignore_index=-100):
    """The definition, term by term, in float64 (autograd gives its gradient). Fine for moderate logits:
    1 - p is formed by subtraction, which the confident-row tests below avoid relying on."""
    z = logits.double()
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    p = z.softmax(dim=1)
    q_smooth = (1 - eps) * F.one_hot(safe, z.shape[1]).double() + eps / z.shape[1]
    rows = (q_smooth * (1 - p) ** gamma * -torch.log(p)).sum(dim=1)
    if weight is not None:
        rows = weight.double()[safe] * rows
    return torch.where(valid, rows, torch.zeros_like(rows))


def reduce(rows, target, reduction, ignore_index=-100):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (target != ignore_index).sum().clamp(min=1)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", SMOOTHING)
@pytest.mark.parametrize("gamma", GAMMAS)
def test_matches_the_formula(backend, gamma, eps, dtype, reduction):
    num_classes = 37 if backend.max_elements < 10_000 else 1031  # a tail, and several CPU blocks / GPU tiles
    logits, target, weight = make_inputs(5, num_classes, dtype, backend.device, scale=2.0)
    upstream = torch.randn(5 if reduction == "none" else 1, dtype=torch.float64)
    loss, grad = loss_and_grad(losses.loss("softmax_focal"), logits, target, weight, upstream.to(backend.device).float(),
                               backend=backend, reduction=reduction, hyper={"gamma": gamma, "label_smoothing": eps})
    x = logits.detach().double().cpu().requires_grad_(True)
    expected = reduce(formula_rows(x, target.cpu(), None if weight is None else weight.cpu(), gamma, eps),
                      target.cpu(), reduction)
    (expected_grad,) = torch.autograd.grad(expected, x, upstream if expected.dim() else upstream.reshape(()))
    what = f"{backend.id} gamma={gamma} eps={eps} {dtype} {reduction}"
    assert_loss_close(loss, expected.detach(), f"{what} loss")
    assert_grad_close(grad, expected_grad, dtype, f"{what} grad")


@pytest.mark.parametrize("eps", SMOOTHING)
@pytest.mark.parametrize("gamma", GAMMAS)
def test_gamma_zero_is_the_softmax_cross_entropy_and_gamma_lowers_easy_rows(backend, gamma, eps):
    logits, target, weight = make_inputs(5, 23, torch.float32, backend.device)
    hyper = {"label_smoothing": eps}
    ones = torch.ones(5, device=backend.device)
    focal, focal_grad = loss_and_grad(losses.loss("softmax_focal"), logits, target, weight, ones,
                                      backend=backend, reduction="none", hyper={**hyper, "gamma": gamma})
    ce, ce_grad = loss_and_grad(losses.loss("softmax"), logits, target, weight, ones, backend=backend,
                                reduction="none", hyper=hyper)
    if gamma == 0:
        assert_loss_close(focal, ce, f"{backend.id} gamma=0 loss vs CE")
        assert_grad_close(focal_grad, ce_grad, torch.float32, f"{backend.id} gamma=0 grad vs CE")
    else:  # (1 - p)^gamma <= 1 scales every term down
        assert (focal <= ce * (1 + 1e-6) + 1e-12).all(), (focal, ce)


CONFIDENT_MARGINS = (20.0, 100.0, 1e4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", SMOOTHING)
@pytest.mark.parametrize("gamma", GAMMAS)
def test_confident_rows_are_finite_and_right(backend, gamma, eps, dtype):
    """Rows where p_y -> 1 (margins 20, 100, 1e4 on the target) and one where p_y -> 0: finite loss and
    gradient for every gamma, equal to the reference's float64 limit. A margin of 20 keeps
    1 - p_y ~ 2e-9: the pow form's (1 - p)^(gamma - 1) would be huge there for gamma < 1."""
    num_classes = 9
    rows = []
    for margin in CONFIDENT_MARGINS:
        row = torch.zeros(num_classes)
        row[3] = margin
        rows.append(row)
    wrong = torch.zeros(num_classes)
    wrong[5] = 100.0
    rows.append(wrong)
    logits = torch.stack(rows).to(dtype).to(backend.device)
    target = torch.full((len(rows),), 3, device=backend.device)
    spec = losses.loss("softmax_focal")
    hyper = {"gamma": gamma, "label_smoothing": eps}
    loss, grad = loss_and_grad(spec, logits, target, None, torch.ones(len(rows), device=backend.device), backend=backend,
                               reduction="none", hyper=hyper)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), (loss, grad)
    x = logits.detach().double().cpu().requires_grad_(True)
    ref = spec.reference(x, target.cpu(), None, "none", **hyper)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x)
    assert torch.isfinite(ref).all() and torch.isfinite(ref_grad).all()
    what = f"{backend.id} gamma={gamma} eps={eps} {dtype}"
    assert_loss_close(loss, ref.detach(), f"{what} loss")
    assert_grad_close(grad, ref_grad, dtype, f"{what} grad")
    if eps == 0 and 0 < gamma <= 2:
        # margin 20: 1 - p_y = 8 exp(-20) ~ 1.6e-8; the loss ~ (1 - p_y)^(1 + gamma) is tiny and positive (for
        # gamma = 5 it is ~1e-47, below float32's smallest subnormal: 0 is then the right float32 answer)
        assert 0 < float(loss[0]) < 1e-7


def test_softmax_focal_in_the_module_and_its_default_gamma():
    counts = [50, 10, 3, 1]
    logits, target, _ = make_inputs(8, 4, torch.float32, "cpu", ignore_frac=0.0)
    module = cb.ClassBalancedLoss(counts, loss_type="softmax_focal", beta=0.99, backend="reference")
    assert module.gamma == 2.0
    expected = cb.cb_softmax_focal_loss(logits, target, module.class_weight, gamma=2.0, backend="reference")
    torch.testing.assert_close(module(logits, target), expected)
    assert cb.ClassBalancedLoss(counts, loss_type="focal").gamma == 0.5


@pytest.mark.parametrize("gamma", [-0.5, float("nan"), float("inf")])
def test_bad_gamma_is_refused(gamma):
    logits, target, _ = make_inputs(2, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        cb.cb_softmax_focal_loss(logits, target, gamma=gamma)
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        cb.ClassBalancedLoss([3, 2, 1], loss_type="softmax_focal", gamma=gamma)
