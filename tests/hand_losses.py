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


# --- dense targets and element weights (docs/math.md, section 14), written from the formulas ---------
# Each row: q the target row (a list of C floats: one-hot for a class index, or the dense row as given),
# a the row weight (class_weight[y], or sum_c q_c class_weight[c] for a dense row, or 1), e the element weights.

def _softmax_probabilities(z):
    m = max(z)
    exps = [math.exp(v - m) for v in z]
    total = math.fsum(exps)
    return [v / total for v in exps]


def general_softmax_row(z, q, a, e, label_smoothing):
    p = _softmax_probabilities(z)
    smoothed = [(1 - label_smoothing) * t + label_smoothing / len(z) for t in q]
    return a * math.fsum(e[c] * smoothed[c] * -math.log(p[c]) for c in range(len(z)))


def general_sigmoid_focal_row(z, q, a, e, gamma):
    """The official code's term at soft t, literally: exp(-gamma t z - gamma log1p(exp(-z))) * BCE(z, t)."""
    terms = []
    for c, (v, t) in enumerate(zip(z, q)):
        p = 1 / (1 + math.exp(-v))
        bce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
        terms.append(e[c] * math.exp(-gamma * t * v - gamma * math.log1p(math.exp(-v))) * bce)
    return a * math.fsum(terms)


def general_softmax_focal_row(z, q, a, e, gamma, label_smoothing):
    p = _softmax_probabilities(z)
    smoothed = [(1 - label_smoothing) * t + label_smoothing / len(z) for t in q]
    return a * math.fsum(e[c] * smoothed[c] * (1 - p[c]) ** gamma * -math.log(p[c]) for c in range(len(z)))


GENERAL_ROW_FORMULAS = {"softmax_ce": general_softmax_row, "sigmoid_focal": general_sigmoid_focal_row,
                        "softmax_focal": general_softmax_focal_row}


def general_hand_rows(spec, logits, target, class_weight, weighting, ignore_index, hyper):
    """Row losses of `spec` for class-index or dense targets under weighting "row" or "element", as Python
    floats (0.0 for ignored class-index rows)."""
    named = dict(zip((h.name for h in spec.family.hyperparameters), spec.kernel_hyperparameters(hyper)))
    logits, target = logits.tolist(), target.tolist()
    num_classes = len(logits[0])
    w = [1.0] * num_classes if class_weight is None else [float(v) for v in class_weight]
    rows = []
    for z, y in zip(logits, target):
        if isinstance(y, list):
            q = [float(t) for t in y]
        elif y == ignore_index:
            rows.append(0.0)
            continue
        else:
            q = [float(c == y) for c in range(num_classes)]
        if weighting == "element":
            a, e = 1.0, w
        else:
            a = 1.0 if class_weight is None else math.fsum(t * wc for t, wc in zip(q, w))
            e = [1.0] * num_classes
        rows.append(GENERAL_ROW_FORMULAS[spec.family.name]([float(v) for v in z], q, a, e, **named))
    return rows
