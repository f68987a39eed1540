"""reference.py is the spec: its gradients are checked by gradcheck, its values against PyTorch's own losses
and independent formulas. Every registered loss (losses.LOSSES) is specified by `Loss.reference`."""
import math

import pytest
import torch
import torch.nn.functional as F

from cbkernels import losses, reference
from hand_losses import hand_rows

# (loss, hyperparameters) for every registered loss at every setting the registry asks tests to exercise.
CASES = [(spec, hyper) for spec in losses.LOSSES for hyper in spec.test_cases()]
CASE_IDS = [spec.name + "".join(f"-{k}={v}" for k, v in hyper.items()) for spec, hyper in CASES]
LOSS_IDS = [spec.name for spec in losses.LOSSES]


def _inputs(n=5, c=7, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, c, (n,), generator=g)
    if ignore:
        target[1] = -100
    weight = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    return logits, target, weight


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("spec, hyper", CASES, ids=CASE_IDS)
def test_gradcheck(spec, hyper, reduction):
    logits, target, weight = _inputs()
    logits.requires_grad_(True)

    def fn(z):
        return spec.reference(z, target, weight, reduction, **hyper)

    assert torch.autograd.gradcheck(fn, (logits,))
    assert torch.autograd.gradgradcheck(fn, (logits,))


def test_sigmoid_gradient_at_zero_logit():
    # d/dz softplus(-z) at 0 is -1/2: the reference must get this right (a max/abs form under autograd gives 0).
    z = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    losses.loss("sigmoid").reference(z, torch.tensor([0]), reduction="sum").backward()
    torch.testing.assert_close(z.grad, torch.tensor([[-0.5, 0.5]], dtype=torch.float64))


def test_unweighted_softmax_equals_cross_entropy():
    softmax = losses.loss("softmax")
    logits, target, _ = _inputs()
    for reduction in ("none", "sum", "mean"):
        torch.testing.assert_close(softmax.reference(logits, target, None, reduction),
                                   F.cross_entropy(logits, target, reduction=reduction))
    torch.testing.assert_close(softmax.reference(logits, target, None, "mean", label_smoothing=0.3),
                               F.cross_entropy(logits, target, reduction="mean", label_smoothing=0.3))


def test_unweighted_sigmoid_equals_bce_summed_over_classes():
    sigmoid = losses.loss("sigmoid")
    logits, target, _ = _inputs(ignore=False)
    onehot = F.one_hot(target, logits.shape[1]).double()
    bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none").sum(1)
    torch.testing.assert_close(sigmoid.reference(logits, target, reduction="none"), bce)
    # "mean" divides by rows, not by N * C as BCE's own mean does (the official code's convention)
    torch.testing.assert_close(sigmoid.reference(logits, target), bce.mean())


def test_focal_gamma_zero_is_sigmoid_and_matches_naive_formula():
    focal, sigmoid = losses.loss("focal"), losses.loss("sigmoid")
    logits, target, weight = _inputs()
    torch.testing.assert_close(focal.reference(logits, target, weight, "none", gamma=0.0),
                               sigmoid.reference(logits, target, weight, "none"))
    # The naive pow form, fine in float64 for moderate logits, as an independent formula.
    gamma = 2.0
    valid = target != -100
    t = torch.where(valid, target, 0)
    onehot = F.one_hot(t, logits.shape[1]).bool()
    p = torch.sigmoid(torch.where(onehot, logits, -logits))
    naive = (-(1 - p) ** gamma * torch.log(p)).sum(1) * weight[t] * valid
    torch.testing.assert_close(focal.reference(logits, target, weight, "none", gamma=gamma), naive)


def test_weighted_softmax_convention_differs_from_torch_weighted_mean():
    softmax = losses.loss("softmax")
    logits, target, weight = _inputs()
    valid = target != -100
    per_row = F.cross_entropy(logits, target, weight=weight, reduction="none")  # already alpha_y * CE, 0 if ignored
    torch.testing.assert_close(softmax.reference(logits, target, weight, "none"), per_row)
    ours = softmax.reference(logits, target, weight, "mean")
    torch.testing.assert_close(ours, per_row.sum() / valid.sum())  # divided by the number of rows
    theirs = F.cross_entropy(logits, target, weight=weight)  # divided by sum of alpha_y
    assert not torch.allclose(ours, theirs)


def test_hand_computed_values():
    # One row, C = 2, z = (0, 0), y = 0, alpha = (3, 1):
    #   softmax: 3 * log 2;  sigmoid: 3 * (log 2 + log 2);  focal gamma = 1: 3 * 2 * (1/2) * log 2
    softmax, sigmoid, focal = losses.loss("softmax"), losses.loss("sigmoid"), losses.loss("focal")
    z = torch.zeros(1, 2, dtype=torch.float64)
    y = torch.tensor([0])
    w = torch.tensor([3.0, 1.0], dtype=torch.float64)
    assert softmax.reference(z, y, w).item() == pytest.approx(3 * math.log(2))
    assert sigmoid.reference(z, y, w).item() == pytest.approx(6 * math.log(2))
    assert focal.reference(z, y, w, gamma=1.0).item() == pytest.approx(3 * math.log(2))
    # label smoothing eps = 0.5 on z = (1, 0), y = 0: lse - 0.5 * 1 - 0.25 * (1 + 0)
    z2 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    lse = math.log(math.e + 1)
    assert softmax.reference(z2, y, None, label_smoothing=0.5).item() == pytest.approx(lse - 0.75)


