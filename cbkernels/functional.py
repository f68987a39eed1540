"""The public loss functions. Every backend follows one op contract (docs/op-contract.md), and every loss
is one entry of the registry (losses.py), so one code path serves them all.

Normalisation ("mean"): the sum of alpha_y-weighted row losses divided by the number of non-ignored
rows, as the paper's official code does (docs/math.md, section 4). This differs from F.cross_entropy(weight=w,
reduction="mean"), which divides by sum(w[y_i]), and from F.binary_cross_entropy_with_logits(reduction=
"mean"), which divides by N * C. With every row ignored, "mean" is 0 with a zero gradient. `normalizer`
replaces the divisor (a number, or a 0-d tensor kept on the device); `sample_weight` (N,) multiplies each
row's loss (the divisor stays the row count).

Targets: (N,) class indices (int64/int32), or a dense (N, C) floating tensor of target values: multi-hot or
soft rows in [0, 1] for the sigmoid and focal losses (multi-label data, rows with no positive class),
non-negative probability rows for the softmax losses (mixup, cutmix, distillation; used as given, not
renormalised). A dense target is read in the logits' dtype; ignore_index applies to class indices only, and
"mean" divides a dense target's rows by N.

Every public loss takes, after its own arguments:
  logit_offset (C,) or None: added to every row's logits inside the kernel (logit adjustment, Balanced
    Softmax: adjustments.logit_adjustment_offsets); the softmax losses also take target_margin (C,) or
    None, subtracted from each row's target logit (LDAM: adjustments.ldam_margins). The loss and its
    gradient are those at the adjusted logits (docs/long-tail.md).
  sample_weight (N,) floating or None: row i's loss (and gradient) times sample_weight[i], inside the kernel.
  normalizer: with reduction="mean" only, the divisor of the summed rows: a number > 0 or a 0-d tensor.
  weighting: "row" (default): class_weight weighs each row by its target's class (sum_c t_ic w_c for a dense
    row: the official code's multi-label convention); "element": it weighs each class's term, as PyTorch's
    weight= does (with class indices, reduction="sum" then equals F.cross_entropy(weight=w, label_smoothing=eps,
    reduction="sum")). docs/math.md, section 14.
"""
from __future__ import annotations

import torch

from . import _backends, _checks, _ops, _reduction
from .losses import LOSSES, Loss, loss as _registered

# The public function of every registered loss (each defined below under its registry name).
__all__ = [spec.function for spec in LOSSES]


def kernel_rows(backend, spec: Loss, logits, target, class_weight, hyperparameters, ignore_index, reduction,
                with_grad, logit_offset=None, target_margin=None, sample_weight=None, normalizer=None,
                element_weight=None):
    """The per-row losses (N,) through a kernel backend's forward op, for `reduction` ("mean" folded in).

    "mean" folds 1 / (non-ignored rows, or the normalizer) into the class weights, or into the element weights
    (_reduction.mean_weights; a (C,) device op, no host sync): the kernel then writes the rows and gradient of the mean itself, and the reduction is a plain sum, whose
    backward hands the op an upstream gradient of exactly 1 per row for loss.backward(). The fused
    backward (_ops.py) skips its scaling pass on such a gradient, so forward + backward is one read of
    the logits and one write of the gradient. Rounding: alpha_y / count is rounded to fp32 once before
    it multiplies the row (about one fp32 ulp against dividing the total afterwards).
    """
    if not backend.checks_targets and target.dim() == 1:
        # (A dense target's values are checked by the CPU ops on the host; GPU kernels read a bad one as NaN.)
        _checks.check_target_range_async(target, logits.shape[1], ignore_index)
    if reduction == "mean":
        class_weight, element_weight = _reduction.mean_weights(class_weight, element_weight, target, ignore_index,
                                                               logits.shape[1], normalizer)
    rows, _grad = _ops.loss_forward(backend.namespace, spec.family, logits, target, class_weight, hyperparameters,
                                    ignore_index, with_grad, logit_offset, target_margin, sample_weight,
                                    element_weight)
    return rows


