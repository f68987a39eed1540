"""The softmax cross-entropy kernel (label smoothing eps): per-row loss and/or gradient, as the sigmoid
family's kernel (same flags: WRITE_LOSS, WRITE_GRAD, SCALE_GRAD; see sigmoid_focal.py). Math:
docs/math.md, sections 6 and 7; the op contract: docs/op-contract.md.

    loss_i = alpha_y (lse - (1 - eps) z_y - eps/C sum_c z_c)
    grad_ic = (grad_loss_i) alpha_y (softmax_c - (1 - eps) [c == y] - eps/C), formed in fp32.

Two paths, chosen at compile time (HELD = the body of a row fits one BLOCK-wide tile):
- Held (C up to the table's largest tile): the row is read once into registers; max first (one
  block-wide reduction), exp once per element, kept for the sum (a second reduction) and the gradient.
  The loop over this program's rows is pipelined STAGES deep, so the next rows' loads are in flight
  while this one computes. Per-row work (row geometry, edge tile, reductions, loss) is amortised over the
  elements a thread holds: the table gives this path few warps, so many elements per thread.
- Streaming (longer rows): pass 1 walks the row in tiles keeping a running (max, sum) per lane, one exp
  per element (below), and merges the lanes once per row; pass 2 reads the tiles again for the gradient
  (from L2 while the rows in flight fit in it: the launcher bounds the grid to that, grid.program_cap,
  as long as one program per SM still fits; beyond, pass 2 reads DRAM again). Both loops are pipelined.

The true class. p_y - 1 is formed as -s_ny / s, with s_ny the sum without the target's own term, so the
true-class gradient keeps its relative precision when p_y is within fp32's epsilon of 1 (docs/math.md,
section 7). The body tiles leave out the 16-byte vector that holds the target column (rows.py), so they
need no per-element test for it; the row's edge tile (head, tail and that vector, one lane a thread)
leaves the target out of its sum with a select, stores its gradient g_y, and exp(z_y - m) is added once
per row.
Ignored rows take a per-row branch that stores zeros (ROWS == 1; with several rows per tile, a select).
NaN: a max-reduction may drop a NaN, but exp(NaN - m) still makes s, hence lse, loss and gradient, NaN.

Logit adjustments (HAS_OFFSET, HAS_MARGIN; rows.py): the offset is added wherever a tile of logits is
loaded (each pass), the offset and margin of the target to z_y once per row, and the edge tile's target
lane gets the margin too (only the smoothing's sum of logits reads it).

Element weights e (HAS_ELEMENT_WEIGHT) and dense (N, C) targets (DENSE_TARGET; op contract). With class
indices and no smoothing, element weights weigh the target's term only: alpha_y e_y, at row setup, and the
row is the path above. A dense target, or element weights with smoothing, give every class its own
coefficient u_c = alpha_i e_c q'_c: the per-class path (PER_CLASS, its section below), loss
alpha_i sum_c u_c (lse - z_c) and gradient (grad_loss_i) (U p_c - u_c), U = sum_c u_c. A dense row's
alpha_i is sample_weight_i sum_c t_c class_weight[c], summed in the pass that reads its targets first.

The pieces of a row (its setup, the log-sum-exp of either path, the gradient's streamed pass, the stores)
are the helpers below; the softmax focal kernel (softmax_focal.py) is built from the same ones, and so are
the kernels of rows split into column chunks when the rows are too few for the device (softmax_split.py:
the streamed pass cut into a launch of per-chunk statistics and a launch that combines them and writes the
gradient; the helpers take a column range [lo, hi) of the body for that).
"""
import triton
import triton.language as tl

from .fastmath import LOG2E, two_atanh
from .rows import (add_offset, adjust_edge, body_mask, class_pointers, column_values, dense_values, edge_columns,
                   row_adjustments, row_block, row_frame, row_split, row_targets, target_vector)

