"""The sigmoid family's kernel (C binary tasks per row, focal modulator (1 - p)^gamma; gamma 0 is sigmoid
cross entropy): one read of the logits, one write of the gradient, per-row loss. Math: docs/math.md,
section 5; the op contract: docs/op-contract.md.

One launch gives the per-row loss and/or the gradient:
    forward, with_grad=True    WRITE_LOSS, WRITE_GRAD               grad = alpha_y * d loss_i / dz
    forward, with_grad=False   WRITE_LOSS                           no gradient written
    backward ("recompute")     WRITE_GRAD, SCALE_GRAD               grad = grad_loss[i] * alpha_y * d loss_i / dz
Math in fp32 whatever the logits' dtype; the gradient is rounded once, when stored.

Work per element. Every class but the target has t = -1, so the body loop computes every element as a
negative (v = -t z = z, below) with no per-element target test: the body tiles leave out the 16-byte
vector that holds the target column (a mask constant over each vector), and the row's edge tile (head,
tail and that vector, one lane a thread: rows.py) takes the general form with a select. Ignored rows take
a per-row branch that stores zeros (no select per element, and NaN/inf logits of an ignored row cannot
leak). Padding lanes load -inf, whose term is exactly 0, so the loss accumulates with no mask. With
ROWS > 1 (short rows, several per tile) the ignored-row branch becomes a select. The logit adjustments
(HAS_OFFSET, HAS_MARGIN; rows.py): the offset is added as the body and edge tiles are loaded, the margin
on the edge tile's target lane (t = +1).

Element weights (HAS_ELEMENT_WEIGHT): each term and its slope times e_c, read beside the logits. A dense
target (DENSE_TARGET; op contract): row i's values t_ic read beside the logits (same split, no target
vector), every lane the soft-target term (_focal_of_soft); no row is ignored, and the row weight is
sample_weight_i sum_c t_ic class_weight[c], from a sweep over the row's targets before its pass (with class
weights: the gradient's scale must be known before its first store).

Rows split into column chunks (split.py; the launcher decides, ops.split_of). A term and its gradient
depend on their own element and per-row values only, so the chunks of a row are independent units:
sigmoid_focal_split_kernel walks (row, chunk) units with the same row code (_focal_part) restricted to the
chunk's body columns, the edge tile in chunk 0, and writes each chunk's part of the row's loss,
alpha_i sum_{c in chunk} e_c term_c, to an (N, chunks) buffer that split.sum_parts_kernel sums, in a fixed
order, into loss_i = sum_j part_ij (no float atomics). Not split: a dense target with class weights, whose
row weight is a sweep over the whole row before any gradient is stored.
"""
import triton
import triton.language as tl

from ..gamma_cases import GammaCase
from .fastmath import LOG2E, rcp, two_atanh
from .rows import (add_offset, adjust_edge, body_mask, class_pointers, column_values, dense_values, edge_columns,
                   row_adjustments, row_block, row_frame, row_scalar, row_split, row_targets, target_vector)
from .split import chunk_span, split_unit

# GAMMA_MODE constexpr values: the modulator (1 - p)^gamma specialised at compile time, one per GammaCase
# (cbkernels/gamma_cases.py, the mirror of the C++ kernels' enum).
GAMMA_ZERO = tl.constexpr(int(GammaCase.ZERO))
GAMMA_HALF = tl.constexpr(int(GammaCase.HALF))
GAMMA_ONE = tl.constexpr(int(GammaCase.ONE))
GAMMA_TWO = tl.constexpr(int(GammaCase.TWO))


