"""The ops of docs/op-contract.md in the "cbkernels_triton" namespace, on the Triton kernels: two per
family of the registry (losses.FAMILIES), defined in one loop from the family's hyperparameters (the
schema) and its entry of kernels.FAMILY_KERNELS (the kernel and its constexprs). The ops refuse bad
hyperparameters with each registry Hyperparameter's check, as the C++ ops refuse them.

torch.library.triton_op makes each a real custom op (the schema of csrc/cbkernels.cpp, except that the
schema inferred from an `int` annotation reads SymInt) whose body
torch.compile can see through to the kernels (wrap_triton), and registers that body as the fake
kernel too: it only reads metadata and allocates, and wrap_triton launches nothing under fake tensors.
cbkernels._ops.register_loss_autograd gives the ops the shared backward.

Under TRITON_INTERPRET=1 (CPU tests) the ops are plain opaque custom ops instead: wrap_triton then
hands back the interpreted kernel itself, which torch.compile cannot trace into, so a triton_op's
decomposition would lose the launch. The body, which launches nothing on fake tensors, is the fake kernel
either way.

With too few rows for the device, a launch splits its rows into column chunks (split_of, split_launches;
cbkernels/triton/split.py): the family's split kernels (kernels.SplitKernels), launched in order, their
grids and arguments described once (SplitLaunch) for the launcher and the audit alike.

Importing this module imports triton; cbkernels._backends imports it lazily. No annotation strings
(no `from __future__ import annotations`): triton_op infers the schema from the real annotations, here
those of the inspect.Signature each op function carries (_signature).
"""
import dataclasses
import inspect
import os
from typing import Optional

import torch
import triton
from torch._subclasses.fake_tensor import is_fake
from torch.library import custom_op, triton_op, wrap_triton

from .. import _ops
from ..losses import FAMILIES
from . import configs, grid, kernels, scale, softmax_split, split

NAMESPACE = "cbkernels_triton"
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # triton reads it once, at import, as we do
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_vector(op, name, vector, logits, length):
    """A (C,) input (class_weight, logit_offset, target_margin, element_weight) or an (N,) one (sample_weight,
    grad_loss): None, or contiguous float32 of that length on the logits' device."""
    if vector is not None and (vector.shape != (length,) or vector.dtype != torch.float32
                               or vector.device != logits.device or not vector.is_contiguous()):
        raise ValueError(f"{op}: {name} must be a contiguous float32 tensor of shape ({length},) on "
                         f"{logits.device}, got {vector.dtype} {tuple(vector.shape)}")


def _check(op, logits, target, class_weight, grad_loss=None, logit_offset=None, target_margin=None,
           sample_weight=None, element_weight=None):
    """Cheap metadata checks (functional.py checked already; direct op calls get clear errors too), with the
    wording of the C++ ops' (csrc/common/loss_ops.h)."""
    if logits.dim() != 2 or logits.dtype not in _DTYPES:
        raise ValueError(f"{op}: logits must be a 2-D float32/float16/bfloat16 tensor, "
                         f"got {logits.dim()}-D {logits.dtype}")
    n, c = logits.shape
    if c < 1:
        raise ValueError(f"{op}: logits must have at least one class (C >= 1)")
    if logits.device.type == "cpu" and not _INTERPRETED:
        raise RuntimeError(f"{op}: Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton "
                           "is imported; use a CUDA tensor or another backend")
    if target.device != logits.device:
        raise ValueError(f"{op}: target must be on the logits' device {logits.device}, got {target.device}")
    if target.dim() == 2:  # dense: (N, C) target values
        if target.shape != (n, c):
            raise ValueError(f"{op}: a dense target must have the logits' shape (N, C) = ({n}, {c}), "
                             f"got {tuple(target.shape)}")
        if target.dtype != logits.dtype:
            raise ValueError(f"{op}: a dense target must have the logits' dtype {logits.dtype}, got {target.dtype}")
        if target_margin is not None:
            raise ValueError(f"{op}: target_margin needs class-index targets (it shifts the target class's logit); "
                             "got a dense target")
    elif target.shape != (n,) or target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: target must be an int64/int32 tensor of shape (N,) = ({n},) of class indices or a "
                         f"(N, C) = ({n}, {c}) tensor of target values in the logits' dtype, got {target.dtype} "
                         f"{tuple(target.shape)}")
    for name, vector, length in (("class_weight", class_weight, c), ("logit_offset", logit_offset, c),
                                 ("target_margin", target_margin, c), ("sample_weight", sample_weight, n),
                                 ("element_weight", element_weight, c), ("grad_loss", grad_loss, n)):
        _check_vector(op, name, vector, logits, length)