def apply_loss(spec: Loss, logits, target, class_weight, reduction, ignore_index, backend, hyperparameters,
               logit_offset=None, target_margin=None, sample_weight=None, normalizer=None, weighting="row"):
    """One public loss call: checks, the backend's choice, the kernel (or the reference) and the reduction.

    hyperparameters: the user's values by name (checked here by the registry). logit_offset / target_margin /
    sample_weight / normalizer / weighting: the module docstring's. Under torch.compile the path after the
    whole-call shortcut is what is traced."""
    if (type(ignore_index) is int and type(logits) is torch.Tensor and not torch.compiler.is_compiling()
            and (target_margin is None or spec.family.takes_target_margin)
            and (weighting == "row" or weighting == "element")
            and (normalizer is None or type(normalizer) is float or type(normalizer) is int)):
        # An eager call on a backend whose namespace has `<family>_loss` (the C++ extension,
        # csrc/common/loss_function.h) runs as that one op: the same checks, folding, kernel, reduction and
        # autograd formula as the code below, bit for bit, at C++ host costs. When anything refuses the
        # arguments, the code below runs instead: its checks raise in the public API's words and order, or
        # take what the op's narrower contract refuses but the API accepts (float64 class weights, a gamma
        # given as a 0-d tensor, ...). A tensor normalizer always takes the code below (the op's is a float).
        values = spec.plain_kernel_hyperparameters(hyperparameters)  # the op checks their domains
        try:
            record = _backends.resolve(backend, logits)
            if record.whole_call and values is not None:
                row_weight, element_weight = _reduction.split_weighting(class_weight, weighting)
                return _ops.LOSS_OPS[spec.family.name](logits, target, row_weight, *values, ignore_index,
                                                       reduction, record.strategy() == "fused", logit_offset,
                                                       target_margin, sample_weight, element_weight,
                                                       None if normalizer is None else float(normalizer))
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError, ValueError):
            pass
    target, class_weight = _checks.check_inputs(logits, target, class_weight)
    logit_offset, target_margin = _checks.check_logit_adjustments(spec.family, logit_offset, target_margin,
                                                                  logits.shape[1], logits.device,
                                                                  dense_target=target.dim() == 2)
    _checks.check_reduction(reduction)
    class_weight, element_weight = _reduction.split_weighting(class_weight, _checks.check_weighting(weighting))
    sample_weight = _checks.check_sample_weight(sample_weight, logits.shape[0], logits.device)
    normalizer = _checks.check_normalizer(normalizer, reduction, logits.device)
    ignore_index = _checks.check_ignore_index(ignore_index)
    values = spec.kernel_hyperparameters(hyperparameters)
    backend = _backends.resolve(backend, logits)
    if not backend.is_kernel:
        rows = spec.reference_rows(logits, target, class_weight, ignore_index, values, logit_offset, target_margin,
                                   sample_weight, element_weight)
        return _reduction.reduce_rows(rows, target, ignore_index, reduction, normalizer)
    with_grad = torch.is_grad_enabled() and logits.requires_grad and backend.strategy() == "fused"
    rows = kernel_rows(backend, spec, logits, target, class_weight, values, ignore_index, reduction, with_grad,
                       logit_offset, target_margin, sample_weight, normalizer, element_weight)
    return rows if reduction == "none" else rows.sum()


_SOFTMAX = _registered("softmax")
_SIGMOID = _registered("sigmoid")
_FOCAL = _registered("focal")
_SOFTMAX_FOCAL = _registered("softmax_focal")


def cb_softmax_cross_entropy(logits, target, class_weight=None, reduction="mean", ignore_index=-100,
                             label_smoothing=0.0, backend="auto", logit_offset=None, target_margin=None,
                             sample_weight=None, normalizer=None, weighting="row"):
    """Class-balanced softmax cross entropy: alpha_y * (lse(z) - z_y), smoothed targets when label_smoothing > 0.

    logits (N, C) float32/float16/bfloat16/float64; target (N,) int64/int32 class indices or (N, C) probability
    rows q (loss a * sum_c q'_c (lse(z) - z_c), a = sum_c q_c w_c); class_weight (C,) (e.g.
    class_balanced_weights(counts)) or None. Returns float32 (float64 for float64 logits).
    logit_offset, target_margin, sample_weight, normalizer, weighting: the module docstring's.
    """
    return apply_loss(_SOFTMAX, logits, target, class_weight, reduction, ignore_index, backend,
                      {"label_smoothing": label_smoothing}, logit_offset, target_margin, sample_weight, normalizer,
                      weighting)


def cb_focal_loss(logits, target, class_weight=None, gamma=0.5, reduction="mean", ignore_index=-100,
                  backend="auto", logit_offset=None, sample_weight=None, normalizer=None, weighting="row"):
    """Class-balanced sigmoid focal loss: alpha_y * sum_c -(1 - p_c)^gamma log p_c over the C one-vs-all tasks.
    target: class indices, or (N, C) multi-hot / soft values in [0, 1] (the official code's term at soft t,
    docs/math.md section 14; row weight sum_c t_c w_c). logit_offset, sample_weight, normalizer, weighting: the
    module docstring's."""
    return apply_loss(_FOCAL, logits, target, class_weight, reduction, ignore_index, backend, {"gamma": gamma},
                      logit_offset, None, sample_weight, normalizer, weighting)


def cb_sigmoid_cross_entropy(logits, target, class_weight=None, reduction="mean", ignore_index=-100,
                             backend="auto", logit_offset=None, sample_weight=None, normalizer=None,
                             weighting="row"):
    """Class-balanced sigmoid cross entropy: the focal loss with gamma = 0 (other arguments: as cb_focal_loss)."""
    return apply_loss(_SIGMOID, logits, target, class_weight, reduction, ignore_index, backend, {}, logit_offset,
                      None, sample_weight, normalizer, weighting)


def cb_softmax_focal_loss(logits, target, class_weight=None, gamma=2.0, reduction="mean", ignore_index=-100,
                          label_smoothing=0.0, backend="auto", logit_offset=None, target_margin=None,
                          sample_weight=None, normalizer=None, weighting="row"):
    """Class-balanced softmax focal loss: alpha_y * sum_c q'_c (1 - p_c)^gamma (-log p_c), p = softmax(z),
    q' = (1 - label_smoothing) onehot(y) + label_smoothing / C; without smoothing alpha_y (1 - p_y)^gamma
    (-log p_y). gamma = 0 is cb_softmax_cross_entropy. Finite loss and gradient for confident rows
    (p_y -> 1) at every gamma >= 0 (docs/math.md, section 13). Arguments (dense targets included) as
    cb_softmax_cross_entropy.
    """
    return apply_loss(_SOFTMAX_FOCAL, logits, target, class_weight, reduction, ignore_index, backend,
                      {"gamma": gamma, "label_smoothing": label_smoothing}, logit_offset, target_margin,
                      sample_weight, normalizer, weighting)
