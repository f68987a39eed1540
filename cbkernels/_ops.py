"""torch.library glue shared by every kernel backend: fake kernels and the autograd formula.

A backend registers the ops of docs/op-contract.md under its namespace ("cbkernels" for the C++
extension, "cbkernels_triton" for Triton), two per kernel family of the registry (losses.FAMILIES):
    <family>_forward(logits, target, class_weight, *hyperparameters, ignore_index, with_grad,
                     logit_offset=None, target_margin=None, sample_weight=None, element_weight=None) -> (loss, grad)
    <family>_backward(logits, target, class_weight, grad_loss, *hyperparameters, ignore_index,
                      logit_offset=None, target_margin=None, sample_weight=None, element_weight=None) -> grad
where *hyperparameters are the family's named floats in schema order. register_loss_autograd(namespace)
gives them one backward: "fused" (forward wrote the gradient; backward scales it by the upstream grad,
in place, so it runs once per forward: a second backward through a retained graph raises) or
"recompute" (backward recomputes the gradient from the logits, as often as asked). Nothing here depends
on how many hyperparameters a family has. The upstream grad stays on its device: the only value read on
the host is that of a CPU tensor (scale_rows_in_place), which syncs with nothing.
"""
from __future__ import annotations

import torch

from .losses import FAMILIES

_C_IMPORT_ERROR: str | None = None
try:
    from . import _C  # noqa: F401  (loading the library registers the cbkernels:: ops)
except ImportError as exc:  # the pure-Python install: reference and Triton remain
    _C_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def extension_error() -> str | None:
    """None when the C++ extension cbkernels._C loaded, else why it did not."""
    return _C_IMPORT_ERROR


def extension_loaded() -> bool:
    return _C_IMPORT_ERROR is None


# Which dispatch keys the C++ extension has kernels for, read once at import: a plain dict lookup is
# what torch.compile can trace (a dispatcher query inside the traced function would break the graph).
_EXTENSION_KERNELS = {
    key: extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(f"cbkernels::{FAMILIES[0].name}_forward",
                                                                                key)
    for key in ("CPU", "CUDA")
}


def extension_has_kernel(dispatch_key: str) -> bool:
    """True when the C++ extension registered a kernel for this dispatch key ("CPU" or "CUDA")."""
    return _EXTENSION_KERNELS[dispatch_key]


def _argument(args, kwargs, index, name):
    """An op argument after the family's hyperparameters, which the caller may have passed by position or
    by name (the optional inputs have defaults: a call may leave them out)."""
    return args[index] if len(args) > index else kwargs[name]


def _fake_forward_of(family):
    after = len(family.hyperparameters) + 1  # *args: the hyperparameters, ignore_index, with_grad, ...

    def fake_forward(logits, target, class_weight, *args, **kwargs):
        with_grad = _argument(args, kwargs, after, "with_grad")
        loss = logits.new_empty((logits.shape[0],), dtype=torch.float32)
        grad = logits.new_empty(logits.shape) if with_grad else logits.new_empty((0,))
        return loss, grad

    return fake_forward


def _fake_backward(logits, target, class_weight, grad_loss, *args, **kwargs):
    return logits.new_empty(logits.shape)


def scale_rows(grad: torch.Tensor, grad_loss: torch.Tensor, *, in_place: bool) -> torch.Tensor:
    """grad * grad_loss[:, None], multiplied in fp32 and rounded once to grad's dtype (one pass).

    in_place: the forward's gradient buffer becomes the returned gradient, so the fused strategy holds one
    N x C tensor from forward to backward (the buffer, where recompute holds the logits) and its backward
    allocates nothing.
    """
    out = grad if in_place else torch.empty_like(grad)
    return torch.mul(grad, grad_loss.unsqueeze(1), out=out)


