"""The four ops of docs/op-contract.md in the "cbkernels_triton" namespace, on the Triton kernels.

torch.library.triton_op makes each a real custom op (the schema of csrc/cbkernels.cpp, except that the
schema inferred from an `int` annotation reads SymInt) whose body
torch.compile can see through to the kernels (wrap_triton), and registers that body as the fake
kernel too: it only reads metadata and allocates, and wrap_triton launches nothing under fake tensors.
cbkernels._ops.register_loss_autograd gives the ops the shared backward.

Under TRITON_INTERPRET=1 (CPU tests) the ops are plain opaque custom ops instead: wrap_triton then
hands back the interpreted kernel itself, which torch.compile cannot trace into, so a triton_op's
decomposition would lose the launch. The body, which launches nothing on fake tensors, is the fake kernel
either way.

Importing this module imports triton; cbkernels._backends imports it lazily. No annotation strings
(no `from __future__ import annotations`): triton_op infers the schema from the real annotations.
"""
import os
from typing import Optional

import torch
import triton
from torch._subclasses.fake_tensor import is_fake
from torch.library import custom_op, triton_op, wrap_triton

from .. import _ops
from ..gamma_cases import gamma_case
from . import configs, kernels, scale

NAMESPACE = "cbkernels_triton"
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # triton reads it once, at import, as we do
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(op, logits, target, class_weight, grad_loss=None):
    """Cheap metadata checks (functional.py checked already; direct op calls get clear errors too)."""
    if logits.dim() != 2 or logits.dtype not in _DTYPES:
        raise ValueError(f"{op}: logits must be a 2-D float32/float16/bfloat16 tensor, "
                         f"got {logits.dim()}-D {logits.dtype}")
    n, c = logits.shape
    if c < 1:
        raise ValueError(f"{op}: logits must have at least one class (C >= 1)")
    if logits.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{op}: Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton "
                           "is imported; use a CUDA tensor or another backend")
    if target.shape != (n,) or target.dtype not in (torch.int64, torch.int32) or target.device != logits.device:
        raise ValueError(f"{op}: target must be an int64/int32 tensor of shape ({n},) on {logits.device}, "
                         f"got {target.dtype} {tuple(target.shape)} on {target.device}")
    if class_weight is not None and (class_weight.shape != (c,) or class_weight.dtype != torch.float32
                                     or class_weight.device != logits.device
                                     or not class_weight.is_contiguous()):
        raise ValueError(f"{op}: class_weight must be a contiguous float32 tensor of shape ({c},) on "
                         f"{logits.device}, got {class_weight.dtype} {tuple(class_weight.shape)}")
    if grad_loss is not None and (grad_loss.shape != (n,) or grad_loss.dtype != torch.float32
                                  or grad_loss.device != logits.device or not grad_loss.is_contiguous()):
        raise ValueError(f"{op}: grad_loss must be a contiguous float32 tensor of shape ({n},) on "
                         f"{logits.device}, got {grad_loss.dtype} {tuple(grad_loss.shape)}")


def _launch(kernel, family, logits, target, class_weight, grad_loss, loss, grad, param, ignore_index,
            write_loss, write_grad, **family_constexprs):
    """One kernel launch on contiguous (N, C) logits.

    Unused pointers are passed as None (a constexpr to Triton; the kernels touch a pointer only under
    its flag), never as an alias of another argument: torch.compile's mutation analysis of the kernel
    must not see an output tensor twice."""
    n, c = logits.shape
    config, block = _plan(family, logits)
    grid = (triton.cdiv(n, config.rows),)
    if n == 0 or (_INTERPRETED and is_fake(logits)):  # nothing to compute / tracing the interpreted op
        return
    wrap_triton(kernel)[grid](
        logits, target, class_weight, grad_loss, loss, grad,
        n, c, param, ignore_index,
        HAS_WEIGHT=class_weight is not None, WRITE_LOSS=write_loss, WRITE_GRAD=write_grad,
        SCALE_GRAD=grad_loss is not None, ROWS=config.rows, BLOCK=block, VEC=16 // logits.element_size(),
        num_warps=config.num_warps, num_stages=config.num_stages, **family_constexprs,
    )


def _plan(family, logits):
    """(LaunchConfig, tile width) for these logits. The choice depends on C, so C is made a static int
    here (under torch.compile with dynamic shapes that is a guard on C; N stays symbolic)."""
    c = int(logits.shape[1])
    config = configs.pick(family, c, logits.dtype)
    return config, min(config.block, 1 << (c - 1).bit_length())


