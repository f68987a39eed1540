"""The shipped Triton kernels, as the audit compiles and models them (cbkernels/triton/*).

Contract (whoever changes the Triton kernels, their launch table or the backward strategy updates this file,
and only this file, for the audit to follow):

    launches(loss, dtype, n, c) -> list[launches.Launch]

loss: "softmax" | "sigmoid" | "focal" | "softmax_focal" (losses.LOSSES names, at the registry's default
hyperparameters: focal at gamma 0.5, softmax_focal at gamma 2 without label smoothing); dtype: "float32" |
"bfloat16". The list holds every kernel that the default backward strategy (_backends.TRITON.default_strategy)
launches for one forward + backward of the loss at (n, c), in order, each with:
- code: TritonKernel(fn, args, constexprs, num_warps, num_stages), the exact arguments of the launch
  (tensors as their dtype), so that Triton specialises it as a real launch does;
- the grid (ctas), threads per CTA, threads per row, elements per thread per main-loop iteration;
- the N x C bytes it moves per element in the audited scenario: loss.backward() of a mean-reduced loss,
  whose upstream gradient is 1 on every row, with class weights and int64 targets; of the bytes read,
  those a later pass re-reads (reread_bytes_per_elem: the streaming softmax's gradient pass, and the
  softmax focal loss's pass for its sums with label smoothing).
Launch configurations come from configs.py's table and the launcher's own rule (ops._plan), never from
numbers written here. Where the launcher splits the rows into column chunks (too few rows for the GPU:
ops.split_of at the audited GPU's SM count and L2), the records are the split launches ops.split_launches
makes, argument for argument: the sigmoid family's chunks and the sum of their loss parts; the softmax's
statistics and gradient launches, batch by batch (batch_rows), the gradient's launch re-reading the batch the
statistics launch read before it. Every launch of an op call after its first follows it (follows_launch).
"""
from __future__ import annotations

import inspect
import re

import torch
import triton

from .. import _backends
from ..losses import loss as registered_loss
from ..triton import grid, kernels, ops, scale, split
from .launches import ELEMENT_BYTES, Launch, TritonKernel
from .roofline import H200

_TORCH_DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IGNORE_INDEX = -100
_SMS = H200.sms  # the persistent grid's programs per SM x this (H100 and H200 alike: 132)
_L2_BYTES = H200.l2_bytes  # the streamed softmax's grid is cut to a share of this L2 (H100 and H200 alike)


def _scale_num_warps() -> int:
    """num_warps of the launch in scale.scale_rows_unless_one_ (read from its source, not restated)."""
    found = re.search(r"num_warps\s*=\s*(\d+)", inspect.getsource(scale.scale_rows_unless_one_))
    if found is None:
        raise RuntimeError("triton_variants: cannot find num_warps in scale.scale_rows_unless_one_")
    return int(found.group(1))


