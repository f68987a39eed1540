"""weights.py against independent derivations: the sum form, exact rational closed forms, limits, the official
code, hand values."""
import math
from decimal import Decimal, localcontext
from fractions import Fraction

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


def exact_effective_number(n: int, beta: float):
    """(1 - beta^n) / (1 - beta) for the float beta's exact binary value, in exact rational arithmetic
    (Fraction) for moderate n, else in 100-digit decimal arithmetic (beta^(10^6) as a Fraction would have
    ~5 * 10^7 bits); n for beta == 1. Independent of weights.py's expm1/log1p form."""
    if beta == 1.0:
        return Fraction(n)
    if n <= 5000:
        b = Fraction(beta)
        return (1 - b**n) / (1 - b)
    with localcontext() as ctx:
        ctx.prec = 100
        b = Decimal(beta)  # exact: every float is a finite decimal
        return Fraction((1 - b**n) / (1 - b))


# (n, beta): beta near 0, moderate, the paper's 0.9999 at n = 10^6 (1 - beta^n ~ 1 - e^-100), and beta -> 1,
# where 1 - beta^n cancels in the naive form (1 - 2^-40 at n = 1000: relative error 4.5e-10 that way).
CLOSED_FORM_CASES = [(1, 0.5), (3, 0.0), (7, 0.9), (1000, 0.999), (5000, 0.9999), (10**6, 0.9999),
                     (1000, 1 - 2.0**-40), (10**6, 1 - 2.0**-45), (10**6, 1 - 2.0**-52), (10**6, 1.0)]


@pytest.mark.parametrize("n, beta", CLOSED_FORM_CASES)
def test_effective_number_matches_exact_closed_form(n, beta):
    exact = exact_effective_number(n, beta)
    got = cb.effective_number(n, beta).item()
    assert got == pytest.approx(float(exact), rel=1e-13), (n, beta, got, float(exact))


def test_effective_number_approaches_n_as_beta_goes_to_1():
    # E_n(beta) = sum_{j<n} beta^j is within n^2 (1 - beta) / 2 of n, and exactly n at beta = 1.
    n = 10**6
    previous_gap = math.inf
    for k in (20, 30, 40, 45, 50, 53):
        beta = 1 - 2.0**-k
        got = cb.effective_number(n, beta).item()
        gap = n - got
        assert 0 <= gap <= n * n * 2.0**-k / 2 * (1 + 1e-9), (k, got)
        assert gap <= previous_gap
        previous_gap = gap
        assert got == pytest.approx(float(exact_effective_number(n, beta)), rel=1e-13), k
    assert cb.effective_number(n, 1.0).item() == n


def test_class_balanced_weights_match_exact_closed_form():
    # w_c = (1 / E_{n_c}) / sum_k (1 / E_{n_k}) * C, exactly, then rounded once to float32. (float32 cannot
    # see the naive form's cancellation, at most ~1e-8 relative in float64: this pins the normalisation,
    # the beta == 1 branch and the per-class use of E.)
    counts = [1, 10, 1000, 10**6]
    for beta in (0.9, 0.9999, 1 - 2.0**-45, 1.0):
        inverse = [1 / exact_effective_number(n, beta) for n in counts]
        exact = [float(v / sum(inverse) * len(counts)) for v in inverse]
        got = cb.class_balanced_weights(counts, beta).tolist()
        assert got == pytest.approx(exact, rel=2.0**-23, abs=0), beta


def test_infinite_effective_number_is_inf_not_nan():
    # The docstring's beta == 1 limit E_n = n holds at n = +inf too: +inf, not the NaN that the closed form's
    # (1 - 1^inf) / 0 would give; below 1 the limit is the finite 1 / (1 - beta) ("unique prototypes").
    e = cb.effective_number(math.inf, 1.0)
    assert e.item() == math.inf
    assert cb.effective_number(math.inf, 0.9).item() == pytest.approx(10.0, rel=1e-15)
    assert cb.effective_number(math.inf, 0.0).item() == 1.0
    # Broadcast: +inf where beta == 1 and n == inf, and the n == 0, beta == 0 corner (0 * -inf) is 0, not NaN.
    got = cb.effective_number([0.0, 0.0, 5.0, math.inf], [0.0, 1.0, 1.0, 1.0])
    assert got.tolist() == [0.0, 0.0, 5.0, math.inf]
    assert not torch.isnan(got).any()
    # E_0 = 0 exactly (docs/math.md, sections 1-2: an empty class's weight 1 / E_0 is 1/0): +0.0, so the
    # inverse is +inf, never NaN (the formula's 0 * -inf at beta == 0, or 0/0 at beta == 1) nor -inf (a -0.0).
    zero = cb.effective_number([0, 0, 0, 0], [0.0, 0.5, 0.9999, 1.0])
    assert (1 / zero).tolist() == [math.inf] * 4


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
    # The classes that have samples are normalised to sum to their own number, C' = 2 (docs/math.md, section 2):
    # their mean weight stays 1 however many classes are empty.
    raw = torch.tensor([(1 - 0.9) / (1 - 0.9**10), (1 - 0.9) / (1 - 0.9**5)], dtype=torch.float64)
    torch.testing.assert_close(w[[0, 2]], (raw / raw.sum() * 2).float())
    assert w.sum().item() == pytest.approx(2, rel=1e-6)


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
    labels = torch.arange(10).repeat_interleave(60)[torch.randperm(600, generator=torch.Generator().manual_seed(0))]
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
