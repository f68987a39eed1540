"""Reductions against sums written out by hand, on every backend pair (the `backend` fixture of conftest.py:
CUDA pairs carry pytest.mark.gpu, so tools/gpu_check.sh runs this file on a GPU machine).

The other loss tests compare a backend with cbkernels' reference backend, and both share the counting
code of "mean" (_reduction.py): a wrong denominator there would pass them all. Here the expected values
are computed in plain Python (math, float64) from the formulas of docs/math.md, independent of cbkernels:
"mean" is the sum of the alpha_y-weighted row losses divided by the number of NON-IGNORED rows (not N,
not the sum of the rows' weights, as F.cross_entropy(weight=...) divides), gradients by central
differences of the same Python function. The inputs make those three denominators differ, and the test
checks that they give answers far outside its tolerance (so a wrong one cannot pass).
"""
import math

import pytest
import torch

from cases import LOSS_RTOL, assert_grad_close, call, loss_cases

LOGITS = [[0.5, -1.25, 2.0], [3.0, 0.25, -0.5], [-2.0, 1.5, 0.75], [0.0, -0.375, 1.125], [4.0, 4.0, -4.0],
          [-0.625, 2.5, 0.125]]
WEIGHT = [0.5, 2.0, 1.25]
TARGETS = {  # ignore_index -> targets: two rows ignored (ignore_index 1 is also a class index)
    -100: [0, -100, 2, 1, -100, 2],
    1: [0, 1, 2, 1, 0, 2],
}


def softmax_ce_row(z, y, label_smoothing):
    """lse(z) - (1 - eps) z_y - (eps / C) sum_c z_c: cross entropy against the smoothed one-hot target."""
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return lse - (1 - label_smoothing) * z[y] - label_smoothing / len(z) * sum(z)


def sigmoid_focal_row(z, y, gamma):
    """sum_c -(1 - p_c)^gamma log p_c, p_c = sigmoid(+z_c) for the target class, sigmoid(-z_c) otherwise."""
    total = 0.0
    for c, v in enumerate(z):
        u = v if c == y else -v
        p = 1.0 / (1.0 + math.exp(-u))
        total += -((1.0 - p) ** gamma) * math.log(p)
    return total


def softmax_focal_row(z, y, gamma, label_smoothing):
    """sum_c q'_c (1 - p_c)^gamma (-log p_c), p = softmax(z), q' = (1 - eps) onehot(y) + eps / C."""
    m = max(z)
    total = sum(math.exp(v - m) for v in z)
    loss = 0.0
    for c, v in enumerate(z):
        p = math.exp(v - m) / total
        loss += ((1 - label_smoothing) * (c == y) + label_smoothing / len(z)) * (1 - p) ** gamma * -math.log(p)
    return loss


ROW_FORMULAS = {"softmax_ce": softmax_ce_row, "sigmoid_focal": sigmoid_focal_row, "softmax_focal": softmax_focal_row}


def _hand(spec, hyper, targets, ignore_index):
    """Per-row weighted losses and their gradients (lists), and the count of non-ignored rows."""
    assert spec.family.name in ROW_FORMULAS, f"write the per-row formula of family {spec.family.name!r} here"
    formula = ROW_FORMULAS[spec.family.name]
    named = dict(zip((h.name for h in spec.family.hyperparameters), spec.kernel_hyperparameters(hyper)))
    rows, grads, h = [], [], 1e-5
    for z, y in zip(LOGITS, targets):
        if y == ignore_index:
            rows.append(0.0)
            grads.append([0.0] * len(z))
            continue
        alpha = WEIGHT[y]
        rows.append(alpha * formula(z, y, **named))
        row_grad = []
        for c in range(len(z)):
            up, down = list(z), list(z)
            up[c] += h
            down[c] -= h
            row_grad.append(alpha * (formula(up, y, **named) - formula(down, y, **named)) / (2 * h))
        grads.append(row_grad)
    count = sum(1 for y in targets if y != ignore_index)
    return rows, grads, count


@pytest.mark.parametrize("spec,hyper", loss_cases())
@pytest.mark.parametrize("ignore_index", sorted(TARGETS))
def test_reductions_match_hand_written_sums(backend, spec, hyper, ignore_index):
    targets = TARGETS[ignore_index]
    rows, grads, count = _hand(spec, hyper, targets, ignore_index)
    total = sum(rows)
    valid_weight = sum(WEIGHT[y] for y in targets if y != ignore_index)
    assert count == 4 and len(targets) == 6 and valid_weight != count
    expected = {"none": rows, "sum": total, "mean": total / count}
    grad_scale = {"none": 1.0, "sum": 1.0, "mean": 1.0 / count}
    # The wrong denominators are far outside the tolerance: this test can tell them apart.
    for wrong in (total / len(targets), total / valid_weight):
        assert abs(wrong - expected["mean"]) > 100 * LOSS_RTOL * abs(expected["mean"])

    logits = torch.tensor(LOGITS, device=backend.device)
    target = torch.tensor(targets, device=backend.device)
    weight = torch.tensor(WEIGHT, device=backend.device)
    for reduction, want in expected.items():
        x = logits.clone().requires_grad_(True)
        out = call(spec, x, target, weight, backend=backend, reduction=reduction, ignore_index=ignore_index,
                   hyper=hyper)
        out.sum().backward()
        want = torch.tensor(want, dtype=torch.float64)
        what = f"{backend.id} {spec.name} {hyper} {reduction} ignore_index={ignore_index}"
        torch.testing.assert_close(out.detach().double().cpu(), want, rtol=LOSS_RTOL, atol=1e-7,
                                   msg=lambda m: f"{what} loss: {m}")
        want_grad = torch.tensor(grads, dtype=torch.float64) * grad_scale[reduction]
        assert_grad_close(x.grad, want_grad, torch.float32, f"{what} grad")