def _row_major(logits, target):
    # The kernels index rows as flat ranges i*C..i*C+C of a contiguous tensor, shared by the logits and
    # the gradient (so both are split at the same vector boundaries); other strides cost a copy (op contract).
    return logits.contiguous(), target.contiguous()


def _define(name):
    """Registers the decorated function as the op `name` (see the module docstring for the two ways)."""
    def register(fn):
        if not _INTERPRETED:
            return triton_op(f"{NAMESPACE}::{name}", mutates_args=())(fn)
        op = custom_op(f"{NAMESPACE}::{name}", mutates_args=())(fn)
        op.register_fake(fn)
        return op
    return register


def _sigmoid_constexprs(gamma):
    return {"GAMMA_MODE": int(gamma_case(float(gamma)))}


def _softmax_constexprs(family, logits, label_smoothing):
    _config, block = _plan(family, logits)
    return {"HAS_SMOOTHING": label_smoothing != 0.0, "SINGLE_BLOCK": block >= int(logits.shape[1])}


def _forward(kernel, family, logits, target, class_weight, param, ignore_index, with_grad, constexprs):
    logits, target = _row_major(logits, target)
    n, c = logits.shape
    loss = torch.empty((n,), dtype=torch.float32, device=logits.device)
    grad = torch.empty((n, c), dtype=logits.dtype, device=logits.device) if with_grad else logits.new_empty((0,))
    _launch(kernel, family, logits, target, class_weight, None, loss, grad if with_grad else None, param,
            ignore_index, True, with_grad, **constexprs)
    return loss, grad


def _backward(kernel, family, logits, target, class_weight, grad_loss, param, ignore_index, constexprs):
    logits, target = _row_major(logits, target)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _launch(kernel, family, logits, target, class_weight, grad_loss, None, grad, param, ignore_index,
            False, True, **constexprs)
    return grad


@_define("sigmoid_focal_forward")
def sigmoid_focal_forward(logits: torch.Tensor, target: torch.Tensor, class_weight: Optional[torch.Tensor],
                          gamma: float, ignore_index: int, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check("sigmoid_focal_forward", logits, target, class_weight)
    return _forward(kernels.sigmoid_focal_kernel, "sigmoid_focal", logits, target, class_weight, gamma,
                    ignore_index, with_grad, _sigmoid_constexprs(gamma))


@_define("sigmoid_focal_backward")
def sigmoid_focal_backward(logits: torch.Tensor, target: torch.Tensor, class_weight: Optional[torch.Tensor],
                           grad_loss: torch.Tensor, gamma: float, ignore_index: int) -> torch.Tensor:
    _check("sigmoid_focal_backward", logits, target, class_weight, grad_loss)
    return _backward(kernels.sigmoid_focal_kernel, "sigmoid_focal", logits, target, class_weight, grad_loss,
                     gamma, ignore_index, _sigmoid_constexprs(gamma))


@_define("softmax_ce_forward")
def softmax_ce_forward(logits: torch.Tensor, target: torch.Tensor, class_weight: Optional[torch.Tensor],
                       label_smoothing: float, ignore_index: int, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check("softmax_ce_forward", logits, target, class_weight)
    return _forward(kernels.softmax_ce_kernel, "softmax_ce", logits, target, class_weight, label_smoothing,
                    ignore_index, with_grad, _softmax_constexprs("softmax_ce", logits, label_smoothing))


@_define("softmax_ce_backward")
def softmax_ce_backward(logits: torch.Tensor, target: torch.Tensor, class_weight: Optional[torch.Tensor],
                        grad_loss: torch.Tensor, label_smoothing: float, ignore_index: int) -> torch.Tensor:
    _check("softmax_ce_backward", logits, target, class_weight, grad_loss)
    return _backward(kernels.softmax_ce_kernel, "softmax_ce", logits, target, class_weight, grad_loss,
                     label_smoothing, ignore_index, _softmax_constexprs("softmax_ce", logits, label_smoothing))


def _scale_in_place(grad, grad_loss):
    if grad.device.type == "cuda":  # on the device, rows with grad_loss == 1 skipped without a sync
        return scale.scale_rows_unless_one_(grad, grad_loss)
    return _ops.scale_rows_in_place(grad, grad_loss)


_ops.register_loss_autograd(NAMESPACE, _scale_in_place)
