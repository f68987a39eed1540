"""Scale: N * C > 2^31 elements on the CPU backend, and one row of 10^6 classes on every backend.

The big case, bf16 logits of shape (2, 2^30 + 3), is 2^31 + 6 elements (4.3 GB, plus 4.3 GB of gradient):
any int32 offset, or an fp32 running sum that stops growing at 2^24, breaks it. The reference cannot
run at that size, so each row is constant and its loss and gradient have a closed form (float64, below).
It runs with the "recompute" backward so that only one gradient buffer exists (about 9 GB in all).
"""
import math

import pytest
import torch

import cbkernels as cb
from backend_cases import assert_matches_reference, make_inputs

HUGE_C = 2**30 + 3
ROW_VALUES = (0.5, -2.0)  # exact in bf16
TARGETS = (HUGE_C - 1, 123_456_789)  # the last column, and one far from both ends
UPSTREAM = (1.0, -0.5)


def _sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def _softplus(v):
    return max(v, 0.0) + math.log1p(math.exp(-abs(v)))


def _softmax_closed_form(a, num_classes):
    """Constant row: every probability is 1/C, so loss = log C and grad = 1/C - onehot."""
    return math.log(num_classes), 1.0 / num_classes, 1.0 / num_classes - 1.0


def _focal_closed_form(a, num_classes, gamma):
    """Constant row a: the target's u = a, every negative's u = -a (paper-notes section 5)."""

    def term_and_slope(u):  # term(u) = (1 - p)^gamma softplus(-u) and d term / du
        p, q = _sigmoid(u), _sigmoid(-u)
        mod = q**gamma
        return mod * _softplus(-u), mod * (gamma * p * math.log(p) - q)

    target_term, target_slope = term_and_slope(a)
    negative_term, negative_slope = term_and_slope(-a)
    return target_term + (num_classes - 1) * negative_term, -negative_slope, target_slope


@pytest.mark.slow
@pytest.mark.skipif("cpu" not in cb.available_backends("cpu"), reason="the C++ CPU kernels are not built")
@pytest.mark.parametrize("loss", ["softmax", "focal"])
def test_more_than_2_pow_31_elements(loss, monkeypatch):
    monkeypatch.setenv("CBKERNELS_BACKWARD", "recompute")
    logits = torch.empty(2, HUGE_C, dtype=torch.bfloat16)
    for row, value in enumerate(ROW_VALUES):
        logits[row].fill_(value)
    logits.requires_grad_(True)
    target = torch.tensor(TARGETS)
    if loss == "softmax":
        rows = cb.cb_softmax_cross_entropy(logits, target, reduction="none", backend="cpu")
        expected = [_softmax_closed_form(a, HUGE_C) for a in ROW_VALUES]
    else:
        rows = cb.cb_focal_loss(logits, target, gamma=0.5, reduction="none", backend="cpu")
        expected = [_focal_closed_form(a, HUGE_C, 0.5) for a in ROW_VALUES]
    rows.backward(torch.tensor(UPSTREAM))
    grad, rows = logits.grad, rows.detach()
    del logits
    g = torch.Generator().manual_seed(0)
    for row, (value, negative, on_target) in enumerate(expected):
        # fp32 sums over 2^30 terms: blocked or pairwise accumulation keeps ~1e-6; 1e-4 leaves headroom
        # while an accumulator that saturates (fp32 at 2^24) or wraps misses by orders of magnitude.
        assert math.isclose(float(rows[row]), value, rel_tol=1e-4), (row, float(rows[row]), value)
        y = TARGETS[row]
        columns = torch.cat([torch.tensor([0, 1, HUGE_C - 2, HUGE_C - 1, y - 1, y + 1]),
                             torch.randint(2**30 - 2**20, HUGE_C, (64,), generator=g)])  # row 1: across offset 2^31
        columns = columns[(columns != y) & (columns >= 0) & (columns < HUGE_C)]
        got = grad[row, columns].double()
        want = torch.full_like(got, UPSTREAM[row] * negative)
        # One rounding to bf16 after fp32 math: 4 * 2^-8 relative.
        torch.testing.assert_close(got, want, rtol=4 * 2.0**-8, atol=0, msg=lambda m: f"row {row} negatives: {m}")
        assert math.isclose(float(grad[row, y]), UPSTREAM[row] * on_target, rel_tol=4 * 2.0**-8), (
            row, float(grad[row, y]), UPSTREAM[row] * on_target)


MILLION_BACKENDS = [b for b in cb.available_backends("cpu") if b != "triton"]  # the interpreter: tiny shapes only


@pytest.mark.parametrize("backend", MILLION_BACKENDS)
@pytest.mark.parametrize("loss,param", [("softmax", 0.1), ("focal", 0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_of_a_million_classes(dtype, loss, param, backend):
    logits, target, weight = make_inputs(1, 10**6, dtype, "cpu", generator=torch.Generator().manual_seed(9))
    assert_matches_reference(backend, loss, logits, target, weight, reduction="mean", param=param)
