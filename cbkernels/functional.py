"""The public loss functions. Every backend follows one op contract (docs/op-contract.md), so nothing
here branches on loss details per backend.

Normalisation ("mean"): the sum of alpha_y-weighted row losses divided by the number of non-ignored
rows, as the paper's official code does. This differs from F.cross_entropy(weight=w, reduction="mean"),
which divides by sum(w[y_i]), and from F.binary_cross_entropy_with_logits(reduction="mean"), which
divides by N * C. With every row ignored, "mean" is 0 with a zero gradient.
"""
from __future__ import annotations

import torch

from . import _backends, _checks, _ops, reference

__all__ = ["cb_softmax_cross_entropy", "cb_sigmoid_cross_entropy", "cb_focal_loss"]


def _kernel_loss(backend, family, logits, target, class_weight, param, ignore_index, reduction):
    """The reduced loss through a kernel backend's forward op.

    "mean" folds 1 / (non-ignored rows) into the class weights (a (C,) device op, no host sync): the
    kernel then writes the rows and gradient of the mean itself, and the reduction is a plain sum, whose
    backward hands the op an upstream gradient of exactly 1 per row for loss.backward(). The fused
    backward (_ops.py) skips its scaling pass on such a gradient, so forward + backward is one read of
    the logits and one write of the gradient. Rounding: alpha_y / count is rounded to fp32 once before
    it multiplies the row (about one fp32 ulp against dividing the total afterwards).
    """
    if backend != "cpu":  # the CPU kernel raises on a bad target itself; elsewhere check on the device
        _checks.check_target_range_async(target, logits.shape[1], ignore_index)
    if reduction == "mean":
        if class_weight is None:
            class_weight = torch.ones(logits.shape[1], dtype=torch.float32, device=logits.device)
        class_weight = class_weight / reference.valid_row_count(target, ignore_index)
    with_grad = torch.is_grad_enabled() and logits.requires_grad and _backends.strategy(backend) == "fused"
    rows, _grad = _ops.loss_forward(_backends.ops_namespace_name(backend), family, logits, target, class_weight,
                                    param, ignore_index, with_grad)
    return rows if reduction == "none" else rows.sum()


def cb_softmax_cross_entropy(logits, target, class_weight=None, reduction="mean", ignore_index=-100,
                             label_smoothing=0.0, backend="auto"):
    """Class-balanced softmax cross entropy: alpha_y * (lse(z) - z_y), smoothed targets when label_smoothing > 0.

    logits (N, C) float32/float16/bfloat16/float64; target (N,) int64/int32 class indices; class_weight (C,)
    (e.g. class_balanced_weights(counts)) or None. Returns float32 (float64 for float64 logits).
    """
    class_weight = _checks.check_inputs(logits, target, class_weight)
    _checks.check_reduction(reduction)
    label_smoothing = _checks.check_label_smoothing(label_smoothing)
    ignore_index = _checks.check_ignore_index(ignore_index)
    backend = _backends.resolve(backend, logits)
    if backend == "reference":
        return reference.cb_softmax_cross_entropy(logits, target, class_weight, reduction, ignore_index,
                                                  label_smoothing)
    return _kernel_loss(backend, "softmax_ce", logits, target, class_weight, label_smoothing, ignore_index,
                        reduction)


def cb_focal_loss(logits, target, class_weight=None, gamma=0.5, reduction="mean", ignore_index=-100,
                  backend="auto"):
    """Class-balanced sigmoid focal loss: alpha_y * sum_c -(1 - p_c)^gamma log p_c over the C one-vs-all tasks."""
    class_weight = _checks.check_inputs(logits, target, class_weight)
    _checks.check_reduction(reduction)
    gamma = _checks.check_gamma(gamma)
    ignore_index = _checks.check_ignore_index(ignore_index)
    backend = _backends.resolve(backend, logits)
    if backend == "reference":
        return reference.cb_focal_loss(logits, target, class_weight, gamma, reduction, ignore_index)
    return _kernel_loss(backend, "sigmoid_focal", logits, target, class_weight, gamma, ignore_index, reduction)


def cb_sigmoid_cross_entropy(logits, target, class_weight=None, reduction="mean", ignore_index=-100,
                             backend="auto"):
    """Class-balanced sigmoid cross entropy: the focal loss with gamma = 0."""
    return cb_focal_loss(logits, target, class_weight, 0.0, reduction, ignore_index, backend)
