"""Argument checks shared by every backend: metadata only (shapes, dtypes, devices, Python scalars).

Nothing here reads tensor values on the host, so the checks cost no device sync and trace cleanly
under torch.compile. The value check on targets is device-side (check_target_range_async).
"""
from __future__ import annotations

import math

import torch

LOGITS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TARGET_DTYPES = (torch.int64, torch.int32)
REDUCTIONS = ("none", "mean", "sum")


def check_inputs(logits, target, class_weight):
    """Validates (logits, target, class_weight) and returns class_weight as float32 contiguous (or None)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (N, C), got shape {tuple(logits.shape)}")
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(f"logits must be float32, float16, bfloat16 or float64, got {logits.dtype}")
    num_rows, num_classes = logits.shape
    if num_classes < 1:
        raise ValueError("logits must have at least one class (C >= 1)")
    if target.dim() != 1 or target.shape[0] != num_rows:
        raise ValueError(f"target must have shape (N,) = ({num_rows},) to match logits, got shape {tuple(target.shape)}")
    if target.dtype not in TARGET_DTYPES:
        raise TypeError(f"target must hold class indices as int64 or int32, got {target.dtype}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    return check_class_weight(class_weight, num_classes, logits.device)


def check_class_weight(class_weight, num_classes, device):
    """Validates class_weight against C and the logits' device; returns it as float32 contiguous (or None)."""
    if class_weight is None:
        return None
    if not isinstance(class_weight, torch.Tensor):
        raise TypeError(f"class_weight must be a torch.Tensor or None, got {type(class_weight).__name__}")
    if class_weight.dim() != 1 or class_weight.shape[0] != num_classes:
        raise ValueError(
            f"class_weight must have shape (C,) = ({num_classes},) to match logits, got shape {tuple(class_weight.shape)}"
        )
    if not class_weight.dtype.is_floating_point:
        raise TypeError(f"class_weight must be a floating-point tensor, got {class_weight.dtype}")
    if class_weight.device != device:
        raise ValueError(f"class_weight is on {class_weight.device} but logits are on {device}")
    if class_weight.requires_grad:
        raise ValueError("class_weight must not require grad: the losses give no gradient for the class weights")
    return class_weight.to(torch.float32).contiguous()


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_gamma(gamma):
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    return float(gamma)


def check_label_smoothing(label_smoothing):
    if (not isinstance(label_smoothing, (int, float)) or isinstance(label_smoothing, bool)
            or not 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    return float(label_smoothing)


def check_ignore_index(ignore_index):
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return ignore_index


def check_target_range_async(target, num_classes, ignore_index):
    """Device-side check that every target is in [0, C) or ignore_index.

    On CPU tensors torch._assert_async raises RuntimeError at once; on CUDA it is a device assert
    (like F.cross_entropy's), so it needs no host sync and works under CUDA graphs.
    """
    ok = ((target >= 0) & (target < num_classes)) | (target == ignore_index)
    torch._assert_async(ok.all(), "target holds a class index outside [0, C) that is not ignore_index")