@triton.jit
def _focal_of_v(v, gamma, GAMMA_MODE: tl.constexpr):
    """(term, d term / dv) of one binary task, in v = -t z (v = z off the target, -z on it), stable for
    any |v| (docs/math.md, section 5, with u = t z = -v):
      e = exp(-|v|) in (0, 1], l = log1p(e), softplus(v) = max(v, 0) + l = -log p,
      p = sigmoid(-v) and q = 1 - p = sigmoid(v) from e without cancellation,
      mod = q^gamma = exp(-gamma softplus(-v)), term = mod softplus(v),
      d term / dv = mod (q + gamma p softplus(v)).
    One reciprocal gives both fractions: w = 1 / ((1 + e)(2 + e)), 1 / (1 + e) = (2 + e) w and
    e / (2 + e) = e (1 + e) w, the argument of the log1p series (docs/math.md, section 8:
    log1p(e) = 2 atanh(e / (2 + e)), its first eight terms, relative remainder below 1.6e-9).
    NaN: e, hence every result, is NaN. v = -inf (a padding lane): term 0, slope 0.
    """
    e = tl.exp2(tl.abs(v) * -LOG2E)
    one_e = 1.0 + e
    two_e = 2.0 + e
    w = rcp(one_e * two_e)
    r = two_e * w                 # 1 / (1 + e)
    s = (e * w) * one_e           # e / (2 + e), in [0, 1/3]
    l = two_atanh(s)              # log1p(e)
    softplus_v = tl.maximum(v, 0.0) + l
    er = e * r
    v_pos = v > 0.0
    q = tl.where(v_pos, r, er)    # sigmoid(v): 1 / (1 + e) for v > 0, e / (1 + e) otherwise
    if GAMMA_MODE == GAMMA_ZERO:
        return softplus_v, q
    else:
        p = tl.where(v_pos, er, r)
        if GAMMA_MODE == GAMMA_HALF:
            mod = tl.sqrt(q)
        elif GAMMA_MODE == GAMMA_ONE:
            mod = q
        elif GAMMA_MODE == GAMMA_TWO:
            mod = q * q
        else:
            mod = tl.exp2((tl.maximum(-v, 0.0) + l) * (-gamma * LOG2E))
        return mod * softplus_v, mod * (q + gamma * p * softplus_v)


@triton.jit
def _focal_of_z(z, is_y, gamma, GAMMA_MODE: tl.constexpr):
    """(term, d term / dz) with the target column(s) is_y: v = -z there, and d/dz = -d/dv. is_y must be
    False on padding lanes (their -inf is a term of 0 only as a negative)."""
    term, slope = _focal_of_v(tl.where(is_y, -z, z), gamma, GAMMA_MODE)
    return term, tl.where(is_y, -slope, slope)


@triton.jit
def _focal_of_soft(z, t, gamma, GAMMA_MODE: tl.constexpr):
    """(term, d term / dz) of one binary task at a dense target value t in [0, 1] (the official code's term,
    the op contract): with e = exp(-|z|), l = log1p(e), p = sigmoid(z), p_ = sigmoid(-z) = 1 - p,
      bce = t softplus(-z) + (1 - t) softplus(z),   A = t softplus(z) + (1 - t) softplus(-z),   mod = exp(-gamma A),
      term = mod bce,  d term / dz = mod (d bce - gamma d A bce),  d bce = p - t,  d A = t - p_.
    One pair of coefficients chosen by the sign of z gives all four: with r = 1 / (1 + e) (so that
    {p, p_} = {r, e r}, the larger r) and (a, b) = (1 - t, t) for z > 0, (-t, -(1 - t)) otherwise,
      bce = a z + l,  A = b z + l,  d bce = r (a - b e),  d A = r (b - a e)
    (z > 0: p = r, p_ = e r, d bce = (1 - t) p - t p_ = p - t and d A = t p - (1 - t) p_ = t - p_; z <= 0:
    p = e r, p_ = r, the same with a, b negated; bce and A from softplus(+-z) = max(+-z, 0) + l), each
    difference of two non-negative parts (no cancellation but at a true zero). At t in {0, 1} these are
    _focal_of_z's (t = 1: A = softplus(z), mod = (1 - p)^gamma, which the specialised GAMMA_MODEs take as an
    exp here: a soft t has no cheaper form). A padding lane (z = -inf, t = 0) gives NaN: the caller masks it."""
    e = tl.exp2(tl.abs(z) * -LOG2E)
    one_e = 1.0 + e
    two_e = 2.0 + e
    w = rcp(one_e * two_e)
    r = two_e * w                 # 1 / (1 + e)
    l = two_atanh((e * w) * one_e)  # log1p(e)
    f = 1.0 - t
    z_pos = z > 0.0
    a = tl.where(z_pos, f, -t)
    b = tl.where(z_pos, t, -f)
    bce = a * z + l
    d_bce = r * (a - b * e)
    if GAMMA_MODE == GAMMA_ZERO:
        return bce, d_bce
    else:
        mod = tl.exp2((b * z + l) * (-gamma * LOG2E))
        return mod * bce, mod * (d_bce - gamma * (r * (b - a * e)) * bce)


