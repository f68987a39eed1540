"""Fused linear + class-balanced loss: the (N, C) logits are never materialised (docs/linear.md).

    loss = reduce_i sample_weight_i * alpha_{y_i} * L(hidden_i @ weight.T + bias, y_i)

The rows are processed in chunks of R rows. For each chunk the logits tile Z = h W^T + b (R, C) is formed
by one matmul, the backend's fused loss op (docs/op-contract.md) turns it into the per-row losses and
G = d(sum of the chunk's row losses)/dZ in one pass, and G is folded into the parameter gradients at once:
    d/dh = G W   (R, H)      d/dW += G^T h   (C, H)      d/db += sum_rows G   (C,)
so at most one logits tile and one gradient tile are alive at a time. Softmax needs a whole row of classes
for its normaliser, so chunks are over rows for every loss (one code path). The per-row sample weights are
sliced with the chunk's rows and handed to the op, which folds them into each row's alpha (op contract), so
the tiles already hold the weighted losses and gradients. With weighting="element" the class weights go to the
op as its element_weight input instead (each class's term times its weight): a (C,) vector for the whole row,
the same for every chunk.

Upstream gradient. For "mean" and "sum" the loss is a scalar: the gradients are computed in forward as if
the upstream gradient were 1 (and 1 / the "mean" divisor: the non-ignored rows or the user's normalizer) and
backward multiplies them by the upstream device scalar. For "none" the upstream is one value per row and
d/dW = sum_i g_i G_i^T h_i does not factor through a per-row scale, so forward computes only the losses and
backward recomputes each tile (one more matmul per chunk) with the op's *_backward, which writes g_i * G_i
directly (the sample weights go to that op too).

Precision: matmuls run in the inputs' dtype (fp32 accumulation inside them); the weight and bias gradients
accumulate across chunks in fp32 (float64 for float64 inputs). No value is read on the host.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import _backends, _checks, _reduction, losses
from .weights import class_balanced_weights

__all__ = ["cb_linear_loss", "ClassBalancedLinearLoss", "auto_chunk_rows"]

# The logits and gradient tiles together get at least this many bytes. Every chunk's matmuls re-pack the
# (C, H) weight operand, an overhead ~ 1/R of the matmul time: measured on the CPU benchmark shape
# (4096, 512, 32768) fp32, chunks of 256 / 1024 / 2048 rows cost 1.19x / 1.08x / 1.06x the unfused time.
_MIN_TILE_BYTES = 256 * 2**20


def auto_chunk_rows(num_rows: int, in_features: int, num_classes: int, dtype: torch.dtype) -> int:
    """Rows per chunk: the logits + gradient tiles get as many bytes as the fp32 weight gradient, >= 256 MiB.

    The (C, H) fp32 weight-gradient accumulator must exist anyway, so tiles of the same size at most double
    the unavoidable extra memory: 2 * R * C * itemsize = max(4 * C * H, 256 MiB), i.e. R = 2H / itemsize
    (H / 2 rows in fp32, H rows in bf16) for large heads. The 256 MiB floor keeps R large enough on small
    heads that the per-chunk cost (re-packing W in each matmul; re-reading and re-writing the accumulator,
    8 * C * H bytes against 6 * R * C * H flops) stays a few percent. Rounded down to a multiple of 16
    (matmul tiles), clamped to [1, N].
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    budget = max(4 * num_classes * in_features, _MIN_TILE_BYTES)
    rows = budget // (2 * num_classes * itemsize)
    if rows >= 16:
        rows -= rows % 16
    return int(min(max(rows, 1), max(num_rows, 1)))


class _Plan(NamedTuple):
    backend: _backends.Backend
    spec: losses.Loss
    hyperparameters: tuple  # the family's, in schema order (losses.Loss.kernel_hyperparameters)
    ignore_index: int
    reduction: str
    rows: int  # rows per chunk
    needs: tuple  # (hidden, weight, bias) need a gradient
    logit_offset: torch.Tensor | None  # the logit adjustments (docs/long-tail.md), float32 (C,) or None
    target_margin: torch.Tensor | None
    element_weight: torch.Tensor | None = None  # weighting="element": the class weights, float32 (C,), else None


