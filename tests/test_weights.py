"""weights.py against independent derivations: the sum form, limits, the official code, hand values."""
import math

import pytest
import torch

import cbkernels as cb


def effective_number_by_sum(n, beta):
    # E_n = sum_{j=1..n} beta^(j-1), straight from the paper's definition (no closed form involved).
    return math.fsum(beta ** (j - 1) for j in range(1, n + 1))


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.99, 0.999, 0.9999])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 5000])
def test_effective_number_matches_sum_form(n, beta):
    got = cb.effective_number(n, beta).item()
    assert got == pytest.approx(effective_number_by_sum(n, beta), rel=1e-12)


def test_effective_number_limits_and_stability():
    assert cb.effective_number(12345, 1.0).item() == 12345  # beta == 1 is n (inverse frequency)
    assert cb.effective_number(10**6, 0.0).item() == 1.0  # beta == 0: no re-weighting
    assert cb.effective_number(0, 0.9).item() == 0.0
    # beta = 0.9999, n = 10^6: 1 - beta^n = 1 - exp(-100.005) ~ 1, E = 1e4 to double precision
    beta = 0.9999  # (1 - beta) is 1.00000000000655e-4 in binary, so use the same float on both sides
    expected = -math.expm1(1e6 * math.log1p(beta - 1)) / (1 - beta)
    assert cb.effective_number(10**6, 0.9999).item() == pytest.approx(expected, rel=1e-13)
    # beta just below 1 approaches n continuously (no cancellation blow-up)
    assert cb.effective_number(1000, 1 - 1e-12).item() == pytest.approx(1000, rel=1e-6)
    assert cb.effective_number([1, 10], 0.9).dtype == torch.float64


def test_weights_hand_computed_case():
    # counts (3, 1), beta = 0.5: E_3 = 1 + .5 + .25 = 1.75, E_1 = 1; w ~ (1/1.75, 1) -> normalised to sum 2
    w = cb.class_balanced_weights([3, 1], beta=0.5)
    raw = torch.tensor([1 / 1.75, 1.0], dtype=torch.float64)
    torch.testing.assert_close(w, (raw / raw.sum() * 2).float())
    assert w.dtype == torch.float32 and w.shape == (2,)


def test_weights_match_official_formula():
    counts = [5000, 2000, 500, 120, 30, 4]
    beta = 0.999
    # The official TF code, written with numpy-free Python floats:
    #   effective_num = 1.0 - np.power(beta, samples_per_cls); weights = (1.0 - beta) / effective_num
    #   weights = weights / np.sum(weights) * no_of_classes
    effective = [1.0 - beta**n for n in counts]
    official = [(1.0 - beta) / e for e in effective]
    official = [w / sum(official) * len(counts) for w in official]
    got = cb.class_balanced_weights(counts, beta)
    torch.testing.assert_close(got, torch.tensor(official, dtype=torch.float32), rtol=1e-6, atol=0)
    assert got.sum().item() == pytest.approx(len(counts), rel=1e-6)


def test_beta_limits_of_weights():
    counts = [100, 10, 1]
    torch.testing.assert_close(cb.class_balanced_weights(counts, beta=0.0), torch.ones(3))
    inv = torch.tensor([1 / 100, 1 / 10, 1.0], dtype=torch.float64)
    torch.testing.assert_close(cb.class_balanced_weights(counts, beta=1.0), (inv / inv.sum() * 3).float())


def test_per_class_beta():
    counts = [50, 5]
    w = cb.class_balanced_weights(counts, beta=[0.9, 0.99])
    raw = torch.tensor([(1 - 0.9) / (1 - 0.9**50), (1 - 0.99) / (1 - 0.99**5)], dtype=torch.float64)
    torch.testing.assert_close(w, (raw / raw.sum() * 2).float())


def test_empty_classes_policy():
    with pytest.raises(ValueError, match=r"classes \[1, 3\] have 0 samples"):
        cb.class_balanced_weights([10, 0, 5, 0])
    w = cb.class_balanced_weights([10, 0, 5, 0], beta=0.9, empty_classes="zero")
    assert w[1] == 0 and w[3] == 0
    raw = torch.tensor([(1 - 0.9) / (1 - 0.9**10), (1 - 0.9) / (1 - 0.9**5)], dtype=torch.float64)
    torch.testing.assert_close(w[[0, 2]], (raw / raw.sum() * 4).float())
    assert w.sum().item() == pytest.approx(4, rel=1e-6)


@pytest.mark.parametrize("counts, beta, match", [
    ([5, -1], 0.9, "negative"),
    ([], 0.9, "non-empty"),
    ([[1, 2]], 0.9, "1-D"),
    ([1, 2], 1.5, "beta must lie in"),
    ([1, 2], -0.1, "beta must lie in"),
    ([1, 2], [0.9, 0.9, 0.9], "one value per class"),
    ([1, float("nan")], 0.9, "finite"),
    ([0, 0], 0.9, "0 samples"),
])
def test_weights_bad_input(counts, beta, match):
    with pytest.raises(ValueError, match=match):
        cb.class_balanced_weights(counts, beta)


def test_bad_empty_classes_name():
    with pytest.raises(ValueError, match="empty_classes"):
        cb.class_balanced_weights([1, 2], empty_classes="ignore")


@pytest.mark.parametrize("num_classes, n_max, factor", [(10, 500, 10), (10, 500, 100), (100, 500, 200), (2, 7, 1)])
def test_long_tail_counts_profile(num_classes, n_max, factor):
    counts = cb.long_tail_counts(num_classes, n_max, factor)
    assert len(counts) == num_classes and counts[0] == n_max
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    # n_{C-1} = n_max / factor before rounding to an integer (and at least one sample)
    assert abs(counts[-1] - max(1.0, n_max / factor)) <= 0.5
    mu = (1 / factor) ** (1 / (num_classes - 1))
    for i, c in enumerate(counts):
        assert abs(c - n_max * mu**i) <= 0.5 + 1e-9


def test_long_tail_counts_bad_input():
    with pytest.raises(ValueError, match="imbalance_factor"):
        cb.long_tail_counts(10, 100, 0.5)
    with pytest.raises(ValueError, match="num_classes"):
        cb.long_tail_counts(0, 100, 10)


def test_long_tail_indices_profile_and_seed():
    labels = torch.arange(10).repeat_interleave(60)[torch.randperm(600)]
    idx = cb.long_tail_indices(labels, imbalance_factor=20, seed=3)
    kept = torch.bincount(labels[idx], minlength=10).tolist()
    assert kept == cb.long_tail_counts(10, 60, 20)
    assert torch.equal(idx, cb.long_tail_indices(labels, 20, seed=3))
    assert not torch.equal(idx, cb.long_tail_indices(labels, 20, seed=4))
    assert len(set(idx.tolist())) == idx.numel()


def test_init_prior_bias():
    lin = torch.nn.Linear(4, 8)
    cb.init_prior_bias_(lin)
    torch.testing.assert_close(lin.bias, torch.full((8,), -math.log(7.0)))  # the official code's -log(C - 1)
    assert torch.sigmoid(lin.bias).allclose(torch.full((8,), 1 / 8))
    cb.init_prior_bias_(lin, prior=0.5)
    assert (lin.bias == 0).all()
    with pytest.raises(ValueError, match="prior"):
        cb.init_prior_bias_(lin, prior=1.5)
    with pytest.raises(ValueError, match="bias"):
        cb.init_prior_bias_(torch.nn.Linear(4, 8, bias=False))