@triton.jit
def _dense_row_weight(t_body, w_body, t_e, w_e, cols, body, body_1, e_mask, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                      STAGES: tl.constexpr):
    """sum_c t_c class_weight[c] of dense rows: a sweep over the row's targets before any gradient is written
    (the rows then come from L2 for the loss pass). It also checks the row's targets, once a row: a value
    outside [0, 1] makes the sum NaN (rows.dense_values' convention), so the loss pass, whose loss and gradient
    this weight scales, reads them unchecked. t in [0, 1] iff t (1 - t) >= 0, so one running minimum of
    t - t^2 checks the row (NaN carries itself into the sum, t NaN times any weight; masked lanes load 0)."""
    acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    lo = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for start in tl.range(0, body_1, BLOCK, num_stages=STAGES):
        offs = start + cols
        mask = offs < body[:, None]
        t = column_values(t_body, offs, mask)
        acc += t * column_values(w_body, offs, mask)
        lo = tl.minimum(lo, t - t * t)
    t = column_values(t_e, 0, e_mask)
    total = tl.sum(acc, axis=1) + tl.sum(t * column_values(w_e, 0, e_mask), axis=0)
    lo_row = tl.minimum(tl.min(lo, axis=1), tl.min(t - t * t, axis=0))
    return tl.where(lo_row >= 0.0, total, float("nan"))


@triton.jit
def _soft_targets(at, offs, mask, CHECKED: tl.constexpr):
    """A tile of a dense target row for the loss pass: as loaded where the row's weight sweep checked the row
    (CHECKED: class weights, _dense_row_weight), else checked here per value (rows.dense_values)."""
    t = column_values(at, offs, mask)
    if not CHECKED:
        t = dense_values(t, True)
    return t


