"""The family table: which Triton kernel each loss family of the registry launches, and its own
constexprs. The kernels: sigmoid_focal.py, softmax_ce.py and softmax_focal.py (their shared per-row setup:
rows.py; the softmax kernels' shared row pieces: softmax_ce.py; the one switch between GPU instructions and
the CPU interpreter: fastmath.py).
"""
import dataclasses
from typing import Callable

from ..gamma_cases import gamma_case
from .sigmoid_focal import sigmoid_focal_kernel
from .softmax_ce import softmax_ce_kernel
from .softmax_focal import softmax_focal_kernel


@dataclasses.dataclass(frozen=True)
class FamilyKernel:
    """One family's Triton kernel, as ops.py launches it.

    kernel: a @triton.jit function whose arguments are, in order,
        logits_ptr, target_ptr, weight_ptr, offset_ptr, margin_ptr, sample_weight_ptr, element_weight_ptr,
        grad_loss_ptr, loss_ptr, grad_ptr, N, C, <the family's hyperparameters, in schema order>, ignore_index,
    then the constexprs HAS_WEIGHT, HAS_OFFSET, HAS_MARGIN, HAS_SAMPLE_WEIGHT, HAS_ELEMENT_WEIGHT, DENSE_TARGET,
    WRITE_LOSS, WRITE_GRAD, SCALE_GRAD, ROWS, BLOCK, VEC, STAGES (by keyword) and the family's own. target_ptr
    is the op's target: (N,) class indices, or with DENSE_TARGET (N, C) values in the logits' dtype (row stride
    C). offset_ptr and margin_ptr are the op's logit_offset and target_margin ((C,) float32), sample_weight_ptr
    its sample_weight ((N,) float32), element_weight_ptr its element_weight ((C,) float32), each None when
    absent (HAS_OFFSET / HAS_MARGIN / HAS_SAMPLE_WEIGHT / HAS_ELEMENT_WEIGHT false). Its grid is persistent:
    any number of programs covers all rows.
    constexprs(hyperparameters, num_classes, block) -> the family's own constexprs, by name: hyperparameters
    are the op's values (a sequence, in schema order), num_classes is C (an int), block the tile width of
    the launch.
    streamed_loss_rereads(options) -> whether a streamed row (HELD false) is read again even when no gradient
    is written (options: the launch's constexprs): the softmax focal loss with smoothing or a dense target,
    whose loss needs a pass for its sums after the one for the max and the sum (softmax_focal.py).
    dense_weight_sweep: a dense target's row is read twice, by a sweep for the row weight sum_c t_c w_c before
    the pass (with class weights), by every launch (the sigmoid family's single pass: sigmoid_focal.py).
    """
    kernel: Callable
    constexprs: Callable[..., dict]
    streamed_loss_rereads: Callable[[dict], bool] = lambda options: False
    dense_weight_sweep: bool = False


def _sigmoid_focal_constexprs(hyperparameters, num_classes, block):
    (gamma,) = hyperparameters
    return {"GAMMA_MODE": int(gamma_case(float(gamma)))}


def _softmax_ce_constexprs(hyperparameters, num_classes, block):
    (label_smoothing,) = hyperparameters
    return {"HAS_SMOOTHING": label_smoothing != 0.0, "HELD": block >= num_classes}


def _softmax_focal_constexprs(hyperparameters, num_classes, block):
    gamma, label_smoothing = hyperparameters
    return {"GAMMA_MODE": int(gamma_case(float(gamma))), "HAS_SMOOTHING": label_smoothing != 0.0,
            "HELD": block >= num_classes}


# By the registry's family name (losses.Family.name).
FAMILY_KERNELS = {
    "sigmoid_focal": FamilyKernel(sigmoid_focal_kernel, _sigmoid_focal_constexprs, dense_weight_sweep=True),
    "softmax_ce": FamilyKernel(softmax_ce_kernel, _softmax_ce_constexprs),
    "softmax_focal": FamilyKernel(softmax_focal_kernel, _softmax_focal_constexprs,
                                  streamed_loss_rereads=lambda o: o["HAS_SMOOTHING"] or o["DENSE_TARGET"]),
}