def _loss_kernel(spec, dtype, n, c, *, write_loss, write_grad, scale_grad, dense):
    """The family kernel's launch as ops._launch makes it (class weights on, int64 targets, or with dense a
    (N, C) target in the logits' dtype), on the persistent grid (ops.programs: grid.program_cap) of the
    audited GPU's SM count and L2 size."""
    torch_dtype = _TORCH_DTYPE[dtype]
    hyper = tuple(spec.kernel_hyperparameters({}))
    plan = ops._plan(spec.family, c, torch.empty((0, c), dtype=torch_dtype, device="meta"), hyper, dense)
    options = dict(plan.options)  # constexprs and the compile options (num_warps, maxnreg) of the launch
    num_warps = options.pop("num_warps")
    # no logit adjustments (logit_offset, target_margin), sample weights nor element weights (None): the audited
    # scenario is the plain loss
    args = (torch_dtype, torch_dtype if dense else torch.int64, torch.float32, None, None, None, None,
            torch.float32 if scale_grad else None, torch.float32 if write_loss else None,
            torch_dtype if write_grad else None, n, c, *hyper, IGNORE_INDEX)
    # maxnreg rides with the constexprs: the audit's compile hands them to Triton's binder with the options
    constexprs = dict(HAS_WEIGHT=True, HAS_OFFSET=False, HAS_MARGIN=False, HAS_SAMPLE_WEIGHT=False,
                      HAS_ELEMENT_WEIGHT=False, WRITE_LOSS=write_loss, WRITE_GRAD=write_grad, SCALE_GRAD=scale_grad,
                      **options)
    threads = num_warps * 32
    flags = "+".join(name for name, on in (("loss", write_loss), ("grad", write_grad), ("scaled", scale_grad),
                                           ("dense", dense)) if on)
    elem = ELEMENT_BYTES[dtype]
    target = elem if dense else 0  # a dense target's bytes per element (class indices: per row, not counted)
    # A softmax row longer than one tile (HELD false) is streamed: pass 1 reads it (and a dense target) for the
    # max and the sums, and every later pass reads them again: the gradient's (softmax_ce.py) and, for the
    # softmax focal loss with label smoothing or a dense target, the one for its sums before it, which its loss
    # needs too (softmax_focal.py). The sigmoid family's dense targets are read twice, the row weight's sweep
    # (class weights are on) first (sigmoid_focal.py).
    # With a dense target every pass over a row streams the logits and the targets side by side (two arrays a
    # tile loop), after the sigmoid family's weight sweep over the targets alone; a held row has no tile loop.
    reread, rereads, sweep, passes = 0, 1, 0, 1
    if options.get("HELD") is False:
        later = int(write_grad) + int(plan.loss_rereads)  # the passes that read the row again
        reread, rereads, passes = (elem + target) * later, max(1, later), 1 + later
    elif dense and kernels.FAMILY_KERNELS[spec.family.name].dense_weight_sweep:
        reread, sweep = target, 1
    elif options.get("HELD"):
        passes = 0
    blocks = triton.cdiv(n, plan.rows)
    return Launch(
        kernel=f"{plan.kernel.__name__}[{flags}]",
        code=TritonKernel(plan.kernel, args, constexprs, num_warps, options["STAGES"]),
        ctas=min(blocks, grid.program_cap(plan.programs_per_sm, _SMS, _L2_BYTES, ops.held_bytes(plan, write_grad))),
        threads_per_cta=threads,
        threads_per_row=max(1, threads // plan.rows),
        elems_per_iter=max(1, options["BLOCK"] * plan.rows // threads),
        read_bytes_per_elem=elem + target + reread, write_bytes_per_elem=elem if write_grad else 0,
        reread_bytes_per_elem=reread, rereads=rereads,
        tile_loop_bytes=_dense_loop_bytes(elem, c, sweep, passes) if dense else None)


def _split_record(call, kinds, dtype, n, flags, follows):
    """The record of one of ops.split_launches' launches (tensors given as their dtypes)."""
    options = dict(call.options)
    num_warps = options.pop("num_warps")
    threads = num_warps * 32
    elem = ELEMENT_BYTES[dtype]
    label = [name for name, key in (("loss", "WRITE_LOSS"), ("grad", "WRITE_GRAD"), ("scaled", "SCALE_GRAD"))
             if options.get(key)] + ([f"rows {call.row0}:{call.row0 + call.rows}"] if call.rows != n else [])
    common = dict(kernel=f"{call.kernel.__name__}[{'+'.join(label)}]",
                  code=TritonKernel(call.kernel, call.args, options, num_warps, options.get("STAGES", 1)),
                  ctas=call.programs, threads_per_cta=threads, batch_rows=call.rows if call.rows != n else None,
                  follows_launch=follows)
    if call.kernel is split.sum_parts_kernel:  # reads N x chunks parts, writes N values: no N x C bytes
        return Launch(**common, threads_per_row=max(1, threads // options["ROWS"]), elems_per_iter=1,
                      read_bytes_per_elem=0, write_bytes_per_elem=0, per_element_work=False)
    tiles = dict(threads_per_row=threads * call.per_row, elems_per_iter=max(1, options["BLOCK"] // threads))
    if call.kernel is kinds.stats:
        return Launch(**common, **tiles, read_bytes_per_elem=elem, write_bytes_per_elem=0)
    if not flags["WRITE_GRAD"]:  # the softmax's loss from each row's statistics: per-row values only
        return Launch(**common, **tiles, read_bytes_per_elem=0, write_bytes_per_elem=0, per_element_work=False)
    reread = elem if kinds.stats is not None else 0  # the batch the statistics launch read just before
    return Launch(**common, **tiles, read_bytes_per_elem=elem, write_bytes_per_elem=elem,
                  reread_bytes_per_elem=reread)


def _op_launches(spec, dtype, n, c, *, write_loss, write_grad, scale_grad, dense):
    """The launches of one op call: the family kernel's (_loss_kernel), or where ops.split_of splits the rows
    at the audited GPU's SM count and L2, ops.split_launches' (class weights on, int64 targets, or a dense
    target in the logits' dtype; no other optional input)."""
    torch_dtype = _TORCH_DTYPE[dtype]
    hyper = tuple(spec.kernel_hyperparameters({}))
    plan = ops._plan(spec.family, c, torch.empty((0, c), dtype=torch_dtype, device="meta"), hyper, dense)
    entry = kernels.FAMILY_KERNELS[spec.family.name]
    rows_split = ops.split_of(plan, entry, n, c, ELEMENT_BYTES[dtype], write_grad, True, False, _SMS, _L2_BYTES)
    if rows_split is None:
        return [_loss_kernel(spec, dtype, n, c, write_loss=write_loss, write_grad=write_grad, scale_grad=scale_grad,
                             dense=dense)]
    inputs = (torch_dtype, torch_dtype if dense else torch.int64, torch.float32, None, None, None, None)
    flags = dict(HAS_WEIGHT=True, HAS_OFFSET=False, HAS_MARGIN=False, HAS_SAMPLE_WEIGHT=False,
                 HAS_ELEMENT_WEIGHT=False, WRITE_LOSS=write_loss, WRITE_GRAD=write_grad, SCALE_GRAD=scale_grad)
    buffer = torch.float32 if ops.split_buffer(entry.split, rows_split, n, write_loss) else None
    calls = ops.split_launches(entry.split, plan, rows_split, inputs, torch.float32 if scale_grad else None,
                               torch.float32 if write_loss else None, torch_dtype if write_grad else None, buffer, n,
                               c, hyper, IGNORE_INDEX, flags, _SMS)
    return [_split_record(call, entry.split, dtype, n, flags, follows=i > 0) for i, call in enumerate(calls)]


def _dense_loop_bytes(elem, c, sweep, passes):
    """The bytes per element each tile loop of a dense-target launch loads in full vectors
    (launches.Launch.tile_loop_bytes): the first loop over the targets (the sigmoid family's weight sweep, or
    the softmax's first pass beside the logits) also reads the class weights of the row weight's sum by
    column, as 16-byte vectors where Triton knows the columns aligned (C divisible by 16, its specialisation
    of an integer argument: sm_90 compiles at C = 8144 and 131072 vectorise them, at 8142 they are 4-byte
    scalar loads, not counted); every pass reads the logits and the targets."""
    weights = 4 if c % 16 == 0 else 0
    loops = [elem] * sweep + [2 * elem] * passes
    if loops:
        loops[0] += weights
    return tuple(loops)


def _scale_kernel(dtype, n, c):
    """The fused backward's pass (scale.py): with an upstream gradient of 1 every program reads its chunk
    of upstream values (one vector load) and exits."""
    torch_dtype = _TORCH_DTYPE[dtype]
    warps = _scale_num_warps()
    vec = 16 // ELEMENT_BYTES[dtype]
    return Launch(
        kernel=f"{scale.scale_rows_unless_one_kernel.__name__}[upstream grad 1]",
        code=TritonKernel(scale.scale_rows_unless_one_kernel, (torch_dtype, torch.float32, n, c),
                          {"CHUNK": scale.CHUNK, "TILE": scale.TILE, "VEC": vec}, warps),
        ctas=triton.cdiv(n, scale.CHUNK), threads_per_cta=warps * 32, threads_per_row=warps * 32,
        elems_per_iter=max(1, scale.TILE // (warps * 32)), read_bytes_per_elem=0, write_bytes_per_elem=0,
        per_element_work=False)


def launches(loss: str, dtype: str, n: int, c: int, dense: bool = False) -> list[Launch]:
    """dense: the loss with a dense (N, C) target in the logits' dtype instead of class indices."""
    spec = registered_loss(loss)
    strategy = _backends.TRITON.default_strategy
    kw = dict(dense=dense)
    if strategy == "fused":  # forward writes loss and gradient; backward scales it in place
        return [*_op_launches(spec, dtype, n, c, write_loss=True, write_grad=True, scale_grad=False, **kw),
                _scale_kernel(dtype, n, c)]
    if strategy == "recompute":  # forward writes the loss; backward recomputes the scaled gradient
        return [*_op_launches(spec, dtype, n, c, write_loss=True, write_grad=False, scale_grad=False, **kw),
                *_op_launches(spec, dtype, n, c, write_loss=False, write_grad=True, scale_grad=True, **kw)]
    raise ValueError(f"triton_variants: unknown backward strategy {strategy!r}")