def _check_hyperparameters(op, family, values):
    """Refuses (ValueError) the family's hyperparameters unless each passes its registry check
    (losses.Hyperparameter.check), in schema order and before any tensor is looked at, as the C++ ops do.

    The registry checks use the C++ ops' wording (csrc/common/families.h). A symbolic value (a SymFloat under torch.compile with unspecialised floats) is not checked here: reading
    it would specialise the graph on it; the public functions have checked it already."""
    for h, value in zip(family.hyperparameters, values):
        if isinstance(value, torch.SymFloat):
            continue
        try:
            h.check(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{op}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything about a launch that depends on (family, C, dtype, hyperparameters, dense target, override) only,
    built once per such key (_plan): the kernel, rows per program step, programs per SM, the keyword
    arguments (constexprs and compile options) of the launch, and reread_bytes: the bytes of rows a
    program holds between two reads of them when the gradient is written (the streamed softmax's rows and
    their dense targets, softmax_ce.py; the sigmoid family's dense targets, read by the row weight's sweep
    first; 0 for a kernel that reads its rows once), which bound its grid (grid.program_cap);
    loss_rereads: whether a launch that writes no gradient re-reads them too
    (kernels.FamilyKernel.streamed_loss_rereads, dense_weight_sweep)."""
    kernel: object
    rows: int
    programs_per_sm: int
    options: dict
    reread_bytes: int = 0
    loss_rereads: bool = False


_PLANS: dict = {}
_MAX_PLANS = 4096  # the key holds float hyperparameters: a gamma schedule must not grow the cache forever


def _plan(family, c, logits, hyperparameters, dense=False):
    """The cached _Plan of this call (dense: the target is (N, C) values). C is made a static int here (under
    torch.compile with dynamic shapes that is a guard on C; N stays symbolic). A symbolic hyperparameter
    (torch.compile) bypasses the cache: the trace builds its plan once anyway."""
    c = int(c)
    key = (family.name, c, logits.dtype, *hyperparameters, dense, configs.active_override(family.name))
    try:
        plan = _PLANS.get(key)
    except TypeError:  # an unhashable SymFloat
        return _build_plan(family, c, logits, hyperparameters, dense)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _build_plan(family, c, logits, hyperparameters, dense)
    return plan


def _build_plan(family, c, logits, hyperparameters, dense):
    config = configs.pick(family.name, c, logits.dtype, dense)
    block = min(config.block, 1 << (c - 1).bit_length())
    entry = kernels.FAMILY_KERNELS[family.name]
    options = dict(ROWS=config.rows, BLOCK=block, VEC=16 // logits.element_size(), STAGES=config.num_stages,
                   num_warps=config.num_warps, DENSE_TARGET=dense, **entry.constexprs(hyperparameters, c, block))
    if config.maxnreg is not None:
        options["maxnreg"] = config.maxnreg
    row_bytes = config.rows * c * logits.element_size()
    if options.get("HELD") is False:  # a softmax row longer than one tile: read again, its dense target too
        return _Plan(entry.kernel, config.rows, config.programs_per_sm, options, row_bytes * (2 if dense else 1),
                     entry.streamed_loss_rereads(options))
    if dense and entry.dense_weight_sweep:  # the dense target's row, swept for its weight then read again
        return _Plan(entry.kernel, config.rows, config.programs_per_sm, options, row_bytes, True)
    return _Plan(entry.kernel, config.rows, config.programs_per_sm, options)


def held_bytes(plan, write_grad):
    """The bytes of rows each program of this launch holds between two reads of them (0: it reads them once)."""
    return plan.reread_bytes if write_grad or plan.loss_rereads else 0


def programs(plan, device, blocks, write_grad):
    """The persistent grid of one launch (grid.py): a launch that re-reads its rows keeps them within
    grid.py's share of L2."""
    return grid.programs(device, blocks, plan.programs_per_sm, held_bytes(plan, write_grad))


def split_of(plan, entry, n, c, element_size, write_grad, has_weight, has_element_weight, sms, l2):
    """The row split of a launch (grid.Split; split.py), or None: the plan's own kernel. entry: the family's
    kernels.FamilyKernel. Taken for rows of one per tile only (the table's rows above 512 columns), when the
    family's split kernels compute this launch (SplitKernels.supports) and grid.split_geometry splits it; a
    launch that writes the gradient of a family whose split reads its rows twice (the softmax's statistics,
    then its gradient) is batched to keep them in L2 between the two reads."""
    kinds = entry.split
    if kinds is None or plan.rows != 1:
        return None
    reread = c * element_size if kinds.stats is not None and write_grad else 0
    # the geometry first: it is a few compares for the many calls with enough rows, where supports() evaluates
    # a Triton constexpr function (microseconds of host time per eager call)
    geometry = grid.split_geometry(n, c, plan.options["BLOCK"], plan.programs_per_sm, sms, l2, reread)
    if geometry is None or not kinds.supports(plan.options, has_weight, has_element_weight):
        return None
    return geometry


@dataclasses.dataclass(frozen=True)
class SplitLaunch:
    """One launch of a split op call (split_launches): the kernel, its grid, positional arguments and keyword
    arguments (constexprs and compile options); row0 / rows: the rows it covers; per_row: the programs' units
    a row (the chunks, or 1: a launch that walks rows whole or only reads a value a row)."""
    kernel: object
    programs: int
    args: tuple
    options: dict
    row0: int
    rows: int
    per_row: int


def split_buffer(kinds, rows_split, n, write_loss):
    """The shape of the fp32 buffer a split op call needs, or None: the (N, chunks) loss parts of independent
    chunks (only when it writes the loss), or the softmax's (STATS, N, chunks) statistics."""
    if kinds.stats is None:
        return (n, rows_split.chunks) if write_loss else None
    return (softmax_split.STATS, n, rows_split.chunks)


def split_launches(kinds, plan, rows_split, inputs, grad_loss, loss, grad, buffer, n, c, hyperparameters,
                   ignore_index, flags, sms):
    """The launches of a split op call, in order (split.py; kernels.SplitKernels): for independent chunks, the
    chunks' launch and, when it writes the loss, the sum of its parts (buffer: split_buffer's); for the
    softmax, statistics then loss and gradient on each batch of rows in turn (grid.Split.batch_rows: a batch
    stays in L2 between its two launches; a launch without a gradient reads no row twice: one batch, and
    one unit a row for the second launch). inputs: the seven inputs of the family kernel (logits, target,
    class_weight, logit_offset, target_margin, sample_weight, element_weight); flags: its HAS_* / WRITE_* /
    SCALE_GRAD constexprs; sms: the device's SM count (the grids: plan.programs_per_sm a SM at most)."""
    chunks, chunk_cols = rows_split.chunks, rows_split.chunk_cols
    cap = plan.programs_per_sm * sms
    shared = {k: plan.options[k] for k in ("BLOCK", "VEC", "STAGES", "num_warps", "maxnreg") if k in plan.options}
    options = {**flags, **shared, **kinds.constexprs(plan.options)}
    scalars = kinds.scalars(hyperparameters)
    if kinds.stats is None:
        out = [SplitLaunch(kinds.kernel, min(n * chunks, cap), (*inputs, grad_loss, buffer, grad, n, c, *scalars,
                           ignore_index, chunk_cols, chunks), options, 0, n, chunks)]
        if flags["WRITE_LOSS"]:
            out.append(SplitLaunch(split.sum_parts_kernel, triton.cdiv(n, split.SUM_ROWS), (buffer, loss, n, chunks),
                                   dict(ROWS=split.SUM_ROWS, CHUNKS=triton.next_power_of_2(chunks), num_warps=1),
                                   0, n, 1))
        return out
    stats_options = {**{k: v for k, v in flags.items() if k.startswith("HAS_")}, **shared,
                     "HAS_SMOOTHING": options["HAS_SMOOTHING"]}
    units = chunks if flags["WRITE_GRAD"] else 1
    out = []
    for row0 in range(0, n, rows_split.batch_rows):
        rows = min(rows_split.batch_rows, n - row0)
        out.append(SplitLaunch(kinds.stats, min(rows * chunks, cap), (*inputs, buffer, row0, row0 + rows, n, c,
                               chunk_cols, chunks, ignore_index), stats_options, row0, rows, chunks))
        out.append(SplitLaunch(kinds.kernel, min(rows * units, cap), (*inputs, grad_loss, loss, grad, buffer, row0,
                               row0 + rows, n, c, chunk_cols, chunks, *scalars, ignore_index),
                               {**options, "CHUNKS": triton.next_power_of_2(chunks)}, row0, rows, units))
    return out


def _launch(family, logits, target, class_weight, grad_loss, loss, grad, hyperparameters, ignore_index,
            write_loss, write_grad, logit_offset=None, target_margin=None, sample_weight=None, element_weight=None):
    """One launch of the family's kernel (kernels.FAMILY_KERNELS) on contiguous (N, C) logits, on the
    persistent grid of `programs`, or with too few rows the family's split launches (split_of).

    Unused pointers are passed as None (a constexpr to Triton; the kernels touch a pointer only under
    its flag), never as an alias of another argument: torch.compile's mutation analysis of the kernel
    must not see an output tensor twice."""
    n, c = logits.shape
    plan = _plan(family, c, logits, hyperparameters, target.dim() == 2)
    if n == 0 or (_INTERPRETED and is_fake(logits)):  # nothing to compute / tracing the interpreted op
        return
    inputs = (logits, target, class_weight, logit_offset, target_margin, sample_weight, element_weight)
    flags = dict(HAS_WEIGHT=class_weight is not None, HAS_OFFSET=logit_offset is not None,
                 HAS_MARGIN=target_margin is not None, HAS_SAMPLE_WEIGHT=sample_weight is not None,
                 HAS_ELEMENT_WEIGHT=element_weight is not None,
                 WRITE_LOSS=write_loss, WRITE_GRAD=write_grad, SCALE_GRAD=grad_loss is not None)
    entry = kernels.FAMILY_KERNELS[family.name]
    rows_split = split_of(plan, entry, n, c, logits.element_size(), write_grad, flags["HAS_WEIGHT"],
                          flags["HAS_ELEMENT_WEIGHT"], grid.sm_count(logits.device), grid.l2_bytes(logits.device))
    if rows_split is not None:
        shape = split_buffer(entry.split, rows_split, n, write_loss)
        buffer = None if shape is None else torch.empty(shape, dtype=torch.float32, device=logits.device)
        for launch in split_launches(entry.split, plan, rows_split, inputs, grad_loss, loss, grad, buffer, n, c,
                                     hyperparameters, ignore_index, flags, grid.sm_count(logits.device)):
            wrap_triton(launch.kernel)[(launch.programs,)](*launch.args, **launch.options)
        return
    blocks = (n + plan.rows - 1) // plan.rows
    wrap_triton(plan.kernel)[(programs(plan, logits.device, blocks, write_grad),)](
        *inputs, grad_loss, loss, grad, n, c, *hyperparameters, ignore_index, **flags, **plan.options,
    )


def _row_major(logits, target):
    # The kernels index rows as flat ranges i*C..i*C+C of a contiguous tensor, shared by the logits, a dense
    # target and the gradient (so all are split at the same vector boundaries); other strides cost a copy
    # (op contract).
    return logits.contiguous(), target.contiguous()


def _forward(op, family, logits, target, class_weight, *hyperparameters_ignore_index_with_grad_optional):
    *hyperparameters, ignore_index, with_grad, logit_offset, target_margin, sample_weight, element_weight = \
        hyperparameters_ignore_index_with_grad_optional
    _check_hyperparameters(op, family, hyperparameters)
    _check(op, logits, target, class_weight, None, logit_offset, target_margin, sample_weight, element_weight)
    logits, target = _row_major(logits, target)
    n, c = logits.shape
    loss = torch.empty((n,), dtype=torch.float32, device=logits.device)
    grad = torch.empty((n, c), dtype=logits.dtype, device=logits.device) if with_grad else logits.new_empty((0,))
    _launch(family, logits, target, class_weight, None, loss, grad if with_grad else None, hyperparameters,
            ignore_index, True, with_grad, logit_offset, target_margin, sample_weight, element_weight)
    return loss, grad


def _backward(op, family, logits, target, class_weight, grad_loss, *hyperparameters_ignore_index_optional):
    *hyperparameters, ignore_index, logit_offset, target_margin, sample_weight, element_weight = \
        hyperparameters_ignore_index_optional
    _check_hyperparameters(op, family, hyperparameters)
    _check(op, logits, target, class_weight, grad_loss, logit_offset, target_margin, sample_weight, element_weight)
    logits, target = _row_major(logits, target)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _launch(family, logits, target, class_weight, grad_loss, None, grad, hyperparameters, ignore_index,
            False, True, logit_offset, target_margin, sample_weight, element_weight)
    return grad


def _signature(family, which):
    """The Python signature of the op `<family>_<which>`, from which triton_op / custom_op infer its schema:
    that of csrc/cbkernels.cpp, the family's hyperparameters as floats between class_weight (or grad_loss)
    and ignore_index (an `int` annotation, which the inferred schema reads as SymInt)."""
    def arg(name, annotation):
        return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation)

    params = [arg("logits", torch.Tensor), arg("target", torch.Tensor), arg("class_weight", Optional[torch.Tensor])]
    if which == "backward":
        params.append(arg("grad_loss", torch.Tensor))
    params += [arg(h.name, float) for h in family.hyperparameters]
    params.append(arg("ignore_index", int))
    if which == "forward":
        params.append(arg("with_grad", bool))
    params += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                 annotation=Optional[torch.Tensor])
               for name in ("logit_offset", "target_margin", "sample_weight", "element_weight")]
    returns = tuple[torch.Tensor, torch.Tensor] if which == "forward" else torch.Tensor
    return inspect.Signature(params, return_annotation=returns)


