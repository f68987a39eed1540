"""The registered losses' row values written out in plain Python floats (math module only), independent of
cbkernels' code: what the "mean divides by the non-ignored rows" tests sum by hand.

Per-row loss, z the row's logits, y its class, alpha = class_weight[y] (docs/math.md):
  softmax_ce:    alpha * (lse(z) - (1 - eps) z_y - (eps / C) sum_c z_c)
  sigmoid_focal: alpha * sum_c -(1 - p_c)^gamma log p_c,  p_c = sigmoid(z_c) for c == y, sigmoid(-z_c) otherwise
  softmax_focal: alpha * sum_c q'_c (1 - p_c)^gamma (-log p_c),  p = softmax(z),  q' = (1 - eps) onehot(y) + eps / C
"""
from __future__ import annotations

import math


def softmax_row(z, y, alpha, label_smoothing):
    m = max(z)
    lse = m + math.log(math.fsum(math.exp(v - m) for v in z))
    return alpha * (lse - (1 - label_smoothing) * z[y] - label_smoothing / len(z) * math.fsum(z))


def sigmoid_focal_row(z, y, alpha, gamma):
    terms = []
    for c, v in enumerate(z):
        p = 1 / (1 + math.exp(-v if c == y else v))  # the probability of the right answer for task c
        terms.append(-((1 - p) ** gamma) * math.log(p))
    return alpha * math.fsum(terms)


def softmax_focal_row(z, y, alpha, gamma, label_smoothing):
    m = max(z)
    total = math.fsum(math.exp(v - m) for v in z)
    terms = []
    for c, v in enumerate(z):
        p = math.exp(v - m) / total
        weight = (1 - label_smoothing) * (c == y) + label_smoothing / len(z)
        terms.append(weight * (1 - p) ** gamma * -math.log(p))
    return alpha * math.fsum(terms)


# One formula per kernel family (losses.FAMILIES); a new family needs its own here (a KeyError says so).
ROW_FORMULAS = {"softmax_ce": softmax_row, "sigmoid_focal": sigmoid_focal_row, "softmax_focal": softmax_focal_row}


def hand_rows(spec, logits, target, class_weight, ignore_index, hyper):
    """Row losses of the registered loss `spec` at user hyperparameters `hyper` (0.0 for ignored rows), as a
    list of Python floats. logits: a 2-D tensor or nested list; target: 1-D."""
    named = dict(zip((h.name for h in spec.family.hyperparameters), spec.kernel_hyperparameters(hyper)))
    logits = logits.tolist() if hasattr(logits, "tolist") else logits
    target = target.tolist() if hasattr(target, "tolist") else target
    rows = []
    for z, y in zip(logits, target):
        if y == ignore_index:
            rows.append(0.0)
            continue
        alpha = 1.0 if class_weight is None else float(class_weight[y])
        rows.append(ROW_FORMULAS[spec.family.name]([float(v) for v in z], y, alpha, **named))
    return rows