@pytest.mark.parametrize("spec", losses.LOSSES, ids=LOSS_IDS)
def test_ignore_index_rows_are_zero_and_do_not_leak_nan(spec):
    logits, target, weight = _inputs()
    logits = logits.clone()
    logits[1] = float("nan")  # row 1 is ignored
    logits.requires_grad_(True)
    for hyper in spec.test_cases():
        rows = spec.reference(logits, target, weight, "none", **hyper)
        assert rows[1] == 0 and not torch.isnan(rows).any()
        (g,) = torch.autograd.grad(rows.sum(), logits)
        assert (g[1] == 0).all() and not torch.isnan(g).any()


@pytest.mark.parametrize("spec", losses.LOSSES, ids=LOSS_IDS)
def test_mean_over_no_valid_rows_is_zero_with_zero_grad(spec):
    logits = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    target = torch.full((3,), -100)
    loss = spec.reference(logits, target)
    assert loss.item() == 0
    (g,) = torch.autograd.grad(loss, logits)
    assert (g == 0).all()


def test_nan_logits_give_nan_row():
    logits, target, weight = _inputs(ignore=False)
    logits[2, 3] = float("nan")
    for spec, hyper in CASES:
        rows = spec.reference(logits, target, weight, "none", **hyper)
        assert torch.isnan(rows[2]) and not torch.isnan(rows[[0, 1, 3, 4]]).any(), (spec.name, hyper)
    # The row functions themselves (gamma is a keyword after ignore_index).
    for rows in (reference.softmax_rows(logits, target, weight),
                 reference.sigmoid_focal_rows(logits, target, weight, gamma=2.0)):
        assert torch.isnan(rows[2]) and not torch.isnan(rows[[0, 1, 3, 4]]).any()


def test_extreme_logits_are_finite_and_right():
    z = torch.tensor([[1e4, -1e4, 0.0]], dtype=torch.float32)
    y = torch.tensor([1])
    rows = reference.sigmoid_focal_rows(z, y, None, gamma=0.5)
    # row: class 0 negative at z=1e4 -> ~1e4 * (1 - 0)^0.5; class 1 positive at -1e4 -> 1e4; class 2 -> log 2 * 0.5^0.5
    expected = 1e4 + 1e4 + math.log(2) * math.sqrt(0.5)
    assert torch.isfinite(rows).all() and rows.item() == pytest.approx(expected, rel=1e-6)
    assert losses.loss("focal").reference(z, y, reduction="sum", gamma=0.5).item() == pytest.approx(expected, rel=1e-6)
    assert reference.softmax_rows(z, y).item() == pytest.approx(2e4, rel=1e-6)


@pytest.mark.parametrize("spec", losses.LOSSES, ids=LOSS_IDS)
def test_out_of_range_target_raises(spec):
    logits, _, _ = _inputs()
    with pytest.raises(RuntimeError, match="outside"):
        spec.reference(logits, torch.tensor([0, 1, 2, 3, 7]))
    with pytest.raises(RuntimeError, match="outside"):
        spec.reference(logits, torch.tensor([0, 1, -1, 3, 4]))


# --- "mean" divides by the number of non-ignored rows: hand-written rows (tests/hand_losses.py) and sums ----

@pytest.mark.parametrize("spec, hyper", CASES, ids=CASE_IDS)
def test_mean_divides_by_non_ignored_rows_hand_written(spec, hyper):
    g = torch.Generator().manual_seed(11)
    n, c, ignore_index = 9, 5, 3  # ignore_index is also a class index: rows of class 3 are the ignored ones
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    target = torch.tensor([0, 3, 4, 1, 3, 2, 3, 0, 4])  # 3 ignored rows, 6 counted
    weight = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    rows = hand_rows(spec, logits, target, weight, ignore_index, hyper)
    total = math.fsum(rows)
    counted = sum(1 for y in target.tolist() if y != ignore_index)
    assert counted == 6
    kw = dict(ignore_index=ignore_index, **hyper)
    assert spec.reference(logits, target, weight, "mean", **kw).item() == pytest.approx(total / counted, rel=1e-12)
    assert spec.reference(logits, target, weight, "sum", **kw).item() == pytest.approx(total, rel=1e-12)
    torch.testing.assert_close(spec.reference(logits, target, weight, "none", **kw),
                               torch.tensor(rows, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    assert total / counted != pytest.approx(total / n, rel=1e-3)  # the test tells the two conventions apart