def _reference_rows(plan, logits, target, class_weight, sample_weight):
    return plan.spec.reference_rows(logits, target, class_weight, plan.ignore_index, plan.hyperparameters,
                                    plan.logit_offset, plan.target_margin, sample_weight, plan.element_weight)


def _tile_loss(plan, logits, target, class_weight, sample_weight, with_grad):
    """Per-row (weighted) losses of one tile and, with with_grad, d(sum of them)/d logits (else None).
    target and sample_weight (or None) are the tile's rows."""
    if not plan.backend.is_kernel:
        if not with_grad:
            return _reference_rows(plan, logits, target, class_weight, sample_weight), None
        with torch.enable_grad():
            z = logits.detach().requires_grad_(True)
            rows = _reference_rows(plan, z, target, class_weight, sample_weight)
            (grad,) = torch.autograd.grad(rows.sum(), z)
        return rows.detach(), grad
    forward = plan.spec.family.op(plan.backend.ops, "forward")
    loss, grad = forward(logits, target, class_weight, *plan.hyperparameters, plan.ignore_index, with_grad,
                         plan.logit_offset, plan.target_margin, sample_weight, plan.element_weight)
    return loss, (grad if with_grad else None)


def _tile_scaled_grad(plan, logits, target, class_weight, sample_weight, grad_rows):
    """grad_rows[i] * d loss_i / d logits_i for one tile (reduction "none" backward)."""
    if not plan.backend.is_kernel:
        with torch.enable_grad():
            z = logits.detach().requires_grad_(True)
            rows = _reference_rows(plan, z, target, class_weight, sample_weight)
            (grad,) = torch.autograd.grad(rows, z, grad_rows.to(rows.dtype))
        return grad
    backward = plan.spec.family.op(plan.backend.ops, "backward")
    return backward(logits, target, class_weight, grad_rows.to(torch.float32).contiguous(), *plan.hyperparameters,
                    plan.ignore_index, plan.logit_offset, plan.target_margin, sample_weight, plan.element_weight)


class _Accumulator:
    """Folds gradient tiles into d/dhidden (one block per chunk), d/dweight and d/dbias (fp32 or wider)."""

    def __init__(self, plan, weight):
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        need_h, need_w, need_b = plan.needs
        self.hidden_blocks = [] if need_h else None
        self.empty_hidden = weight.new_zeros((0, weight.shape[1]))  # N = 0: torch.cat needs one block
        self.weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        self.bias = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if need_b else None

    def add(self, grad, hidden, weight):
        if self.hidden_blocks is not None:
            self.hidden_blocks.append(grad @ weight)
        if self.weight is not None:
            if grad.dtype == self.weight.dtype:
                self.weight.addmm_(grad.t(), hidden)
            else:  # half inputs: a half matmul (fp32 inside, rounded once per chunk), summed in fp32
                self.weight.add_(grad.t() @ hidden)
        if self.bias is not None:
            self.bias.add_(grad.sum(0, dtype=self.bias.dtype))

    def hidden(self):
        if self.hidden_blocks is None:
            return None
        return torch.cat(self.hidden_blocks or [self.empty_hidden])


def _chunks(plan, num_rows):
    return [(s, min(s + plan.rows, num_rows)) for s in range(0, num_rows, plan.rows)]


def _chunk_rows(rows, s, e):
    """A chunk's slice of a per-row tensor that may be None (sample_weight)."""
    return None if rows is None else rows[s:e]


def _losses_only(plan, hidden, weight, bias, target, class_weight, sample_weight):
    rows = [_tile_loss(plan, F.linear(hidden[s:e], weight, bias), target[s:e], class_weight,
                       _chunk_rows(sample_weight, s, e), False)[0]
            for s, e in _chunks(plan, hidden.shape[0])]
    return torch.cat(rows) if rows else hidden.new_zeros((0,), dtype=_reduction.compute_dtype(hidden.dtype))