def scale_rows_in_place(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """The fused backward's pass, in place. On CPU tensors an upstream gradient of exactly 1 in every row
    (loss.backward() of a "sum", or of functional.py's "mean", which folds 1/count into the weights)
    skips it: the buffer already is the gradient. Reading that on the host is an N-element compare
    there; on a GPU it would be a device sync, so other devices always scale (a backend may register a
    kernel that skips such rows on the device instead: cbkernels/triton/scale.py)."""
    if grad.device.type == "cpu" and bool(torch.all(grad_loss == 1)):
        return grad
    return scale_rows(grad, grad_loss, in_place=True)


def _make_autograd(backward_op, scale_in_place):
    def setup_context(ctx, inputs, output):
        # scalars: *hyperparameters, ignore_index (every argument: torch fills in the schema's defaults)
        (logits, target, class_weight, *scalars, with_grad, logit_offset, target_margin, sample_weight,
         element_weight) = inputs
        ctx.with_grad = with_grad
        ctx.grad_consumed = False
        ctx.scalars = scalars
        ctx.num_inputs = len(inputs)
        if with_grad:
            ctx.save_for_backward(output[1])
        else:
            ctx.save_for_backward(logits, target, class_weight, logit_offset, target_margin, sample_weight,
                                  element_weight)
        ctx.mark_non_differentiable(output[1])
        # The second output (the fused gradient, N x C) never receives a gradient; left on, autograd would
        # hand backward a zero-filled N x C tensor for it (measured: a 32 MB torch.zeros, 8 ms of a 12 ms
        # fused backward at (1024, 8142) fp32).
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss, _grad_of_grad_output):
        if grad_loss is None:  # not materialised (see setup_context): no gradient reached the loss
            return (None,) * ctx.num_inputs
        if torch.is_grad_enabled() and type(grad_loss) is torch.Tensor:
            # Autograd runs a backward with grad mode on only for create_graph=True. The kernels' gradient is
            # not itself differentiable (no formula for its derivative is registered), so a gradient of it
            # would come out silently wrong: refuse instead. (Traced backwards see tensor subclasses; there
            # torch.compile, which does not support double backward, raises its own error.)
            raise RuntimeError(
                "cbkernels: backward with create_graph=True (second-order gradients: input-gradient penalties, "
                "double backprop) is not supported by the kernel backends, whose gradient is not itself "
                "differentiable; use backend='reference' for such objectives")
        grad_loss = grad_loss.to(torch.float32).contiguous()
        if ctx.with_grad:
            if ctx.grad_consumed:
                raise RuntimeError(
                    "cbkernels: backward ran a second time through one forward (backward(retain_graph=True) "
                    "called twice) with the 'fused' backward strategy, whose first backward scales the "
                    "forward's gradient buffer in place and hands it on; set CBKERNELS_BACKWARD=recompute "
                    "for graphs that are backpropagated more than once")
            (grad,) = ctx.saved_tensors
            # In place for plain eager tensors only. A traced backward (torch.compile, opcheck) sees tensor
            # subclasses (FunctionalTensor, FakeTensor): there the out-of-place product is what a functional
            # graph wants (AOTAutograd's partitioner rejects the in-place form under dynamic shapes), and
            # the compiler plans the memory itself.
            in_place = type(grad) is torch.Tensor
            ctx.grad_consumed = in_place
            if in_place:
                grad_logits = scale_in_place(grad, grad_loss)
            else:
                grad_logits = scale_rows(grad, grad_loss, in_place=False)
        else:
            logits, target, class_weight, logit_offset, target_margin, sample_weight, element_weight = \
                ctx.saved_tensors
            grad_logits = backward_op(logits, target, class_weight, grad_loss, *ctx.scalars, logit_offset,
                                      target_margin, sample_weight, element_weight)
        return (grad_logits,) + (None,) * (ctx.num_inputs - 1)

    return setup_context, backward


def _fake_loss_of(family):
    after = len(family.hyperparameters) + 1  # *args: the hyperparameters, ignore_index, reduction, ...

    def fake_loss(logits, target, class_weight, *args, **kwargs):
        reduction = _argument(args, kwargs, after, "reduction")
        return logits.new_empty((logits.shape[0],) if reduction == "none" else (), dtype=torch.float32)

    return fake_loss


def _fake_scale_rows(grad, grad_loss):
    return None


