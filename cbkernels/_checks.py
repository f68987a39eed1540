"""Argument checks shared by every entry point: metadata only (shapes, dtypes, devices, Python scalars).

Nothing here reads tensor values on the host, so the checks cost no device sync and trace cleanly
under torch.compile. The value check on targets is device-side (check_target_range_async).
"""
from __future__ import annotations

import math
import numbers

import torch

from ._reduction import REDUCTIONS, WEIGHTINGS

LOGITS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TARGET_DTYPES = (torch.int64, torch.int32)
FLOAT_DTYPES = LOGITS_DTYPES
# What a tensor of the wrong dtype must do instead ("logits must be ...", "target must hold ...").
LOGITS_DTYPE_TEXT = "be float32, float16, bfloat16 or float64"
TARGET_DTYPE_TEXT = "hold class indices as int64 or int32"
DENSE_TARGET_DTYPE_TEXT = "hold target values as a floating-point tensor"


def _shape_text(dims, names):
    concrete = "(" + ", ".join("?" if d is None else str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"
    if names is None:
        return concrete
    symbolic = "(" + ", ".join(names) + ("," if len(names) == 1 else "") + ")"
    return symbolic if all(d is None for d in dims) else f"{symbolic} = {concrete}"


def check_tensor(value, name, dims, dtypes, dtype_text, *, names=None, device=None, device_of="logits"):
    """A clear error unless `value` is a tensor of len(dims) dimensions (None: any size), a dtype in
    `dtypes` ("{name} must {dtype_text}" otherwise) and, when given, on `device` (that of `device_of`)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != len(dims) or any(d is not None and d != s for d, s in zip(dims, value.shape)):
        raise ValueError(f"{name} must have shape {_shape_text(dims, names)}, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        raise TypeError(f"{name} must {dtype_text}, got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but {device_of} {'are' if device_of == 'logits' else 'is'} "
                         f"on {device}")


def check_inputs(logits, target, class_weight):
    """Validates (logits, target, class_weight) and returns (target, class_weight as float32 contiguous or None).

    target: (N,) class indices, returned as given; or a dense (N, C) floating tensor (multi-hot, soft or mixup
    rows), returned contiguous in the logits' dtype, which is how the kernels read it (docs/op-contract.md).
    Its values are checked where it is used (on the device: no sync here)."""
    if isinstance(logits, torch.Tensor) and logits.layout != torch.strided:
        raise TypeError(f"logits must be a dense tensor, got layout {logits.layout}: call .to_dense() first")
    check_tensor(logits, "logits", (None, None), LOGITS_DTYPES, LOGITS_DTYPE_TEXT, names=("N", "C"))
    num_rows, num_classes = logits.shape
    if num_classes < 1:
        raise ValueError("logits must have at least one class (C >= 1)")
    if isinstance(target, torch.Tensor) and target.dim() == 2 and target.is_floating_point():
        target = check_dense_target(target, logits)
    elif isinstance(target, torch.Tensor) and tuple(target.shape) == tuple(logits.shape):
        raise TypeError(f"target must {DENSE_TARGET_DTYPE_TEXT} when it has the logits' shape (N, C) (multi-hot or "
                        f"soft rows), got {target.dtype}")
    else:
        check_tensor(target, "target", (num_rows,), TARGET_DTYPES, TARGET_DTYPE_TEXT, names=("N",),
                     device=logits.device)
    return target, check_class_weight(class_weight, num_classes, logits.device)


def check_dense_target(target, logits):
    """A dense (N, C) target beside the logits, as the logits' dtype, contiguous."""
    if target.layout != torch.strided:
        raise TypeError(f"target must be a dense tensor, got layout {target.layout}: call .to_dense() first")
    check_tensor(target, "target", tuple(logits.shape), FLOAT_DTYPES, DENSE_TARGET_DTYPE_TEXT, names=("N", "C"),
                 device=logits.device)
    if target.requires_grad:
        raise ValueError("target must not require grad: the losses give a gradient for the logits only")
    return target.to(logits.dtype).contiguous()


def check_index_target_only(target, where):
    """Refuses a dense target where only class indices are supported (`where` names the entry point)."""
    if isinstance(target, torch.Tensor) and target.dim() == 2:
        raise ValueError(f"{where} takes class-index targets (N,) only: a dense (N, C) target would be one more "
                         "N x C tensor, which is what it exists to avoid; use the plain losses for dense targets")


def check_weighting(weighting):
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    return weighting


def check_class_vector(value, name, num_classes, device, device_of="logits"):
    """A per-class input (class_weight, logit_offset, target_margin) validated against C and the device;
    returned as float32 contiguous (or None)."""
    if value is None:
        return None
    check_tensor(value, name, (num_classes,), FLOAT_DTYPES, "be a floating-point tensor", names=("C",),
                 device=device, device_of=device_of)
    if value.requires_grad:
        raise ValueError(f"{name} must not require grad: the losses give a gradient for the logits only")
    return value.to(torch.float32).contiguous()


def check_class_weight(class_weight, num_classes, device, device_of="logits"):
    return check_class_vector(class_weight, "class_weight", num_classes, device, device_of)


def check_logit_adjustments(family, logit_offset, target_margin, num_classes, device, device_of="logits",
                            dense_target=False):
    """(logit_offset, target_margin) validated (check_class_vector), a target_margin only for a family whose
    losses take one (losses.Family.takes_target_margin) and with class-index targets."""
    if target_margin is not None and not family.takes_target_margin:
        raise ValueError("target_margin applies to the softmax losses (LDAM margins on the target logit); "
                         f"this loss's family is {family.name!r}")
    if target_margin is not None and dense_target:
        raise ValueError("target_margin needs class-index targets (it shifts the target class's logit); "
                         "got a dense (N, C) target")
    return (check_class_vector(logit_offset, "logit_offset", num_classes, device, device_of),
            check_class_vector(target_margin, "target_margin", num_classes, device, device_of))


def check_sample_weight(sample_weight, num_rows, device, device_of="logits"):
    """Per-row weights (N,), floating, on the logits' device, as float32 contiguous (or None). Their values
    are used as given (reading them would sync a GPU): a weight of 0 drops a row, a negative one flips it."""
    if sample_weight is None:
        return None
    check_tensor(sample_weight, "sample_weight", (num_rows,), FLOAT_DTYPES, "be a floating-point tensor",
                 names=("N",), device=device, device_of=device_of)
    if sample_weight.requires_grad:
        raise ValueError("sample_weight must not require grad: the losses give a gradient for the logits only")
    return sample_weight.to(torch.float32).contiguous()


def check_normalizer(normalizer, reduction, device, device_of="logits"):
    """The "mean" divisor: None (the default divisor), a finite number > 0 (a float), or a 0-d real tensor on
    the logits' device, kept there and not read (no sync; its value is the user's to keep > 0). A 0-d CPU
    tensor beside logits on another device is read as a number (that reads no device memory)."""
    if normalizer is None:
        return None
    if reduction != "mean":
        raise ValueError(f"normalizer applies to reduction='mean' only (it is the mean's divisor), got "
                         f"reduction={reduction!r}")
    if isinstance(normalizer, torch.Tensor):
        if normalizer.dim() != 0 or normalizer.dtype == torch.bool or normalizer.is_complex():
            raise ValueError(f"normalizer must be a number or a 0-d real tensor, got {normalizer.dtype} of shape "
                             f"{tuple(normalizer.shape)}")
        if normalizer.requires_grad:
            raise ValueError("normalizer must not require grad: the losses give a gradient for the logits only")
        if normalizer.device == device:
            return normalizer
        if normalizer.device.type != "cpu":
            raise ValueError(f"normalizer is on {normalizer.device} but {device_of} "
                             f"{'are' if device_of == 'logits' else 'is'} on {device}")
    value = _real(normalizer, "normalizer")
    if value is None or not math.isfinite(value) or value <= 0:
        raise ValueError(f"normalizer must be a finite number > 0 or a 0-d tensor, got {normalizer!r}")
    return value


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_INT64_RANGE = (-2**63, 2**63 - 1)


def _scalar(value, name, kind):
    """`value` as a Python float (kind numbers.Real) or int (numbers.Integral): any real scalar a user
    would pass (Python, numpy, a 0-d CPU tensor), never a bool (True as a gamma or an index is a mistake).

    A tensor must be on the CPU: these values are compile-time constants of the kernels, and reading a
    CUDA tensor on the host would synchronise the device."""
    if type(value) in (int, float):  # the common case first: no ABC checks on the hot path
        return value if kind is numbers.Real or type(value) is int else None
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex() or value.device.type != "cpu":
            raise ValueError(f"{name} must be a real number; a tensor must be 0-d, real and on the CPU, got "
                             f"{value.dtype} of shape {tuple(value.shape)} on {value.device}")
        if kind is numbers.Integral and value.is_floating_point():
            return None
        return value.item()
    if isinstance(value, bool) or not isinstance(value, kind):
        return None
    return float(value) if kind is numbers.Real else int(value)


def _real(value, name):
    number = _scalar(value, name, numbers.Real)
    return None if number is None else float(number)


def check_gamma(gamma):
    value = _real(gamma, "gamma")
    if value is None or not math.isfinite(value) or not 0 <= value <= _FLOAT32_MAX:
        raise ValueError(f"gamma must be a finite number >= 0 that fits float32, got {gamma!r}")
    return value


def check_label_smoothing(label_smoothing):
    value = _real(label_smoothing, "label_smoothing")
    if value is None or not 0.0 <= value <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    return value


def check_ignore_index(ignore_index):
    value = _scalar(ignore_index, "ignore_index", numbers.Integral)
    if value is None:
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not _INT64_RANGE[0] <= value <= _INT64_RANGE[1]:
        raise ValueError(f"ignore_index must fit int64 (the targets' widest type), got {value}")
    return value


def check_positive_int(value, name, *, allow_none=False):
    """value as an int >= 1 (or None when allowed); a ValueError naming it otherwise."""
    if value is None and allow_none:
        return None
    number = _scalar(value, name, numbers.Integral)
    if number is None or number < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
    return number


def check_target_range_async(target, num_classes, ignore_index):
    """Device-side check that every target is in [0, C) or ignore_index.

    On CPU tensors torch._assert_async raises RuntimeError at once; on CUDA it is a device assert
    (like F.cross_entropy's), so it needs no host sync and works under CUDA graphs.
    """
    ok = ((target >= 0) & (target < num_classes)) | (target == ignore_index)
    torch._assert_async(ok.all(), "target holds a class index outside [0, C) that is not ignore_index")