class _LinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, class_weight, sample_weight, normalizer, plan):
        ctx.plan = plan
        ctx.weight_dtype = weight.dtype
        if plan.reduction == "none":  # backward recomputes the tiles (see the module docstring)
            ctx.save_for_backward(hidden, weight, bias, target, class_weight, sample_weight)
            return _losses_only(plan, hidden, weight, bias, target, class_weight, sample_weight)
        acc = _Accumulator(plan, weight)
        total = hidden.new_zeros((), dtype=_reduction.compute_dtype(hidden.dtype))
        for s, e in _chunks(plan, hidden.shape[0]):
            h = hidden[s:e]
            logits = F.linear(h, weight, bias)
            rows, grad = _tile_loss(plan, logits, target[s:e], class_weight, _chunk_rows(sample_weight, s, e), True)
            del logits  # keep one logits tile alive, not two
            total = total + rows.sum(dtype=total.dtype)
            acc.add(grad, h, weight)
            del grad
        scale = total.new_ones(())
        if plan.reduction == "mean":
            scale = _reduction.divide_by_mean_divisor(scale, target, plan.ignore_index, normalizer)
            total = total * scale
        ctx.save_for_backward(acc.hidden(), acc.weight, acc.bias, scale)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        plan = ctx.plan
        if plan.reduction == "none":
            hidden, weight, bias, target, class_weight, sample_weight = ctx.saved_tensors
            acc = _Accumulator(plan, weight)
            for s, e in _chunks(plan, hidden.shape[0]):
                h = hidden[s:e]
                grad = _tile_scaled_grad(plan, F.linear(h, weight, bias), target[s:e], class_weight,
                                         _chunk_rows(sample_weight, s, e), grad_out[s:e])
                acc.add(grad, h, weight)
                del grad
            grad_hidden, grad_weight, grad_bias = acc.hidden(), acc.weight, acc.bias
        else:
            # d loss / d(.) = upstream * scale * (gradients of the summed loss, computed in forward)
            grad_hidden, grad_weight, grad_bias, scale = ctx.saved_tensors
            scale = grad_out.to(scale.dtype) * scale
            if grad_hidden is not None:  # multiplied in fp32 and rounded once (a half scale would round twice)
                grad_hidden = (grad_hidden.to(scale.dtype) * scale).to(grad_hidden.dtype)
            grad_weight = None if grad_weight is None else grad_weight * scale
            grad_bias = None if grad_bias is None else grad_bias * scale
        grad_weight = None if grad_weight is None else grad_weight.to(ctx.weight_dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def _check_linear_inputs(hidden, weight, bias, target, class_weight):
    """Metadata checks only (no host sync); returns class_weight as float32 contiguous or None. Class-index
    targets only: a dense (N, C) target is refused with the reason (_checks.check_index_target_only)."""
    _checks.check_index_target_only(target, "cb_linear_loss")
    same_dtype = f"have the dtype of hidden, {getattr(hidden, 'dtype', None)}"
    _checks.check_tensor(hidden, "hidden", (None, None), _checks.FLOAT_DTYPES,
                         _checks.LOGITS_DTYPE_TEXT, names=("N", "H"))
    num_rows, in_features = hidden.shape
    on_hidden = dict(device=hidden.device, device_of="hidden")
    _checks.check_tensor(weight, "weight", (None, in_features), (hidden.dtype,), same_dtype, names=("C", "H"),
                         **on_hidden)
    num_classes = weight.shape[0]
    if num_classes < 1:
        raise ValueError("weight must have at least one class (C >= 1 rows)")
    if bias is not None:
        _checks.check_tensor(bias, "bias", (num_classes,), (hidden.dtype,), same_dtype, names=("C",), **on_hidden)
    _checks.check_tensor(target, "target", (num_rows,), _checks.TARGET_DTYPES, _checks.TARGET_DTYPE_TEXT,
                         names=("N",), **on_hidden)
    return _checks.check_class_weight(class_weight, num_classes, **on_hidden)


def cb_linear_loss(hidden, weight, target, class_weight=None, bias=None, loss_type="focal", gamma=None,
                   reduction="mean", ignore_index=-100, label_smoothing=0.0, chunk_size=None, backend="auto",
                   logit_offset=None, target_margin=None, sample_weight=None, normalizer=None, weighting="row"):
    """Class-balanced loss of the linear classifier hidden @ weight.T + bias, without the (N, C) logits.

    Same value and gradients as the loss's public function (cb_softmax_cross_entropy, cb_focal_loss, ...)
    applied to F.linear(hidden, weight, bias) (reference.py is the spec), for hidden (N, H), weight (C, H),
    bias (C,) or None, all of one dtype (float32/float16/bfloat16; float64 with backend="reference").
    loss_type: a registered loss (losses.LOSS_TYPES): "softmax" (uses label_smoothing), "sigmoid", "focal"
    (uses gamma) or "softmax_focal" (both). gamma=None: the loss's default (0.5 focal, 2.0 softmax_focal).
    chunk_size: rows per chunk; None picks auto_chunk_rows(N, H, C, dtype).
    logit_offset / target_margin: the logit adjustments of the public losses (docs/long-tail.md), applied to each
    logits tile inside the kernel (target_margin: softmax losses only).
    sample_weight (N,) floating or None: row i's loss and gradients times sample_weight[i] (each chunk's slice
    goes to the kernel; ignored rows stay 0). normalizer: with reduction="mean" only, the divisor of the summed
    rows instead of the number of non-ignored rows: a finite number > 0 or a 0-d tensor on hidden's device.
    weighting: "row" (default): class_weight weighs row i by class_weight[target_i]; "element": it weighs each
    class's term of every row (as PyTorch's weight= does), as in the public losses (cbkernels.functional).
    target: class indices (N,) only; a dense (N, C) target (multi-hot, soft, mixup) is refused with a
    ValueError: it would be one more N x C tensor, the memory this function exists to save (use F.linear and
    the public losses for those).
    Gradients flow to hidden, weight and bias; class_weight, sample_weight and normalizer get none.
    """
    class_weight = _check_linear_inputs(hidden, weight, bias, target, class_weight)
    spec = losses.loss(loss_type)
    logit_offset, target_margin = _checks.check_logit_adjustments(spec.family, logit_offset, target_margin,
                                                                  weight.shape[0], hidden.device, device_of="hidden")
    _checks.check_reduction(reduction)
    class_weight, element_weight = _reduction.split_weighting(class_weight, _checks.check_weighting(weighting))
    num_rows, in_features = hidden.shape
    sample_weight = _checks.check_sample_weight(sample_weight, num_rows, hidden.device, device_of="hidden")
    normalizer = _checks.check_normalizer(normalizer, reduction, hidden.device, device_of="hidden")
    ignore_index = _checks.check_ignore_index(ignore_index)
    hyperparameters = spec.kernel_hyperparameters(spec.checked(gamma=gamma, label_smoothing=label_smoothing))
    chunk_size = _checks.check_positive_int(chunk_size, "chunk_size", allow_none=True)
    if chunk_size is None:
        chunk_size = auto_chunk_rows(num_rows, in_features, weight.shape[0], hidden.dtype)
    backend = _backends.resolve(backend, hidden)
    if not backend.checks_targets:
        _checks.check_target_range_async(target, weight.shape[0], ignore_index)

    params = (hidden, weight, bias)
    needs = tuple(torch.is_grad_enabled() and p is not None and p.requires_grad for p in params)
    plan = _Plan(backend, spec, hyperparameters, ignore_index, reduction, chunk_size, needs, logit_offset,
                 target_margin, element_weight)
    if not any(needs):
        rows = _losses_only(plan, hidden, weight, bias, target, class_weight, sample_weight)
        return _reduction.reduce_rows(rows, target, ignore_index, reduction, normalizer)
    return _LinearLoss.apply(hidden, weight, bias, target, class_weight, sample_weight, normalizer, plan)


class ClassBalancedLinearLoss(torch.nn.Module):
    """nn.Linear(in_features, C, bias) followed by ClassBalancedLoss, fused: forward(hidden, target) -> loss.

    Owns weight (C, in_features) and bias (C,) initialised as nn.Linear does, and the class-balanced
    weights from samples_per_class (length C) and beta as the buffer class_weight, so its state_dict
    has the keys of the unfused pair ("weight", "bias", "class_weight"). For the sigmoid losses the paper
    initialises the bias to -log(C - 1) (see weights.init_prior_bias_) and excludes it from weight decay.
    logit_offset / target_margin: (C,) logit adjustments as in cb_linear_loss, held as buffers (None: none).
    weighting: "row" (default) or "element", how class_weight applies, as in cb_linear_loss.
    forward(hidden, target, sample_weight=None, normalizer=None): per-row weights (N,) and the "mean" divisor
    of this batch, as in cb_linear_loss.
    """

    def __init__(self, in_features, samples_per_class, bias=True, loss_type="focal", beta=0.999, gamma=None,
                 reduction="mean", ignore_index=-100, label_smoothing=0.0, empty_classes="error",
                 chunk_size=None, backend="auto", device=None, dtype=None, logit_offset=None, target_margin=None,
                 weighting="row"):
        super().__init__()
        spec = losses.loss(loss_type)
        _backends.check_name(backend)
        _checks.check_positive_int(in_features, "in_features")
        _checks.check_positive_int(chunk_size, "chunk_size", allow_none=True)
        _checks.check_reduction(reduction)
        self.weighting = _checks.check_weighting(weighting)
        self.in_features = in_features
        self.loss_type = loss_type
        self.beta = beta
        checked = spec.checked(gamma=gamma, label_smoothing=label_smoothing)
        self.gamma, self.label_smoothing = checked["gamma"], checked["label_smoothing"]
        self.reduction = reduction
        self.ignore_index = _checks.check_ignore_index(ignore_index)
        self.chunk_size = chunk_size
        self.backend = backend
        class_weight = class_balanced_weights(samples_per_class, beta, empty_classes)
        num_classes = class_weight.shape[0]
        factory = dict(device=device, dtype=dtype)
        self.weight = torch.nn.Parameter(torch.empty(num_classes, in_features, **factory))
        self.bias = torch.nn.Parameter(torch.empty(num_classes, **factory)) if bias else None
        self.register_buffer("class_weight", class_weight.to(device))
        # Any device: the buffers move to the module's (as class_weight).
        logit_offset, target_margin = _checks.check_logit_adjustments(spec.family, logit_offset, target_margin,
                                                                      num_classes, device=None)
        self.register_buffer("logit_offset", None if logit_offset is None else logit_offset.to(device))
        self.register_buffer("target_margin", None if target_margin is None else target_margin.to(device))
        self.reset_parameters()

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def reset_parameters(self):
        # nn.Linear's initialisation, so the module can replace nn.Linear + loss in existing recipes.
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            torch.nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, hidden, target, sample_weight=None, normalizer=None):
        return cb_linear_loss(hidden, self.weight, target, self.class_weight, self.bias, self.loss_type, self.gamma,
                              self.reduction, self.ignore_index, self.label_smoothing, self.chunk_size,
                              self.backend, self.logit_offset, self.target_margin, sample_weight, normalizer,
                              self.weighting)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, bias={self.bias is not None}, "
                f"loss_type={self.loss_type!r}, beta={self.beta}, gamma={self.gamma}, "
                f"reduction={self.reduction!r}, chunk_size={self.chunk_size}, backend={self.backend!r}"
                + ("" if self.weighting == "row" else f", weighting={self.weighting!r}"))