@triton.jit
def _store_grad(ptrs, mask, coef, dz, valid, PER_ROW: tl.constexpr):
    """Stores coef dz rounded to the gradient's dtype; coef and valid (per row) broadcast against dz."""
    g = coef * dz
    if not PER_ROW:  # several rows per tile: ignored rows are zeroed here (with ROWS == 1 by a branch)
        g = tl.where(valid, g, 0.0)
    tl.store(ptrs, g.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _loss_at(loss_ptr, rows, chunk, chunks, SPLIT: tl.constexpr):
    """Where the rows' loss goes: loss_ptr[rows], or with SPLIT the chunk's part, loss_ptr[rows, chunk] of an
    (N, chunks) buffer."""
    if SPLIT:
        return loss_ptr + rows * chunks + chunk
    else:
        return loss_ptr + rows


@triton.jit
def _focal_part(
    logits_ptr, target_ptr, weight_ptr, offset_ptr, margin_ptr, sample_weight_ptr, element_weight_ptr, grad_loss_ptr,
    loss_ptr, grad_ptr, N, C, gamma, ignore_index, block, chunk, chunk_cols, chunks,
    HAS_WEIGHT: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_SAMPLE_WEIGHT: tl.constexpr,
    HAS_ELEMENT_WEIGHT: tl.constexpr, DENSE_TARGET: tl.constexpr,
    GAMMA_MODE: tl.constexpr,
    WRITE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr, SCALE_GRAD: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, STAGES: tl.constexpr, SPLIT: tl.constexpr,
):
    """Row block `block`'s loss and gradient; with SPLIT (ROWS == 1), the part of them that chunk `chunk` of
    the row holds (split.py: its body columns, the edge tile in chunk 0 only), its loss at
    loss_ptr[row, chunk] of an (N, chunks) buffer. Without SPLIT, chunk, chunk_cols and chunks are unused."""
    tl.static_assert(not (SPLIT and DENSE_TARGET and HAS_WEIGHT),
                     "a dense row's weight needs its whole row before any gradient: not split (ops.py)")
    PER_ROW: tl.constexpr = ROWS == 1
    cols = tl.arange(0, BLOCK)[None, :]
    rows, row_mask = row_block(block, N, ROWS)
    y, valid, alpha = row_targets(target_ptr, weight_ptr, sample_weight_ptr, rows, C, ignore_index, HAS_WEIGHT,
                                  HAS_SAMPLE_WEIGHT, DENSE_TARGET, ROWS)
    a, a_up, head, body = row_split(rows, C, VEC)
    y_vec = target_vector(y, head, body, VEC)
    coef = alpha
    if SCALE_GRAD:
        coef = alpha * tl.load(grad_loss_ptr + rows)
    e_cols, e_mask = edge_columns(head, body, y_vec, C, VEC)
    if SPLIT:
        lo, hi, first = chunk_span(chunk, chunk_cols, row_scalar(body))
        e_mask = e_mask & first
    body_o, e_o, margin_y = row_adjustments(offset_ptr, margin_ptr, y, head, e_cols, HAS_OFFSET, HAS_MARGIN)
    e_at = a[None, :] + e_cols
    body_z, body_at, row_store, e_store, body_1, compute = row_frame(logits_ptr, a_up, row_mask, e_mask, body,
                                                                     valid, PER_ROW)
    if not SPLIT:
        lo = 0
        hi = body_1
    body_t, e_t, body_w, e_w, body_ew, e_ew = class_pointers(target_ptr, weight_ptr, element_weight_ptr, body_at,
                                                            e_at, head, e_cols, HAS_WEIGHT, HAS_ELEMENT_WEIGHT,
                                                            DENSE_TARGET)
    if DENSE_TARGET and HAS_WEIGHT:
        row_weight = _dense_row_weight(body_t, body_w, e_t, e_w, cols, body, body_1, e_mask, ROWS, BLOCK, STAGES)
        alpha *= row_weight
        coef *= row_weight
    if compute:
        acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for start in tl.range(lo, hi, BLOCK, num_stages=STAGES):
            offs = start + cols
            mask = body_mask(offs, body, y_vec, VEC)
            z = tl.load(body_z + offs, mask=mask, other=float("-inf")).to(tl.float32)
            z = add_offset(z, body_o, offs, mask, HAS_OFFSET)
            if DENSE_TARGET:
                term, dz = _focal_of_soft(z, _soft_targets(body_t, offs, mask, HAS_WEIGHT), gamma, GAMMA_MODE)
                term = tl.where(mask, term, 0.0)
            else:
                term, dz = _focal_of_v(z, gamma, GAMMA_MODE)  # every body lane is a negative (t = -1)
            if HAS_ELEMENT_WEIGHT:
                ew = column_values(body_ew, offs, mask)
                term *= ew
                dz *= ew
            if WRITE_GRAD:
                _store_grad(grad_ptr + body_at + offs, mask & row_store, coef[:, None], dz, valid[:, None],
                            PER_ROW)
            acc += term
        z = tl.load(logits_ptr + e_at, mask=e_mask, other=float("-inf")).to(tl.float32)
        e_is_y = (e_cols == y[None, :]) & e_mask
        z = adjust_edge(z, e_o, e_mask, e_is_y, margin_y, HAS_OFFSET, HAS_MARGIN)
        if DENSE_TARGET:
            term, dz = _focal_of_soft(z, _soft_targets(e_t, 0, e_mask, HAS_WEIGHT), gamma, GAMMA_MODE)
            term = tl.where(e_mask, term, 0.0)
        else:
            term, dz = _focal_of_z(z, e_is_y, gamma, GAMMA_MODE)
        if HAS_ELEMENT_WEIGHT:
            ew = column_values(e_ew, 0, e_mask)
            term *= ew
            dz *= ew
        if WRITE_GRAD:
            _store_grad(grad_ptr + e_at, e_store, coef[None, :], dz, valid[None, :], PER_ROW)
        if WRITE_LOSS:
            total = tl.sum(acc, axis=1) + tl.sum(term, axis=0)
            tl.store(_loss_at(loss_ptr, rows, chunk, chunks, SPLIT), tl.where(valid, alpha * total, 0.0), mask=row_mask)
    else:  # an ignored row (ROWS == 1): loss 0, gradient 0, the logits unread
        if WRITE_GRAD:
            zero = tl.zeros([ROWS, BLOCK], dtype=grad_ptr.dtype.element_ty)
            for start in tl.range(lo, hi, BLOCK):
                offs = start + cols
                tl.store(grad_ptr + body_at + offs, zero, mask=body_mask(offs, body, y_vec, VEC) & row_store)
            tl.store(grad_ptr + e_at, tl.zeros([4 * VEC, ROWS], dtype=grad_ptr.dtype.element_ty), mask=e_store)
        if WRITE_LOSS:
            tl.store(_loss_at(loss_ptr, rows, chunk, chunks, SPLIT), tl.zeros([ROWS], dtype=tl.float32), mask=row_mask)


@triton.jit
def sigmoid_focal_kernel(
    logits_ptr, target_ptr, weight_ptr, offset_ptr, margin_ptr, sample_weight_ptr, element_weight_ptr, grad_loss_ptr,
    loss_ptr, grad_ptr, N, C, gamma, ignore_index,
    HAS_WEIGHT: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_SAMPLE_WEIGHT: tl.constexpr,
    HAS_ELEMENT_WEIGHT: tl.constexpr, DENSE_TARGET: tl.constexpr,
    GAMMA_MODE: tl.constexpr,
    WRITE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr, SCALE_GRAD: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, STAGES: tl.constexpr,
):
    """loss_i = alpha_i sum_c e_c term_c; grad_ic = (grad_loss_i) alpha_i e_c d term_c / dz (e: element_weight,
    1 when absent). Grid: the persistent programs of rows.py; each walks its row blocks, and each row's body in
    BLOCK-wide tiles through a loop pipelined STAGES deep (the next tiles' loads in flight while one
    computes). Row values are [ROWS] tensors; the body tile is [ROWS, BLOCK], the edge tile [4 VEC, ROWS]
    (rows.py). A dense target (DENSE_TARGET) is read beside the logits, every lane taking _focal_of_soft, and
    its row weight is alpha_i = sample_weight_i sum_c t_c class_weight[c], swept first (_dense_row_weight)."""
    n_blocks = tl.cdiv(N, ROWS)
    for block in tl.range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        _focal_part(logits_ptr, target_ptr, weight_ptr, offset_ptr, margin_ptr, sample_weight_ptr, element_weight_ptr,
                    grad_loss_ptr, loss_ptr, grad_ptr, N, C, gamma, ignore_index, block, 0, 0, 1, HAS_WEIGHT,
                    HAS_OFFSET, HAS_MARGIN, HAS_SAMPLE_WEIGHT, HAS_ELEMENT_WEIGHT, DENSE_TARGET, GAMMA_MODE,
                    WRITE_LOSS, WRITE_GRAD, SCALE_GRAD, ROWS, BLOCK, VEC, STAGES, False)


@triton.jit
def sigmoid_focal_split_kernel(
    logits_ptr, target_ptr, weight_ptr, offset_ptr, margin_ptr, sample_weight_ptr, element_weight_ptr, grad_loss_ptr,
    loss_ptr, grad_ptr, N, C, gamma, ignore_index, chunk_cols, chunks,
    HAS_WEIGHT: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_SAMPLE_WEIGHT: tl.constexpr,
    HAS_ELEMENT_WEIGHT: tl.constexpr, DENSE_TARGET: tl.constexpr,
    GAMMA_MODE: tl.constexpr,
    WRITE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr, SCALE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr, VEC: tl.constexpr, STAGES: tl.constexpr,
):
    """sigmoid_focal_kernel's loss and gradient with each row split into `chunks` chunks of chunk_cols body
    columns (split.py), one row per unit: the persistent programs walk the N x chunks units, and loss_ptr is
    the (N, chunks) fp32 buffer of the rows' parts, which split.sum_parts_kernel sums into the loss."""
    for unit in tl.range(tl.program_id(0), N * chunks, tl.num_programs(0)):
        row, chunk = split_unit(unit, chunks)
        _focal_part(logits_ptr, target_ptr, weight_ptr, offset_ptr, margin_ptr, sample_weight_ptr, element_weight_ptr,
                    grad_loss_ptr, loss_ptr, grad_ptr, N, C, gamma, ignore_index, row, chunk, chunk_cols, chunks,
                    HAS_WEIGHT, HAS_OFFSET, HAS_MARGIN, HAS_SAMPLE_WEIGHT, HAS_ELEMENT_WEIGHT, DENSE_TARGET,
                    GAMMA_MODE, WRITE_LOSS, WRITE_GRAD, SCALE_GRAD, 1, BLOCK, VEC, STAGES, True)