def _define(family, which):
    """Registers the op `<family>_<which>` (see the module docstring for the two ways) and returns it."""
    name = f"{family.name}_{which}"
    signature = _signature(family, which)
    body = _forward if which == "forward" else _backward

    num_args = len(signature.parameters)

    def op(*args, **kwargs):
        if kwargs or len(args) != num_args:  # by name, or the optional inputs left to their defaults
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            args = bound.args
        return body(name, family, *args)

    op.__name__ = op.__qualname__ = name
    op.__signature__ = signature
    if not _INTERPRETED:
        return triton_op(f"{NAMESPACE}::{name}", mutates_args=())(op)
    registered = custom_op(f"{NAMESPACE}::{name}", mutates_args=())(op)
    registered.register_fake(op)
    return registered


# The two ops of every family of the registry: OPS["softmax_ce_forward"] is torch.ops.cbkernels_triton's
# softmax_ce_forward (as registered).
OPS = {f"{family.name}_{which}": _define(family, which) for family in FAMILIES for which in ("forward", "backward")}


def _scale_in_place(grad, grad_loss):
    if grad.device.type == "cuda":  # on the device, rows with grad_loss == 1 skipped without a sync
        return scale.scale_rows_unless_one_(grad, grad_loss)
    return _ops.scale_rows_in_place(grad, grad_loss)


_ops.register_loss_autograd(NAMESPACE, _scale_in_place)
