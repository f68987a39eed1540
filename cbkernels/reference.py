"""Pure-PyTorch specification of the class-balanced losses (docs/math.md, sections 3 and 5-7).

This is the spec every kernel is tested against (in float64) and the fallback backend. It is
plain autograd: no custom backward, so gradcheck verifies its gradients independently.

Per-row losses, z the row's logits (C,), y its class, alpha_y = class_weight[y] (1 when None):
  softmax:  alpha_y * [ lse(z) - (1 - eps) * z_y - (eps / C) * sum_c z_c ]
            (cross entropy against the smoothed target (1 - eps) * onehot(y) + eps / C)
  focal:    alpha_y * sum_c -(1 - p_c)^gamma * log p_c,  p_c = sigmoid(t_c * z_c),  t_c = +1 if c == y else -1
  sigmoid:  focal with gamma = 0
Rows whose target equals ignore_index contribute 0 loss and 0 gradient.
The reductions ("none", "sum", "mean" = sum / number of non-ignored rows) are _reduction.reduce_rows;
losses.Loss.reference puts the two together for each registered loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_target_range_async
from ._reduction import compute_dtype

__all__ = ["softmax_rows", "sigmoid_focal_rows"]


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