# The running max of the streaming pass starts at the lowest finite float, not -inf: a lane that sees
# only padding (-inf) keeps (m, s) = (lowest, 0), and no -inf - -inf is ever formed.
_LOWEST = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def row_setup(logits_ptr, target_ptr, weight_ptr, offset_ptr, margin_ptr, sample_weight_ptr, element_weight_ptr, block,
              N, C, ignore_index, HAS_WEIGHT: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_MARGIN: tl.constexpr,
              HAS_SAMPLE_WEIGHT: tl.constexpr, HAS_ELEMENT_WEIGHT: tl.constexpr, DENSE_TARGET: tl.constexpr,
              PER_CLASS: tl.constexpr, ROWS: tl.constexpr, VEC: tl.constexpr):
    """A row block as the softmax kernels walk it (rows.py): (rows, row_mask, valid, alpha, a_up, body,
    y_vec, e_at, e_mask, e_is_y, z_y, body_o, e_o, margin_y, head, e_cols): the rows and which exist, the
    target data, the body's aligned flat start, length and target vector, the edge tile's flat addresses, mask
    and target lane ([4 VEC, ROWS]), the adjusted target logit z_y (one element, from the cache lines of the
    row), the adjustments' pointers and margin (rows.row_adjustments), the body's first column and the edge
    tile's columns.

    PER_CLASS: every class has its own coefficient (the per-class path below: a dense target, or element
    weights with label smoothing); z_y is not read then (a placeholder 0). Element weights with class indices
    and no smoothing weigh the target's term only: alpha_i e_y, here."""
    rows, row_mask = row_block(block, N, ROWS)
    y, valid, alpha = row_targets(target_ptr, weight_ptr, sample_weight_ptr, rows, C, ignore_index, HAS_WEIGHT,
                                  HAS_SAMPLE_WEIGHT, DENSE_TARGET, ROWS)
    if HAS_ELEMENT_WEIGHT and not PER_CLASS:
        alpha *= tl.load(element_weight_ptr + y)
    a, a_up, head, body = row_split(rows, C, VEC)
    y_vec = target_vector(y, head, body, VEC)
    e_cols, e_mask = edge_columns(head, body, y_vec, C, VEC)
    body_o, e_o, margin_y = row_adjustments(offset_ptr, margin_ptr, y, head, e_cols, HAS_OFFSET, HAS_MARGIN)
    z_y = 0.0
    if not PER_CLASS:
        z_y = tl.load(logits_ptr + a + y).to(tl.float32)
        if HAS_OFFSET:
            z_y += tl.load(offset_ptr + y)
        if HAS_MARGIN:
            z_y -= margin_y
    return (rows, row_mask, valid, alpha, a_up, body, y_vec, a[None, :] + e_cols, e_mask, e_cols == y[None, :], z_y,
            body_o, e_o, margin_y, head, e_cols)


@triton.jit
def held_tiles(logits_ptr, body_z, cols, body, y_vec, e_at, e_mask, e_is_y, body_o, e_o, margin_y,
               HAS_OFFSET: tl.constexpr, HAS_MARGIN: tl.constexpr, VEC: tl.constexpr):
    """A held row's tiles at the adjusted logits: (body mask, body [ROWS, BLOCK], edge [4 VEC, ROWS]), -inf
    where masked, so that held_lse needs no masks."""
    b_mask = body_mask(cols, body, y_vec, VEC)
    z_b = tl.load(body_z + cols, mask=b_mask, other=float("-inf")).to(tl.float32)
    z_e = tl.load(logits_ptr + e_at, mask=e_mask, other=float("-inf")).to(tl.float32)
    z_b = add_offset(z_b, body_o, cols, b_mask, HAS_OFFSET)
    return b_mask, z_b, adjust_edge(z_e, e_o, e_mask, e_is_y, margin_y, HAS_OFFSET, HAS_MARGIN)


@triton.jit
def log1p_pos(x):
    """log1p(x) for x >= 0: 2 atanh(x / (2 + x)) on [0, 1] (docs/math.md, section 8), log(1 + x) above."""
    xs = tl.minimum(x, 1.0)
    return tl.where(x <= 1.0, two_atanh(xs / (2.0 + xs)), tl.log(1.0 + x))


@triton.jit
def target_nll(m, s, s_ny, z_y):
    """-log p_y = lse - z_y with lse = m + log s, as (m - z_y) + log s; when the target holds the max
    (z_y == m), s = 1 + s_ny and log1p(s_ny) keeps its relative precision for a confident prediction
    (log s rounds to 0 once s_ny < 2^-24). Exactly 0 when C == 1."""
    return (m - z_y) + tl.where(z_y == m, log1p_pos(s_ny), tl.log(s))


@triton.jit
def ce_row_loss(m, s, s_ny, z_y, sum_z, eps, C, HAS_SMOOTHING: tl.constexpr):
    """The row's cross entropy before its weight: lse - (1 - eps) z_y - eps/C sum_c z_c, grouped so that each
    bracket is exactly 0 when C == 1 (target_nll; sum_z: the sum of the row's adjusted logits)."""
    row_loss = target_nll(m, s, s_ny, z_y)
    if HAS_SMOOTHING:
        row_loss += eps * (z_y - sum_z / C)
    return row_loss


@triton.jit
def grad_coef(alpha, grad_loss_ptr, rows, SCALE_GRAD: tl.constexpr):
    """The gradient's per-row scale: alpha (times grad_loss in the backward)."""
    if SCALE_GRAD:
        return alpha * tl.load(grad_loss_ptr + rows)
    else:
        return alpha


