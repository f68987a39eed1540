"""The family table: which Triton kernel each loss family of the registry launches, and its own
constexprs. The kernels: sigmoid_focal.py, softmax_ce.py and softmax_focal.py (their shared per-row setup:
rows.py; the softmax kernels' shared row pieces: softmax_ce.py; the one switch between GPU instructions and
the CPU interpreter: fastmath.py), and for rows split into column chunks (split.py) sigmoid_focal.py's split
kernel and softmax_split.py's two.
"""
import dataclasses
from typing import Callable

from ..gamma_cases import gamma_case
from .sigmoid_focal import sigmoid_focal_kernel, sigmoid_focal_split_kernel
from .softmax_ce import per_class, softmax_ce_kernel
from .softmax_focal import softmax_focal_kernel
from .softmax_split import softmax_split_finish_kernel, softmax_split_stats_kernel


@dataclasses.dataclass(frozen=True)
class SplitKernels:
    """A family's kernels for rows split into column chunks (split.py), as ops.py launches them.

    stats: None for a family whose chunks are independent (the sigmoid family): `kernel` then takes the family
    kernel's arguments followed by chunk_cols and chunks, writes its loss parts to an (N, chunks) buffer and
    has no ROWS constexpr. Else the first launch of two (softmax_split.py), `kernel` the second, each with the
    arguments of its definition.
    supports(options, has_weight, has_element_weight) -> whether the split kernels compute a launch with these
    constexprs (the plan's options) and inputs; the launcher keeps the family kernel otherwise.
    scalars(hyperparameters) -> the split kernels' runtime hyperparameters; constexprs(options) -> their own
    constexprs, from the plan's.
    """
    kernel: Callable
    supports: Callable[[dict, bool, bool], bool]
    scalars: Callable[[tuple], tuple]
    constexprs: Callable[[dict], dict]
    stats: Callable | None = None


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
    split: the family's kernels for split rows (SplitKernels), or None.
    """
    kernel: Callable
    constexprs: Callable[..., dict]
    streamed_loss_rereads: Callable[[dict], bool] = lambda options: False
    dense_weight_sweep: bool = False
    split: SplitKernels | None = None


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


def _sigmoid_focal_splits(options, has_weight, has_element_weight):
    # a dense row's weight (with class weights) is a sweep over its whole row before any gradient
    return not (options["DENSE_TARGET"] and has_weight)


def _softmax_splits(options, has_weight, has_element_weight):
    # the per-class path (a dense target, or element weights with smoothing) has other sums than the parts'
    return not per_class(options["DENSE_TARGET"], has_element_weight, options["HAS_SMOOTHING"])


def _softmax_focal_splits(options, has_weight, has_element_weight):
    # with smoothing every class's focal term needs the row's (max, sum) first: a third launch
    return not options["HAS_SMOOTHING"] and _softmax_splits(options, has_weight, has_element_weight)


def _split_options(*names):
    """The split kernels' constexprs: these of the plan's options."""
    return lambda options: {name: options[name] for name in names}


_SIGMOID_FOCAL_SPLIT = SplitKernels(sigmoid_focal_split_kernel, _sigmoid_focal_splits, lambda hyper: tuple(hyper),
                                    _split_options("DENSE_TARGET", "GAMMA_MODE"))
_SOFTMAX_CE_SPLIT = SplitKernels(softmax_split_finish_kernel, _softmax_splits, lambda hyper: (0.0, *hyper),
                                 lambda options: {"FOCAL": False, "GAMMA_MODE": 0,
                                                  "HAS_SMOOTHING": options["HAS_SMOOTHING"]},
                                 softmax_split_stats_kernel)
_SOFTMAX_FOCAL_SPLIT = SplitKernels(softmax_split_finish_kernel, _softmax_focal_splits, lambda hyper: tuple(hyper),
                                    lambda options: {"FOCAL": True, **_split_options("GAMMA_MODE",
                                                                                     "HAS_SMOOTHING")(options)},
                                    softmax_split_stats_kernel)

# By the registry's family name (losses.Family.name).
FAMILY_KERNELS = {
    "sigmoid_focal": FamilyKernel(sigmoid_focal_kernel, _sigmoid_focal_constexprs, dense_weight_sweep=True,
                                  split=_SIGMOID_FOCAL_SPLIT),
    "softmax_ce": FamilyKernel(softmax_ce_kernel, _softmax_ce_constexprs, split=_SOFTMAX_CE_SPLIT),
    "softmax_focal": FamilyKernel(softmax_focal_kernel, _softmax_focal_constexprs,
                                  streamed_loss_rereads=lambda o: o["HAS_SMOOTHING"] or o["DENSE_TARGET"],
                                  split=_SOFTMAX_FOCAL_SPLIT),
}
