"""The reductions and dtype rules every loss path shares (functional, reference, linear, distributed).

"mean" divides the sum of the weighted row losses by the number of non-ignored rows (the official code's
convention, docs/math.md, section 4), at least 1 so that a batch with every row ignored gives 0, not NaN. That count
is a device tensor: dividing by it never syncs with the host. Dense (N, C) targets ignore no row: their divisor is
N (at least 1). A user's `normalizer` (a number, or a 0-d tensor kept on its device) replaces that divisor.

Weighting (docs/math.md, section 14): "row" (the default) multiplies row i's loss by the class weight of its
target (sum_c t_ic w_c for a dense row); "element" multiplies each class's term by that class's weight. The
kernels take the two as separate (C,) inputs, class_weight and element_weight (split_weighting).
"""
from __future__ import annotations

import torch

REDUCTIONS = ("none", "mean", "sum")
WEIGHTINGS = ("row", "element")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 for float64 inputs, else float32 (the kernels' accumulation type)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def valid_row_count(target: torch.Tensor, ignore_index: int):
    """The number of non-ignored rows, at least 1 (the "mean" denominator): for class indices a device tensor
    (no sync), for a dense target (no row ignored) max(N, 1) as a number."""
    if target.dim() == 2:
        return max(target.shape[0], 1)
    return (target != ignore_index).sum().clamp(min=1)


def split_weighting(class_weight, weighting: str):
    """(class_weight, element_weight) as the kernels take them: the user's class weights weigh rows
    (weighting "row") or each class's term ("element")."""
    return (class_weight, None) if weighting == "row" else (None, class_weight)


def mean_divisor(target: torch.Tensor, ignore_index: int, normalizer=None):
    """The "mean" divisor: the normalizer (checked: _checks.check_normalizer) when given, else the number of
    non-ignored rows, at least 1 (a device tensor)."""
    return valid_row_count(target, ignore_index) if normalizer is None else normalizer


def divide_by_mean_divisor(value: torch.Tensor, target: torch.Tensor, ignore_index: int, normalizer=None):
    """value / mean_divisor, the divisor taken in value's dtype (a float64 or integer 0-d normalizer must not
    change it)."""
    divisor = mean_divisor(target, ignore_index, normalizer)
    return value / (divisor.to(value.dtype) if isinstance(divisor, torch.Tensor) else divisor)


def reduce_rows(rows: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str,
                normalizer=None) -> torch.Tensor:
    """"none" | "sum" | "mean" (sum over rows / mean_divisor: by default the number of non-ignored rows, 0 if
    there are none)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return divide_by_mean_divisor(total, target, ignore_index, normalizer)


def mean_class_weight(class_weight, target: torch.Tensor, ignore_index: int, num_classes: int,
                      normalizer=None) -> torch.Tensor:
    """class_weight / mean_divisor as float32 (C,): folded into a kernel's weights, it makes the summed rows
    the "mean" (ones / divisor when class_weight is None)."""
    if class_weight is None:
        class_weight = torch.ones(num_classes, dtype=torch.float32, device=target.device)
    return class_weight / mean_divisor(target, ignore_index, normalizer)


def mean_weights(class_weight, element_weight, target: torch.Tensor, ignore_index: int, num_classes: int,
                 normalizer=None):
    """(class_weight, element_weight) with 1 / mean_divisor folded into one of them, so that the kernel's
    summed rows are the "mean": into the element weights when there are some, or when a dense target has no
    class weights (its row weight is then 1, while ones(C) as class weights would make it sum_c t_ic), else
    into the class weights (mean_class_weight). csrc/common/loss_function.h folds the same way."""
    if element_weight is not None or (target.dim() == 2 and class_weight is None):
        return class_weight, mean_class_weight(element_weight, target, ignore_index, num_classes, normalizer)
    return mean_class_weight(class_weight, target, ignore_index, num_classes, normalizer), element_weight