@triton.jit
def grad_terms(coef, s, s_ny, eps, C, HAS_SMOOTHING: tl.constexpr):
    """(k, off, g_y) per row: off the target the gradient is k exp(z - m) - off (k = coef / s,
    off = coef eps / C); on it, g_y = coef (eps (1 - 1/C) - s_ny / s)."""
    inv_s = 1.0 / s
    g_y = -s_ny * inv_s
    if HAS_SMOOTHING:
        g_y += eps * (1.0 - 1.0 / C)
        off = coef * (eps / C)
    else:
        off = tl.zeros_like(coef)
    return coef * inv_s, off, coef * g_y


@triton.jit
def store_grad(ptrs, mask, g, valid, PER_ROW: tl.constexpr):
    """Stores g (fp32) rounded to the gradient's dtype; valid broadcasts against g."""
    if not PER_ROW:  # several rows per tile: ignored rows are zeroed here (with ROWS == 1 by a branch)
        g = tl.where(valid, g, 0.0)
    tl.store(ptrs, g.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def store_zeros(grad_ptr, body_at, cols, body, lo, hi, y_vec, row_store, e_at, e_store, loss_ptr, rows, row_mask,
                WRITE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr, HELD: tl.constexpr, ROWS: tl.constexpr,
                BLOCK: tl.constexpr, VEC: tl.constexpr):
    """An ignored row (ROWS == 1): loss 0 and gradient 0, its logits unread (one store for a held row; a
    streamed row's body columns [lo, hi), the whole body but in a split row's chunk, split.py)."""
    if WRITE_GRAD:
        zero = tl.zeros([ROWS, BLOCK], dtype=grad_ptr.dtype.element_ty)
        if HELD:
            tl.store(grad_ptr + body_at + cols, zero, mask=body_mask(cols, body, y_vec, VEC) & row_store)
        else:
            for start in tl.range(lo, hi, BLOCK):
                offs = start + cols
                tl.store(grad_ptr + body_at + offs, zero, mask=body_mask(offs, body, y_vec, VEC) & row_store)
        tl.store(grad_ptr + e_at, tl.zeros([4 * VEC, ROWS], dtype=grad_ptr.dtype.element_ty), mask=e_store)
    if WRITE_LOSS:
        tl.store(loss_ptr + rows, tl.zeros([ROWS], dtype=tl.float32), mask=row_mask)


@triton.jit
def held_lse(z_b, z_e, e_is_y):
    """(m, ex_b, ex_e, s_ny) of held rows: the max (one block-wide reduction), exp(z - m) of the body and
    edge tiles (the target's term left out of ex_e), and s_ny, their sum (a second reduction)."""
    m = tl.maximum(tl.max(z_b, axis=1), tl.max(z_e, axis=0))
    mb = m * LOG2E
    ex_b = tl.exp2(z_b * LOG2E - mb[:, None])
    ex_e = tl.where(e_is_y, 0.0, tl.exp2(z_e * LOG2E - mb[None, :]))
    return m, ex_b, ex_e, tl.sum(ex_b, axis=1) + tl.sum(ex_e, axis=0)


@triton.jit
def _lane_update(m, s, z):
    """Running (max, sum exp(z - max)) per lane, extended by z with one exp:
    e = exp(-|z - m|); if z > m the sum is rescaled, s e + 1, else s + e; m = max(m, z).
    z = -inf adds 0; z = NaN makes s NaN (m may drop it: s carries it)."""
    d = z - m
    e = tl.exp2(tl.abs(d) * -LOG2E)
    grow = d > 0.0
    return tl.maximum(m, z), tl.where(grow, s * e + 1.0, s + e)


@triton.jit
def lane_lse(body_z, body_o, cols, body, lo, hi, y_vec, SUM_Z: tl.constexpr, HAS_OFFSET: tl.constexpr,
             ROWS: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, STAGES: tl.constexpr):
    """(m_l, s_l, sz_l): the running (max, sum) per lane (_lane_update) over the body columns [lo, hi) of
    streamed rows, in tiles, and with SUM_Z the lanes' sums of the logits (else 0). A lane that sees no
    element keeps (_LOWEST, 0)."""
    m_l = tl.full([ROWS, BLOCK], _LOWEST, tl.float32)
    s_l = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    sz_l = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for start in tl.range(lo, hi, BLOCK, num_stages=STAGES):
        offs = start + cols
        mask = body_mask(offs, body, y_vec, VEC)
        z = add_offset(tl.load(body_z + offs, mask=mask, other=float("-inf")).to(tl.float32), body_o, offs, mask,
                       HAS_OFFSET)
        if SUM_Z:
            sz_l += tl.where(mask, z, 0.0)
        m_l, s_l = _lane_update(m_l, s_l, z)
    return m_l, s_l, sz_l


@triton.jit
def edge_logits(logits_ptr, e_at, e_mask, e_is_y, e_o, margin_y, HAS_OFFSET: tl.constexpr, HAS_MARGIN: tl.constexpr):
    """The edge tile's adjusted logits ([4 VEC, ROWS]), -inf where masked."""
    z_e = tl.load(logits_ptr + e_at, mask=e_mask, other=float("-inf")).to(tl.float32)
    return adjust_edge(z_e, e_o, e_mask, e_is_y, margin_y, HAS_OFFSET, HAS_MARGIN)


@triton.jit
def streamed_lse(logits_ptr, body_z, cols, body, body_1, y_vec, e_at, e_mask, e_is_y, z_y, body_o, e_o, margin_y,
                 SUM_Z: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_MARGIN: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK: tl.constexpr, VEC: tl.constexpr, STAGES: tl.constexpr):
    """Pass 1 of streamed rows: (m, z_e, ex_e, s_ny, sum_z), the edge tile's logits and exp(z - m) (the
    target's left out) read after the body's tiles, and with SUM_Z the sum of the row's logits (else 0).
    Running (max, sum) per lane over the tiles (lane_lse), merged once per row."""
    m_l, s_l, sz_l = lane_lse(body_z, body_o, cols, body, 0, body_1, y_vec, SUM_Z, HAS_OFFSET, ROWS, BLOCK, VEC,
                              STAGES)
    z_e = edge_logits(logits_ptr, e_at, e_mask, e_is_y, e_o, margin_y, HAS_OFFSET, HAS_MARGIN)
    m_ny = tl.maximum(tl.max(m_l, axis=1), tl.max(tl.where(e_is_y, _LOWEST, z_e), axis=0))
    m = tl.maximum(m_ny, z_y)
    mb = m * LOG2E
    ex_e = tl.where(e_is_y, 0.0, tl.exp2(z_e * LOG2E - mb[None, :]))
    s_ny = tl.sum(s_l * tl.exp2(m_l * LOG2E - mb[:, None]), axis=1) + tl.sum(ex_e, axis=0)
    sum_z = tl.zeros_like(m)
    if SUM_Z:
        sum_z = tl.sum(sz_l, axis=1) + tl.sum(tl.where(e_mask, z_e, 0.0), axis=0)
    return m, z_e, ex_e, s_ny, sum_z


@triton.jit
def streamed_grad(grad_ptr, body_z, body_o, body_at, cols, body, lo, hi, y_vec, row_store, valid, m, k, off,
                  HAS_OFFSET: tl.constexpr, PER_ROW: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr,
                  STAGES: tl.constexpr):
    """The gradient's pass over a streamed row's body columns [lo, hi) (the whole body, [0, body), but in a
    split row's chunk, split.py): k exp(z - m) - off (k, off: grad_terms)."""
    mb = m * LOG2E
    for start in tl.range(lo, hi, BLOCK, num_stages=STAGES):
        offs = start + cols
        mask = body_mask(offs, body, y_vec, VEC)
        z = add_offset(tl.load(body_z + offs, mask=mask, other=0.0).to(tl.float32), body_o, offs, mask, HAS_OFFSET)
        store_grad(grad_ptr + body_at + offs, mask & row_store,
                   tl.exp2(z * LOG2E - mb[:, None]) * k[:, None] - off[:, None], valid[:, None], PER_ROW)


# --- the per-class path: every class has its own coefficient -----------------------------------------------
# A dense target, or element weights with label smoothing (PER_CLASS): u_c = alpha_i e_c q'_c with
# q' = (1 - eps) q + eps / C, q the dense row or onehot(y) (the op contract). Every lane takes its
# coefficient (class_coefficients); sums are kept relative to the row max m, so that logits of any size keep
# their digits; and the special column is the row's top class k (z_k = m), the only one whose p can exceed 1/2:
# 1 - p_k = s_rest / s with s_rest = sum_{c != k} exp(z_c - m) summed without it (held_top, streamed_top), so a
# confident row keeps its relative precision as the class-index path does for its target. With class indices
# the target keeps its vector in the edge tile (for target_margin) and is one more lane there. Ties at the max
# (s_rest >= 1, every p <= 1/2) need no special column: top_class is then false everywhere.


@triton.constexpr_function
def per_class(dense_target, has_element_weight, has_smoothing):
    """Whether a softmax row takes the per-class path (PER_CLASS in the kernels)."""
    return dense_target or (has_element_weight and has_smoothing)


@triton.jit
def class_coefficients(t_at, ew_at, offs, mask, is_y, eps, C, DENSE_TARGET: tl.constexpr,
                       HAS_ELEMENT_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, CHECKED: tl.constexpr = False):
    """(u / alpha_i, t) on a tile: e_c q'_c, 0 on masked lanes, and the dense target values t or, for class
    indices, q = [c == y] from is_y (False for body tiles, and True on the edge tile's masked copy of the
    target's vector). Out-of-range dense values read as NaN (rows.dense_values), unless CHECKED: a pass after
    one that made the row's U NaN for them (streamed_top). Masked lanes load t = 0 (and e = 0), so a dense u needs no
    mask but for the smoothing's eps / C."""
    if DENSE_TARGET:
        t = column_values(t_at, offs, mask)
        if not CHECKED:
            t = dense_values(t, False)
    else:
        t = tl.where(is_y, 1.0, 0.0)
    u = t
    if HAS_SMOOTHING:
        u = (1.0 - eps) * u + eps / C
    if HAS_ELEMENT_WEIGHT:
        u *= column_values(ew_at, offs, mask)
    if HAS_SMOOTHING or not DENSE_TARGET:
        u = tl.where(mask, u, 0.0)
    return u, t


@triton.jit
def top_class(zm, unique):
    """The lanes of the special column: z == m (zm = z - m == 0) in a row whose max is unique (unique:
    s_rest < 1, held_top and streamed_top; per row, broadcast against zm)."""
    return (zm == 0.0) & unique


@triton.jit
def held_top(z_b, z_e):
    """(m, zm_b, zm_e, ex_b, ex_e, s_rest) of held rows: the max over both tiles, z - m and exp(z - m) of each,
    and s_rest = s - 1, the sum of exp(z - m) over every lane but one at the max (each further lane at the max
    counts exactly 1), summed without that one so that it keeps its relative precision."""
    m = tl.maximum(tl.max(z_b, axis=1), tl.max(z_e, axis=0))
    zm_b = z_b - m[:, None]
    zm_e = z_e - m[None, :]
    ex_b = tl.exp2(zm_b * LOG2E)
    ex_e = tl.exp2(zm_e * LOG2E)
    at_max = tl.sum((zm_b == 0.0).to(tl.float32), axis=1) + tl.sum((zm_e == 0.0).to(tl.float32), axis=0)
    s_rest = (tl.sum(tl.where(zm_b == 0.0, 0.0, ex_b), axis=1) + tl.sum(tl.where(zm_e == 0.0, 0.0, ex_e), axis=0)
              + (at_max - 1.0))
    return m, zm_b, zm_e, ex_b, ex_e, s_rest


@triton.jit
def _lane_top_update(m, s, z):
    """Running (max, sum of exp(z - max) over the lane's elements but its first at the max) per lane, extended
    by z with one exp: e = exp(-|z - m|); if z > m the old max joins the sum, (s + 1) e, else s + e, both one
    FMA, s (z > m ? e : 1) + e ((s + 1) e rounded once). Lanes start at (lowest, -1): the first element then
    makes s 0 (and an element at the lowest float itself, a tie with the start, counts as the lane's max).
    Returns d = z - m too. z = -inf adds 0; NaN makes s NaN."""
    d = z - m
    e = tl.exp2(tl.abs(d) * -LOG2E)
    grow = d > 0.0
    return tl.maximum(m, z), s * tl.where(grow, e, 1.0) + e, d, grow


@triton.jit
def streamed_top(logits_ptr, body_z, body_o, body_t, body_ew, body_w, cols, body, body_1, y_vec, e_at, e_t, e_ew, e_w,
                 e_mask, e_is_y, e_o, margin_y, eps, C, SUMS: tl.constexpr, ROW_WEIGHT: tl.constexpr,
                 HAS_OFFSET: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_ELEMENT_WEIGHT: tl.constexpr,
                 DENSE_TARGET: tl.constexpr, HAS_SMOOTHING: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                 VEC: tl.constexpr, STAGES: tl.constexpr):
    """Pass 1 of streamed per-class rows: (m, s_rest, z_e, zm_e, ex_e, u_e, sum_u, sum_uz, row_weight): held_top's
    values, the edge tile's logits, z - m, exp(z - m) and coefficients (read after the body's tiles), and
    with SUMS U = sum_c u_c and sum_c u_c (z_c - m), with ROW_WEIGHT sum_c t_c class_weight[c] (else 0).
    A dense row's out-of-range targets read as NaN here, so with SUMS U is NaN for such a row, and so are its
    loss and every gradient lane (each scales U): the gradient's pass reads them unchecked
    (streamed_per_class_grad).
    Per lane: _lane_top_update, and sum u (z - m_lane) rescaled as the lane's max grows (by U_lane (m_old -
    m_new), a d clamped to the largest float so that 0 times an overflowed difference stays 0); merged once per
    row."""
    m_l = tl.full([ROWS, BLOCK], _LOWEST, tl.float32)
    s_l = tl.full([ROWS, BLOCK], -1.0, tl.float32)
    u_l = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    uz_l = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    w_l = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for start in tl.range(0, body_1, BLOCK, num_stages=STAGES):
        offs = start + cols
        mask = body_mask(offs, body, y_vec, VEC)
        z = add_offset(tl.load(body_z + offs, mask=mask, other=float("-inf")).to(tl.float32), body_o, offs, mask,
                       HAS_OFFSET)
        m_l, s_l, d, grow = _lane_top_update(m_l, s_l, z)
        if SUMS or ROW_WEIGHT:
            u, t = class_coefficients(body_t, body_ew, offs, mask, False, eps, C, DENSE_TARGET, HAS_ELEMENT_WEIGHT,
                                      HAS_SMOOTHING)
            if SUMS:
                # one FMA either way: uz - U_lane d as the lane's max grows, else uz + u d (d 0 on masked lanes)
                uz_l += tl.where(mask, tl.minimum(d, -_LOWEST), 0.0) * tl.where(grow, -u_l, u)
                u_l += u
            if ROW_WEIGHT:
                w_l += t * column_values(body_w, offs, mask)
    z_e = tl.load(logits_ptr + e_at, mask=e_mask, other=float("-inf")).to(tl.float32)
    z_e = adjust_edge(z_e, e_o, e_mask, e_is_y, margin_y, HAS_OFFSET, HAS_MARGIN)
    u_e, t_e = class_coefficients(e_t, e_ew, 0, e_mask, e_is_y, eps, C, DENSE_TARGET, HAS_ELEMENT_WEIGHT,
                                  HAS_SMOOTHING)
    m = tl.maximum(tl.max(m_l, axis=1), tl.max(z_e, axis=0))
    lane_m = m_l - m[:, None]
    zm_e = z_e - m[None, :]
    f_l = tl.exp2(lane_m * LOG2E)
    ex_e = tl.exp2(zm_e * LOG2E)
    at_max = tl.sum((lane_m == 0.0).to(tl.float32), axis=1) + tl.sum((zm_e == 0.0).to(tl.float32), axis=0)
    s_rest = (tl.sum(s_l * f_l + tl.where(lane_m == 0.0, 0.0, f_l), axis=1)
              + tl.sum(tl.where(zm_e == 0.0, 0.0, ex_e), axis=0) + (at_max - 1.0))
    sum_u = tl.zeros_like(m)
    sum_uz = tl.zeros_like(m)
    row_weight = tl.zeros_like(m)
    if SUMS:
        sum_u = tl.sum(u_l, axis=1) + tl.sum(u_e, axis=0)
        sum_uz = (tl.sum(uz_l + u_l * tl.maximum(lane_m, _LOWEST), axis=1)
                  + tl.sum(tl.where(e_mask, u_e * zm_e, 0.0), axis=0))
    if ROW_WEIGHT:
        row_weight = tl.sum(w_l, axis=1) + tl.sum(t_e * column_values(e_w, 0, e_mask), axis=0)
    return m, s_rest, z_e, zm_e, ex_e, u_e, sum_u, sum_uz, row_weight


@triton.jit
def per_class_ce_grad(zm, ex, u, unique, inv_s, q_top, sum_u, coef):
    """The per-class cross entropy's gradient on a tile: coef (U p - u), and at the top class
    coef ((U - u) p_k - u (1 - p_k)) with p_k = 1/s, 1 - p_k = q_top (no 1 - p formed). coef folded into the
    per-row factors (coef U / s, coef / s: hoisted out of a tile loop) and into u once."""
    cu = coef * u
    return tl.where(top_class(zm, unique), (coef * inv_s) * (sum_u - u) - cu * q_top,
                    (coef * (sum_u * inv_s)) * ex - cu)


@triton.jit
def streamed_per_class_grad(grad_ptr, body_z, body_o, body_t, body_ew, body_at, cols, body, body_1, y_vec, row_store,
                            valid, m, unique, inv_s, q_top, sum_u, coef, eps, C, HAS_OFFSET: tl.constexpr,
                            HAS_ELEMENT_WEIGHT: tl.constexpr, DENSE_TARGET: tl.constexpr,
                            HAS_SMOOTHING: tl.constexpr, PER_ROW: tl.constexpr, BLOCK: tl.constexpr,
                            VEC: tl.constexpr, STAGES: tl.constexpr):
    """The per-class cross entropy's gradient pass over a streamed row's body (per_class_ce_grad), its dense
    targets read unchecked: pass 1 (streamed_top with SUMS) made sum_u, which scales every lane, NaN for a row
    with an out-of-range one."""
    for start in tl.range(0, body_1, BLOCK, num_stages=STAGES):
        offs = start + cols
        mask = body_mask(offs, body, y_vec, VEC)
        z = add_offset(tl.load(body_z + offs, mask=mask, other=0.0).to(tl.float32), body_o, offs, mask, HAS_OFFSET)
        u, _ = class_coefficients(body_t, body_ew, offs, mask, False, eps, C, DENSE_TARGET, HAS_ELEMENT_WEIGHT,
                                  HAS_SMOOTHING, True)
        zm = z - m[:, None]
        store_grad(grad_ptr + body_at + offs, mask & row_store,
                   per_class_ce_grad(zm, tl.exp2(zm * LOG2E), u, unique[:, None], inv_s[:, None], q_top[:, None],
                                     sum_u[:, None], coef[:, None]), valid[:, None], PER_ROW)


@triton.jit
def softmax_ce_kernel(
    logits_ptr, target_ptr, weight_ptr, offset_ptr, margin_ptr, sample_weight_ptr, element_weight_ptr, grad_loss_ptr,
    loss_ptr, grad_ptr, N, C, eps, ignore_index,
    HAS_WEIGHT: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_SAMPLE_WEIGHT: tl.constexpr,
    HAS_ELEMENT_WEIGHT: tl.constexpr, DENSE_TARGET: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    WRITE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr, SCALE_GRAD: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, HELD: tl.constexpr, STAGES: tl.constexpr,
):
    """Grid: the persistent programs of rows.py; HELD and the streaming path: the module docstring; PER_CLASS
    (a dense target, or element weights with smoothing): the per-class path above, loss alpha_i (U log s -
    sum_c u_c (z_c - m)) with log s = log1p(s_rest). Row values are [ROWS] tensors; the body tile is
    [ROWS, BLOCK], the edge tile [4 VEC, ROWS] (rows.py)."""
    PER_ROW: tl.constexpr = ROWS == 1
    PER_CLASS: tl.constexpr = per_class(DENSE_TARGET, HAS_ELEMENT_WEIGHT, HAS_SMOOTHING)
    ROW_WEIGHT: tl.constexpr = DENSE_TARGET and HAS_WEIGHT
    cols = tl.arange(0, BLOCK)[None, :]
    n_blocks = tl.cdiv(N, ROWS)
    for block in tl.range(tl.program_id(0), n_blocks, tl.num_programs(0), num_stages=STAGES if HELD else 1):
        (rows, row_mask, valid, alpha, a_up, body, y_vec, e_at, e_mask, e_is_y, z_y, body_o, e_o, margin_y, head,
         e_cols) = row_setup(logits_ptr, target_ptr, weight_ptr, offset_ptr, margin_ptr, sample_weight_ptr,
                             element_weight_ptr, block, N, C, ignore_index, HAS_WEIGHT, HAS_OFFSET, HAS_MARGIN,
                             HAS_SAMPLE_WEIGHT, HAS_ELEMENT_WEIGHT, DENSE_TARGET, PER_CLASS, ROWS, VEC)
        body_z, body_at, row_store, e_store, body_1, compute = row_frame(logits_ptr, a_up, row_mask, e_mask, body,
                                                                         valid, PER_ROW)
        if PER_CLASS:
            body_t, e_t, body_w, e_w, body_ew, e_ew = class_pointers(target_ptr, weight_ptr, element_weight_ptr,
                                                                    body_at, e_at, head, e_cols, HAS_WEIGHT,
                                                                    HAS_ELEMENT_WEIGHT, DENSE_TARGET)
        if HELD:  # loaded before the branch, so the pipelined loop prefetches them for every row
            b_mask, z_b, z_e = held_tiles(logits_ptr, body_z, cols, body, y_vec, e_at, e_mask, e_is_y, body_o, e_o,
                                          margin_y, HAS_OFFSET, HAS_MARGIN, VEC)
            if PER_CLASS:
                u_b, t_b = class_coefficients(body_t, body_ew, cols, b_mask, False, eps, C, DENSE_TARGET,
                                              HAS_ELEMENT_WEIGHT, HAS_SMOOTHING)
                u_e, t_e = class_coefficients(e_t, e_ew, 0, e_mask, e_is_y, eps, C, DENSE_TARGET, HAS_ELEMENT_WEIGHT,
                                              HAS_SMOOTHING)
        if compute:
            if PER_CLASS:
                if HELD:
                    m, zm_b, zm_e, ex_b, ex_e, s_rest = held_top(z_b, z_e)
                    sum_u = tl.sum(u_b, axis=1) + tl.sum(u_e, axis=0)
                    sum_uz = (tl.sum(tl.where(b_mask, u_b * zm_b, 0.0), axis=1)
                              + tl.sum(tl.where(e_mask, u_e * zm_e, 0.0), axis=0))
                    if ROW_WEIGHT:
                        alpha *= (tl.sum(t_b * column_values(body_w, cols, b_mask), axis=1)
                                  + tl.sum(t_e * column_values(e_w, 0, e_mask), axis=0))
                else:
                    m, s_rest, z_e, zm_e, ex_e, u_e, sum_u, sum_uz, row_weight = streamed_top(
                        logits_ptr, body_z, body_o, body_t, body_ew, body_w, cols, body, body_1, y_vec, e_at, e_t, e_ew,
                        e_w, e_mask, e_is_y, e_o, margin_y, eps, C, True, ROW_WEIGHT, HAS_OFFSET, HAS_MARGIN,
                        HAS_ELEMENT_WEIGHT, DENSE_TARGET, HAS_SMOOTHING, ROWS, BLOCK, VEC, STAGES)
                    if ROW_WEIGHT:
                        alpha *= row_weight
                if WRITE_LOSS:
                    tl.store(loss_ptr + rows, tl.where(valid, alpha * (sum_u * log1p_pos(s_rest) - sum_uz), 0.0),
                             mask=row_mask)
                if WRITE_GRAD:
                    coef = grad_coef(alpha, grad_loss_ptr, rows, SCALE_GRAD)
                    inv_s = 1.0 / (1.0 + s_rest)
                    q_top = s_rest * inv_s
                    unique = s_rest < 1.0
                    if HELD:
                        store_grad(grad_ptr + body_at + cols, b_mask & row_store,
                                   per_class_ce_grad(zm_b, ex_b, u_b, unique[:, None], inv_s[:, None],
                                                     q_top[:, None], sum_u[:, None], coef[:, None]),
                                   valid[:, None], PER_ROW)
                    else:
                        streamed_per_class_grad(grad_ptr, body_z, body_o, body_t, body_ew, body_at, cols, body, body_1,
                                                y_vec, row_store, valid, m, unique, inv_s, q_top, sum_u, coef, eps, C,
                                                HAS_OFFSET, HAS_ELEMENT_WEIGHT, DENSE_TARGET, HAS_SMOOTHING, PER_ROW,
                                                BLOCK, VEC, STAGES)
                    store_grad(grad_ptr + e_at, e_store,
                               per_class_ce_grad(zm_e, ex_e, u_e, unique[None, :], inv_s[None, :], q_top[None, :],
                                                 sum_u[None, :], coef[None, :]), valid[None, :], PER_ROW)
            else:
                if HELD:
                    m, ex_b, ex_e, s_ny = held_lse(z_b, z_e, e_is_y)
                    sum_z = tl.zeros_like(m)
                    if HAS_SMOOTHING:
                        sum_z = (tl.sum(tl.where(b_mask, z_b, 0.0), axis=1)
                                 + tl.sum(tl.where(e_mask, z_e, 0.0), axis=0))
                else:
                    m, z_e, ex_e, s_ny, sum_z = streamed_lse(logits_ptr, body_z, cols, body, body_1, y_vec, e_at,
                                                             e_mask, e_is_y, z_y, body_o, e_o, margin_y, HAS_SMOOTHING,
                                                             HAS_OFFSET, HAS_MARGIN, ROWS, BLOCK, VEC, STAGES)
                s = s_ny + tl.exp2((z_y - m) * LOG2E)
                if WRITE_LOSS:
                    row_loss = ce_row_loss(m, s, s_ny, z_y, sum_z, eps, C, HAS_SMOOTHING)
                    tl.store(loss_ptr + rows, tl.where(valid, alpha * row_loss, 0.0), mask=row_mask)
                if WRITE_GRAD:
                    k, off, g_y = grad_terms(grad_coef(alpha, grad_loss_ptr, rows, SCALE_GRAD), s, s_ny, eps, C,
                                             HAS_SMOOTHING)
                    if HELD:
                        store_grad(grad_ptr + body_at + cols, b_mask & row_store, ex_b * k[:, None] - off[:, None],
                                   valid[:, None], PER_ROW)
                    else:
                        streamed_grad(grad_ptr, body_z, body_o, body_at, cols, body, 0, body_1, y_vec, row_store,
                                      valid, m, k, off, HAS_OFFSET, PER_ROW, BLOCK, VEC, STAGES)
                    store_grad(grad_ptr + e_at, e_store,
                               tl.where(e_is_y, g_y[None, :], ex_e * k[None, :] - off[None, :]), valid[None, :],
                               PER_ROW)
        else:
            store_zeros(grad_ptr, body_at, cols, body, 0, body_1, y_vec, row_store, e_at, e_store, loss_ptr, rows,
                        row_mask, WRITE_LOSS, WRITE_GRAD, HELD, ROWS, BLOCK, VEC)
