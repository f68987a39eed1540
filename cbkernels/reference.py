"""Pure-PyTorch specification of the class-balanced losses (docs/math.md, sections 3 and 5-7).

This is the spec every kernel is tested against (in float64) and the fallback backend. It is
plain autograd: no custom backward, so gradcheck verifies its gradients independently.

Per-row losses, z the row's logits (C,), q its target: onehot(y) for a class index y, or a dense target
row (N, C) as given; a = the row weight: class_weight[y], or sum_c q_c class_weight[c] for a dense row (1 when
class_weight is None); e = element_weight (C,) (1 when None) multiplies each class's term:
  softmax:  a * sum_c e_c q'_c (lse(z) - z_c),  q' = (1 - eps) * q + eps / C
            (for a class index and e = 1: a * [ lse(z) - (1 - eps) * z_y - (eps / C) * sum_c z_c ])
  focal:    a * sum_c e_c * mod(z_c, q_c) * bce(z_c, q_c), the official code's term at soft targets:
            bce(z, t) = t * softplus(-z) + (1 - t) * softplus(z),
            mod(z, t) = exp(-gamma * (t * z + softplus(-z))) = exp(-gamma * (t * softplus(z) + (1 - t) * softplus(-z)))
            (for t in {0, 1}: (1 - p)^gamma * (-log p), p the probability of the right answer)
  sigmoid:  focal with gamma = 0
  softmax focal: a * sum_c e_c q'_c * (1 - p_c)^gamma * (-log p_c),  p = softmax(z)
            (gamma = 0 is the softmax cross entropy)
Logit adjustments (every loss, docs/long-tail.md): each loss is computed at z'_c = z_c + logit_offset[c]
- [c == y] target_margin[y] (adjusted_logits; the margin needs class-index targets), and its gradient with
respect to z is the one at z'.
Sample weights (every loss): row i's loss times sample_weight[i] (weighted_rows).
Rows whose class-index target equals ignore_index contribute 0 loss and 0 gradient (dense rows are never ignored).
The reductions ("none", "sum", "mean" = sum / number of non-ignored rows, or / normalizer) are
_reduction.reduce_rows;
losses.Loss.reference puts the two together for each registered loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_target_range_async
from ._reduction import compute_dtype

__all__ = ["adjusted_logits", "weighted_rows", "softmax_rows", "sigmoid_focal_rows", "softmax_focal_rows",
           "is_dense_target"]


def is_dense_target(target) -> bool:
    """A dense (N, C) target (multi-hot, soft or mixed rows), as opposed to (N,) class indices."""
    return target.dim() == 2


def adjusted_logits(logits, target, ignore_index=-100, logit_offset=None, target_margin=None):
    """z + logit_offset[None, :] - onehot(y) * target_margin[y], in the compute dtype (float32, or float64
    for float64 logits): the logits every loss is computed at. Ignored rows get no margin (their target
    is no class); the families mask those rows out anyway."""
    if logit_offset is None and target_margin is None:
        return logits
    z = logits.to(compute_dtype(logits.dtype))
    if logit_offset is not None:
        z = z + logit_offset.to(z.dtype)
    if target_margin is not None:
        valid, safe = _valid_and_safe_target(logits, target, ignore_index)
        margin = torch.where(valid, target_margin.to(z.dtype).gather(0, safe), 0.0)
        z = z - torch.zeros_like(z).scatter(1, safe.unsqueeze(1), margin.unsqueeze(1))
    return z


def weighted_rows(rows, target, ignore_index, sample_weight):
    """rows * sample_weight; ignored rows stay exactly 0 whatever their weight (NaN and inf included)."""
    if sample_weight is None:
        return rows
    weighted = rows * sample_weight.to(rows.dtype)
    if is_dense_target(target):
        return weighted
    return torch.where(target != ignore_index, weighted, torch.zeros_like(rows))


def _valid_and_safe_target(logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
    """(valid rows, targets with ignored rows replaced by class 0); for a dense target every row is valid."""
    if is_dense_target(target):
        valid = torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
        return valid, None
    check_target_range_async(target, logits.shape[1], ignore_index)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    return valid, safe


def _masked_logits(logits, valid):
    # Ignored rows are replaced by zeros before any math: their NaN or inf must not reach the loss, and
    # their gradient must be exactly 0 (a where on the output alone would give 0 * NaN = NaN in backward).
    z = logits.to(compute_dtype(logits.dtype))
    return torch.where(valid.unsqueeze(1), z, torch.zeros_like(z))


def _row_weight(class_weight, target, safe_target, dtype):
    """a: class_weight[y] for class indices, sum_c q_c class_weight[c] for a dense target row (None: 1)."""
    if class_weight is None:
        return None
    if is_dense_target(target):
        return target.to(dtype) @ class_weight.to(dtype)
    return class_weight.to(dtype).gather(0, safe_target)


def _dense_target(target, dtype, family_range):
    """The dense target in the compute dtype, its values checked device-side (like the class indices):
    family_range "unit" for [0, 1] (sigmoid), "nonnegative" for >= 0 (softmax). NaN is out of range."""
    ok = (target >= 0) & (target <= 1) if family_range == "unit" else target >= 0
    message = ("target (dense) holds a value outside [0, 1]" if family_range == "unit" else
               "target (dense) holds a negative or NaN value")
    torch._assert_async(ok.all(), message)
    return target.to(dtype)


def _weighted_row_sum(terms, element_weight):
    """sum_c e_c terms_c per row."""
    if element_weight is not None:
        terms = terms * element_weight.to(terms.dtype)
    return terms.sum(dim=1)


def _finish(rows, class_weight, target, safe, valid):
    alpha = _row_weight(class_weight, target, safe, rows.dtype)
    if alpha is not None:
        rows = alpha * rows
    return torch.where(valid, rows, torch.zeros_like(rows))


def softmax_rows(logits, target, class_weight=None, ignore_index=-100, label_smoothing=0.0, element_weight=None):
    """Per-row class-balanced softmax cross entropy, shape (N,), in float32 (float64 for float64 logits)."""
    valid, safe = _valid_and_safe_target(logits, target, ignore_index)
    z = _masked_logits(logits, valid)
    if is_dense_target(target) or element_weight is not None:
        # sum_c e_c q'_c (lse - z_c): with q' the smoothed dense or one-hot rows
        q = _smoothed_target(target, safe, z, label_smoothing)
        rows = _weighted_row_sum(q * -torch.log_softmax(z, dim=1), element_weight)
        return _finish(rows, class_weight, target, safe, valid)
    z_y = z.gather(1, safe.unsqueeze(1)).squeeze(1)
    if z.shape[1] == 1:
        rows = torch.zeros_like(z_y) * z_y  # lse(z) == z_y: a single class costs nothing (keeps NaN as NaN)
    else:
        # lse(z) - z_y = softplus(lse_{c != y}(z_c) - z_y): the same value, but autograd's true-class gradient
        # is then -sigmoid(lse_rest - z_y) = -(1 - p_y) with full relative precision. Through lse(z) it would be
        # p_y - 1, which rounds to 0 in float32 once 1 - p_y < 6e-8 (a confident prediction, margin ~17).
        onehot = F.one_hot(safe, z.shape[1]).to(torch.bool)
        lse_rest = torch.logsumexp(z.masked_fill(onehot, float("-inf")), dim=1)
        rows = F.softplus(lse_rest - z_y)
    if label_smoothing:
        # (1 - eps) CE(onehot) + eps CE(uniform) = (lse - z_y) + eps * (z_y - mean(z))
        rows = rows + label_smoothing * (z_y - z.mean(dim=1))
    return _finish(rows, class_weight, target, safe, valid)


def _smoothed_target(target, safe, z, label_smoothing):
    """q' = (1 - eps) q + eps / C (N, C) in z's dtype, q the dense target or onehot(y)."""
    if is_dense_target(target):
        q = _dense_target(target, z.dtype, "nonnegative")
    else:
        q = F.one_hot(safe, z.shape[1]).to(z.dtype)
    return (1.0 - label_smoothing) * q + label_smoothing / z.shape[1] if label_smoothing else q


def sigmoid_focal_rows(logits, target, class_weight=None, ignore_index=-100, gamma=0.0, element_weight=None):
    """Per-row class-balanced focal loss (sigmoid CE when gamma == 0), shape (N,).

    With u = t * z: -log p = -logsigmoid(u) and (1 - p)^gamma = exp(gamma * logsigmoid(-u)); both are
    stable for |z| up to the format's range, and autograd through logsigmoid has the exact derivative
    at u = 0 (a hand-written max(u, 0) + log1p(exp(-|u|)) would give 0 there through autograd).
    """
    valid, safe = _valid_and_safe_target(logits, target, ignore_index)
    z = _masked_logits(logits, valid)
    if is_dense_target(target):
        # Soft t: t * softplus(-z) + (1 - t) * softplus(z) and the modulator's exponent, each a sum of two
        # non-negative terms (no cancellation); at t in {0, 1} they are the two branches below.
        t = _dense_target(target, z.dtype, "unit")
        terms = t * F.softplus(-z) + (1 - t) * F.softplus(z)
        if gamma != 0:
            terms = torch.exp(-gamma * (t * F.softplus(z) + (1 - t) * F.softplus(-z))) * terms
    else:
        onehot = F.one_hot(safe, z.shape[1]).to(torch.bool)
        u = torch.where(onehot, z, -z)
        terms = -F.logsigmoid(u)
        if gamma != 0:
            terms = torch.exp(gamma * F.logsigmoid(-u)) * terms
    return _finish(_weighted_row_sum(terms, element_weight), class_weight, target, safe, valid)


def softmax_focal_rows(logits, target, class_weight=None, ignore_index=-100, gamma=2.0, label_smoothing=0.0,
                       element_weight=None):
    """Per-row class-balanced softmax focal loss, shape (N,).

    Stable for confident rows: no 1 - p is formed by subtraction near p = 1, so the autograd derivative of
    (1 - p)^gamma = exp(gamma * log(1 - p)) stays finite as p -> 1 for every gamma >= 0 (the pow form's
    gamma * (1 - p)^(gamma - 1) is infinite there for gamma < 1).
    - The target: with d = lse_{c != y} - z_y, p_y = sigmoid(-d), so -log p_y = softplus(d) and
      log(1 - p_y) = logsigmoid(d) (as softmax_rows, section 7 of docs/math.md).
    - Every class (label smoothing, dense targets, element weights: _focal_terms): for the row's most probable class k, the only one that can have
      p > 1/2, the same two forms with d = lse_{c != k} - z_k; for the others -log p_c = lse - z_c and
      log(1 - p_c) = log1p(-p_c) with p_c <= 1/2. Each `where` feeds its unused branch a harmless value,
      so no inf or NaN from that branch reaches the gradient.
    """
    valid, safe = _valid_and_safe_target(logits, target, ignore_index)
    z = _masked_logits(logits, valid)
    num_classes = z.shape[1]
    if num_classes == 1:
        rows = torch.zeros_like(z[:, 0]) * z[:, 0]  # p = 1: no loss (keeps NaN as NaN), as softmax_rows
        if is_dense_target(target):
            rows = rows * _dense_target(target, z.dtype, "nonnegative")[:, 0]
    elif is_dense_target(target) or element_weight is not None:
        q = _smoothed_target(target, safe, z, label_smoothing)
        rows = _weighted_row_sum(q * _focal_terms(z, gamma), element_weight)
    else:
        rows = _focal_of_class(z, F.one_hot(safe, num_classes).to(torch.bool), gamma)
        if label_smoothing:
            # q' = (1 - eps) onehot + eps / C
            rows = (1.0 - label_smoothing) * rows + (label_smoothing / num_classes) * _focal_terms(z, gamma).sum(dim=1)
    return _finish(rows, class_weight, target, safe, valid)


def _focal_terms(z, gamma):
    """(1 - p_c)^gamma * (-log p_c) of every class (N, C), each in a stable form: the row's most probable class,
    the only one that can have p > 1/2, through _focal_of_class; the others with -log p_c = lse - z_c and
    log(1 - p_c) = log1p(-p_c), p_c <= 1/2."""
    top = F.one_hot(z.argmax(dim=1), z.shape[1]).to(torch.bool)
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    log_p_rest = torch.where(top, torch.zeros_like(z), z - lse)  # p <= 1/2 off the top class
    neg_log_p = torch.where(top, 0.0, -log_p_rest)
    log_q = torch.where(top, 0.0, torch.log1p(-torch.exp(log_p_rest)))
    terms = neg_log_p if gamma == 0 else torch.exp(gamma * log_q) * neg_log_p
    return torch.where(top, _focal_of_class(z, top, gamma).unsqueeze(1), terms)


def _focal_of_class(z, one_per_row, gamma):
    """(1 - p_k)^gamma * (-log p_k) of the class k that `one_per_row` (N, C) marks in each row, shape (N,):
    with d = lse_{c != k} - z_k, p_k = sigmoid(-d), -log p_k = softplus(d), log(1 - p_k) = logsigmoid(d)."""
    z_k = z.masked_fill(~one_per_row, 0.0).sum(dim=1)
    d = torch.logsumexp(z.masked_fill(one_per_row, float("-inf")), dim=1) - z_k
    neg_log_p = F.softplus(d)
    return neg_log_p if gamma == 0 else torch.exp(gamma * F.logsigmoid(d)) * neg_log_p