def register_loss_fakes(namespace: str) -> None:
    """Fake (meta) kernels for ops defined in C++ (Python-defined ops bring their own)."""
    for family in FAMILIES:
        torch.library.register_fake(f"{namespace}::{family.name}_forward")(_fake_forward_of(family))
        torch.library.register_fake(f"{namespace}::{family.name}_backward")(_fake_backward)


# The C++ extension's whole-call ops by family name: LOSS_OPS["softmax_ce"] calls
#   cbkernels::softmax_ce_loss(logits, target, class_weight, *hyperparameters, ignore_index, reduction, fused,
#                              logit_offset, target_margin, sample_weight, element_weight, normalizer)
# (csrc/common/loss_function.h): checks, the "mean" folding, the kernel, the reduction and the autograd node
# of an eager call in one op. Held as the OpOverload's C++ entry point where torch exposes it (`_op`):
# OpOverload.__call__ is one more Python frame around it, ~0.3 us of a ~25 us call. Empty when the
# extension did not load.
LOSS_OPS: dict[str, object] = {}


def _register_loss_ops() -> None:
    for family in FAMILIES:
        torch.library.register_fake(f"cbkernels::{family.name}_loss")(_fake_loss_of(family))
        overload = family.op(torch.ops.cbkernels, "loss").default
        LOSS_OPS[family.name] = getattr(overload, "_op", overload)
    torch.library.register_fake("cbkernels::scale_rows_unless_one_")(_fake_scale_rows)


# (namespace, family name) -> the autograd.Function that eager calls from functional.py go through.
_EAGER_FORWARD: dict[tuple[str, str], type[torch.autograd.Function]] = {}


def _make_eager_function(name, forward_op, setup_context, backward):
    """The registered autograd formula as a plain autograd.Function whose forward calls the op's kernel
    directly (below the Autograd dispatch key). Same semantics, less host work per call: torch.library's
    autograd path re-derives the op's defaults from its schema and wraps the call in a second Function
    (measured on CPU at (8, 16): 42 us for the op through it against 22 us for the bare op)."""
    # forward(ctx, ...) calling setup_context itself, not a separate setup_context staticmethod: with one,
    # Function.apply binds the arguments through inspect.signature on every call (~25 us).
    def forward(ctx, *inputs):
        with torch._C._AutoDispatchBelowAutograd():
            output = forward_op(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                   "backward": staticmethod(backward)})


def loss_forward(namespace: str, family, logits, target, class_weight, hyperparameters, ignore_index, with_grad,
                 logit_offset=None, target_margin=None, sample_weight=None, element_weight=None):
    """The op `namespace::<family>_forward` with its autograd formula: what functional.py calls.
    hyperparameters: the family's floats in schema order (losses.Loss.kernel_hyperparameters).

    Eager: the equivalent autograd.Function (_make_eager_function), for its lower host overhead. Under
    torch.compile: the registered op, which AOTAutograd traces through its fake kernel and registered
    autograd (tests/*: opcheck and fullgraph compiles)."""
    if torch.compiler.is_compiling():
        op = family.op(getattr(torch.ops, namespace), "forward")
        return op(logits, target, class_weight, *hyperparameters, ignore_index, with_grad, logit_offset,
                  target_margin, sample_weight, element_weight)
    return _EAGER_FORWARD[namespace, family.name].apply(logits, target, class_weight, *hyperparameters,
                                                        ignore_index, with_grad, logit_offset, target_margin,
                                                        sample_weight, element_weight)


def register_loss_autograd(namespace: str, scale_in_place=scale_rows_in_place) -> None:
    """scale_in_place(grad, grad_loss): the fused backward's in-place scaling of eager tensors."""
    ops = getattr(torch.ops, namespace)
    for family in FAMILIES:
        setup_context, backward = _make_autograd(family.op(ops, "backward").default, scale_in_place)
        torch.library.register_autograd(f"{namespace}::{family.name}_forward", backward,
                                        setup_context=setup_context)
        _EAGER_FORWARD[namespace, family.name] = _make_eager_function(
            f"{namespace}_{family.name}_forward", family.op(ops, "forward").default, setup_context, backward)


if extension_loaded():
    register_loss_fakes("cbkernels")
    register_loss_autograd("cbkernels")
    _register_loss_ops()
