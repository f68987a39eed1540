"""The reductions and dtype rules every loss path shares (functional, reference, linear, distributed).

"mean" divides the sum of the weighted row losses by the number of non-ignored rows (the official code's
convention, docs/math.md, section 4), at least 1 so that a batch with every row ignored gives 0, not NaN. That count
is a device tensor: dividing by it never syncs with the host. A user's `normalizer` (a number, or a 0-d tensor
kept on its device) replaces that divisor.
"""
from __future__ import annotations

import torch

REDUCTIONS = ("none", "mean", "sum")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 for float64 inputs, else float32 (the kernels' accumulation type)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def valid_row_count(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The number of non-ignored rows, at least 1 (the "mean" denominator), as a device tensor: no sync."""
    return (target != ignore_index).sum().clamp(min=1)


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
