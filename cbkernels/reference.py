"""Pure-PyTorch specification of the class-balanced losses (docs/math.md, sections 3 and 5-7).

This is the spec every kernel is tested against (in float64) and the fallback backend. It is
plain autograd: no custom backward, so gradcheck verifies its gradients independently.

Per-row losses, z the row's logits (C,), y its class, alpha_y = class_weight[y] (1 when None):
  softmax:  alpha_y * [ lse(z) - (1 - eps) * z_y - (eps / C) * sum_c z_c ]
            (cross entropy against the smoothed target (1 - eps) * onehot(y) + eps / C)
  focal:    alpha_y * sum_c -(1 - p_c)^gamma * log p_c,  p_c = sigmoid(t_c * z_c),  t_c = +1 if c == y else -1
  sigmoid:  focal with gamma = 0
  softmax focal: alpha_y * sum_c q'_c * (1 - p_c)^gamma * (-log p_c),  p = softmax(z),
            q' = (1 - eps) * onehot(y) + eps / C  (gamma = 0 is the softmax cross entropy)
Logit adjustments (every loss, docs/long-tail.md): each loss is computed at z'_c = z_c + logit_offset[c]
- [c == y] target_margin[y] (adjusted_logits), and its gradient with respect to z is the one at z'.
Sample weights (every loss): row i's loss times sample_weight[i] (weighted_rows).
Rows whose target equals ignore_index contribute 0 loss and 0 gradient.
The reductions ("none", "sum", "mean" = sum / number of non-ignored rows, or / normalizer) are
_reduction.reduce_rows;
losses.Loss.reference puts the two together for each registered loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_target_range_async
from ._reduction import compute_dtype

__all__ = ["adjusted_logits", "weighted_rows", "softmax_rows", "sigmoid_focal_rows", "softmax_focal_rows"]


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
    return torch.where(target != ignore_index, rows * sample_weight.to(rows.dtype), torch.zeros_like(rows))


def _valid_and_safe_target(logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
    check_target_range_async(target, logits.shape[1], ignore_index)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    return valid, safe


def _masked_logits(logits, valid):
    # Ignored rows are replaced by zeros before any math: their NaN or inf must not reach the loss, and
    # their gradient must be exactly 0 (a where on the output alone would give 0 * NaN = NaN in backward).
    z = logits.to(compute_dtype(logits.dtype))
    return torch.where(valid.unsqueeze(1), z, torch.zeros_like(z))


def _alpha(class_weight, safe_target, dtype):
    if class_weight is None:
        return None
    return class_weight.to(dtype).gather(0, safe_target)


def softmax_rows(logits, target, class_weight=None, ignore_index=-100, label_smoothing=0.0):
    """Per-row class-balanced softmax cross entropy, shape (N,), in float32 (float64 for float64 logits)."""
    valid, safe = _valid_and_safe_target(logits, target, ignore_index)
    z = _masked_logits(logits, valid)
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
    alpha = _alpha(class_weight, safe, z.dtype)
    if alpha is not None:
        rows = alpha * rows
    return torch.where(valid, rows, torch.zeros_like(rows))


def sigmoid_focal_rows(logits, target, class_weight=None, ignore_index=-100, gamma=0.0):
    """Per-row class-balanced focal loss (sigmoid CE when gamma == 0), shape (N,).

    With u = t * z: -log p = -logsigmoid(u) and (1 - p)^gamma = exp(gamma * logsigmoid(-u)); both are
    stable for |z| up to the format's range, and autograd through logsigmoid has the exact derivative
    at u = 0 (a hand-written max(u, 0) + log1p(exp(-|u|)) would give 0 there through autograd).
    """
    valid, safe = _valid_and_safe_target(logits, target, ignore_index)
    z = _masked_logits(logits, valid)
    onehot = F.one_hot(safe, z.shape[1]).to(torch.bool)
    u = torch.where(onehot, z, -z)
    terms = -F.logsigmoid(u)
    if gamma != 0:
        terms = torch.exp(gamma * F.logsigmoid(-u)) * terms
    rows = terms.sum(dim=1)
    alpha = _alpha(class_weight, safe, z.dtype)
    if alpha is not None:
        rows = alpha * rows
    return torch.where(valid, rows, torch.zeros_like(rows))


def softmax_focal_rows(logits, target, class_weight=None, ignore_index=-100, gamma=2.0, label_smoothing=0.0):
    """Per-row class-balanced softmax focal loss, shape (N,).

    Stable for confident rows: no 1 - p is formed by subtraction near p = 1, so the autograd derivative of
    (1 - p)^gamma = exp(gamma * log(1 - p)) stays finite as p -> 1 for every gamma >= 0 (the pow form's
    gamma * (1 - p)^(gamma - 1) is infinite there for gamma < 1).
    - The target: with d = lse_{c != y} - z_y, p_y = sigmoid(-d), so -log p_y = softplus(d) and
      log(1 - p_y) = logsigmoid(d) (as softmax_rows, section 7 of docs/math.md).
    - Every class (label smoothing only): for the row's most probable class k, the only one that can have
      p > 1/2, the same two forms with d = lse_{c != k} - z_k; for the others -log p_c = lse - z_c and
      log(1 - p_c) = log1p(-p_c) with p_c <= 1/2. Each `where` feeds its unused branch a harmless value,
      so no inf or NaN from that branch reaches the gradient.
    """
    valid, safe = _valid_and_safe_target(logits, target, ignore_index)
    z = _masked_logits(logits, valid)
    num_classes = z.shape[1]
    if num_classes == 1:
        rows = torch.zeros_like(z[:, 0]) * z[:, 0]  # p = 1: no loss (keeps NaN as NaN), as softmax_rows
    else:
        rows = _focal_of_class(z, F.one_hot(safe, num_classes).to(torch.bool), gamma)
        if label_smoothing:
            top = F.one_hot(z.argmax(dim=1), num_classes).to(torch.bool)
            lse = torch.logsumexp(z, dim=1, keepdim=True)
            log_p_rest = torch.where(top, torch.zeros_like(z), z - lse)  # p <= 1/2 off the top class
            neg_log_p = torch.where(top, 0.0, -log_p_rest)
            log_q = torch.where(top, 0.0, torch.log1p(-torch.exp(log_p_rest)))
            terms = neg_log_p if gamma == 0 else torch.exp(gamma * log_q) * neg_log_p
            terms = torch.where(top, _focal_of_class(z, top, gamma).unsqueeze(1), terms)
            # q' = (1 - eps) onehot + eps / C
            rows = (1.0 - label_smoothing) * rows + (label_smoothing / num_classes) * terms.sum(dim=1)
    alpha = _alpha(class_weight, safe, z.dtype)
    if alpha is not None:
        rows = alpha * rows
    return torch.where(valid, rows, torch.zeros_like(rows))


def _focal_of_class(z, one_per_row, gamma):
    """(1 - p_k)^gamma * (-log p_k) of the class k that `one_per_row` (N, C) marks in each row, shape (N,):
    with d = lse_{c != k} - z_k, p_k = sigmoid(-d), -log p_k = softplus(d), log(1 - p_k) = logsigmoid(d)."""
    z_k = z.masked_fill(~one_per_row, 0.0).sum(dim=1)
    d = torch.logsumexp(z.masked_fill(one_per_row, float("-inf")), dim=1) - z_k
    neg_log_p = F.softplus(d)
    return neg_log_p if gamma == 0 else torch.exp(gamma * F.logsigmoid(d)) * neg_log_p
