"""reference.py is the spec: its gradients are checked by gradcheck, its values against PyTorch's own losses
and independent formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from cbkernels import reference


def _inputs(n=5, c=7, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, c, (n,), generator=g)
    if ignore:
        target[1] = -100
    weight = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    return logits, target, weight


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("loss, param", [("softmax", 0.0), ("softmax", 0.2), ("focal", 0.0), ("focal", 0.5),
                                         ("focal", 1.0), ("focal", 2.0), ("focal", 3.7)])
def test_gradcheck(loss, param, reduction):
    logits, target, weight = _inputs()
    logits.requires_grad_(True)
    if loss == "softmax":
        fn = lambda z: reference.cb_softmax_cross_entropy(z, target, weight, reduction, label_smoothing=param)  # noqa: E731
    else:
        fn = lambda z: reference.cb_focal_loss(z, target, weight, param, reduction)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,))
    assert torch.autograd.gradgradcheck(fn, (logits,))


def test_sigmoid_gradient_at_zero_logit():
    # d/dz softplus(-z) at 0 is -1/2: the reference must get this right (a max/abs form under autograd gives 0).
    z = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    reference.cb_sigmoid_cross_entropy(z, torch.tensor([0]), reduction="sum").backward()
    torch.testing.assert_close(z.grad, torch.tensor([[-0.5, 0.5]], dtype=torch.float64))


def test_unweighted_softmax_equals_cross_entropy():
    logits, target, _ = _inputs()
    for reduction in ("none", "sum", "mean"):
        torch.testing.assert_close(reference.cb_softmax_cross_entropy(logits, target, None, reduction),
                                   F.cross_entropy(logits, target, reduction=reduction))
    torch.testing.assert_close(reference.cb_softmax_cross_entropy(logits, target, None, "mean", label_smoothing=0.3),
                               F.cross_entropy(logits, target, reduction="mean", label_smoothing=0.3))


def test_unweighted_sigmoid_equals_bce_summed_over_classes():
    logits, target, _ = _inputs(ignore=False)
    onehot = F.one_hot(target, logits.shape[1]).double()
    bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none").sum(1)
    torch.testing.assert_close(reference.cb_sigmoid_cross_entropy(logits, target, reduction="none"), bce)
    # "mean" divides by rows, not by N * C as BCE's own mean does (the official code's convention)
    torch.testing.assert_close(reference.cb_sigmoid_cross_entropy(logits, target), bce.mean())


def test_focal_gamma_zero_is_sigmoid_and_matches_naive_formula():
    logits, target, weight = _inputs()
    torch.testing.assert_close(reference.cb_focal_loss(logits, target, weight, 0.0, "none"),
                               reference.cb_sigmoid_cross_entropy(logits, target, weight, "none"))
    # The naive pow form, fine in float64 for moderate logits, as an independent formula.
    gamma = 2.0
    valid = target != -100
    t = torch.where(valid, target, 0)
    onehot = F.one_hot(t, logits.shape[1]).bool()
    p = torch.sigmoid(torch.where(onehot, logits, -logits))
    naive = (-(1 - p) ** gamma * torch.log(p)).sum(1) * weight[t] * valid
    torch.testing.assert_close(reference.cb_focal_loss(logits, target, weight, gamma, "none"), naive)


def test_weighted_softmax_convention_differs_from_torch_weighted_mean():
    logits, target, weight = _inputs()
    valid = target != -100
    per_row = F.cross_entropy(logits, target, weight=weight, reduction="none")  # already alpha_y * CE, 0 if ignored
    torch.testing.assert_close(reference.cb_softmax_cross_entropy(logits, target, weight, "none"), per_row)
    ours = reference.cb_softmax_cross_entropy(logits, target, weight, "mean")
    torch.testing.assert_close(ours, per_row.sum() / valid.sum())  # divided by the number of rows
    theirs = F.cross_entropy(logits, target, weight=weight)  # divided by sum of alpha_y
    assert not torch.allclose(ours, theirs)


def test_hand_computed_values():
    # One row, C = 2, z = (0, 0), y = 0, alpha = (3, 1):
    #   softmax: 3 * log 2;  sigmoid: 3 * (log 2 + log 2);  focal gamma = 1: 3 * 2 * (1/2) * log 2
    z = torch.zeros(1, 2, dtype=torch.float64)
    y = torch.tensor([0])
    w = torch.tensor([3.0, 1.0], dtype=torch.float64)
    assert reference.cb_softmax_cross_entropy(z, y, w).item() == pytest.approx(3 * math.log(2))
    assert reference.cb_sigmoid_cross_entropy(z, y, w).item() == pytest.approx(6 * math.log(2))
    assert reference.cb_focal_loss(z, y, w, gamma=1.0).item() == pytest.approx(3 * math.log(2))
    # label smoothing eps = 0.5 on z = (1, 0), y = 0: lse - 0.5 * 1 - 0.25 * (1 + 0)
    z2 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    lse = math.log(math.e + 1)
    assert reference.cb_softmax_cross_entropy(z2, y, None, label_smoothing=0.5).item() == pytest.approx(lse - 0.75)


def test_ignore_index_rows_are_zero_and_do_not_leak_nan():
    logits, target, weight = _inputs()
    logits = logits.clone()
    logits[1] = float("nan")  # row 1 is ignored
    logits.requires_grad_(True)
    for fn in (lambda z: reference.cb_softmax_cross_entropy(z, target, weight, "none"),
               lambda z: reference.cb_focal_loss(z, target, weight, 0.5, "none")):
        rows = fn(logits)
        assert rows[1] == 0 and not torch.isnan(rows).any()
        (g,) = torch.autograd.grad(rows.sum(), logits)
        assert (g[1] == 0).all() and not torch.isnan(g).any()


def test_mean_over_no_valid_rows_is_zero_with_zero_grad():
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.full((3,), -100)
    for loss in (reference.cb_softmax_cross_entropy(logits, target), reference.cb_focal_loss(logits, target)):
        assert loss.item() == 0
        (g,) = torch.autograd.grad(loss, logits)
        assert (g == 0).all()


def test_nan_logits_give_nan_row():
    logits, target, weight = _inputs(ignore=False)
    logits[2, 3] = float("nan")
    for rows in (reference.softmax_rows(logits, target, weight), reference.sigmoid_focal_rows(logits, target, weight, 2.0)):
        assert torch.isnan(rows[2]) and not torch.isnan(rows[[0, 1, 3, 4]]).any()


def test_extreme_logits_are_finite_and_right():
    z = torch.tensor([[1e4, -1e4, 0.0]], dtype=torch.float32)
    y = torch.tensor([1])
    rows = reference.sigmoid_focal_rows(z, y, None, 0.5)
    # row: class 0 negative at z=1e4 -> ~1e4 * (1 - 0)^0.5; class 1 positive at -1e4 -> 1e4; class 2 -> log 2 * 0.5^0.5
    expected = 1e4 + 1e4 + math.log(2) * math.sqrt(0.5)
    assert torch.isfinite(rows).all() and rows.item() == pytest.approx(expected, rel=1e-6)
    assert reference.softmax_rows(z, y).item() == pytest.approx(2e4, rel=1e-6)


def test_out_of_range_target_raises():
    logits, _, _ = _inputs()
    with pytest.raises(RuntimeError, match="outside"):
        reference.cb_softmax_cross_entropy(logits, torch.tensor([0, 1, 2, 3, 7]))
    with pytest.raises(RuntimeError, match="outside"):
        reference.cb_focal_loss(logits, torch.tensor([0, 1, -1, 3, 4]))
