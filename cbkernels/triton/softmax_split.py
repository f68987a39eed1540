"""The softmax families' rows split into column chunks (split.py: why, and the units): two launches, the
cross entropy's (softmax_ce.py) and, without label smoothing, the softmax focal loss's (softmax_focal.py)
streamed pass cut where the row's statistics are needed whole.

1. softmax_split_stats_kernel: each unit (row i, chunk j) reads its chunk (and chunk 0 the row's edge tile,
   rows.py) and writes the chunk's partial statistics over its classes other than the target:
       m_j = max_c z_c,   s_j = sum_c exp(z_c - m_j),   and with label smoothing  sz_j = sum_c z_c.
2. softmax_split_finish_kernel: each unit reads its row's S partials and combines them in a fixed order,
       m = max(z_y, max_j m_j),   s_ny = sum_j s_j exp(m_j - m),   sum_z = sum_j sz_j (+ z_y, in the edge),
   which is exact algebra: s_j exp(m_j - m) = sum_c exp(z_c - m_j) exp(m_j - m) = sum_c exp(z_c - m) over
   chunk j, so s_ny is the sum over every class but the target relative to the row's max, as the streamed
   pass's per-lane merge forms it (softmax_ce.streamed_lse: the same merge one level up, the lanes of a
   chunk then the chunks of a row). Every unit of a row combines the same values in the same order, so
   they agree to the bit on (m, s_ny). From there the row is the unsplit kernels': s = s_ny + exp(z_y - m),
   the loss (chunk 0 writes it) and the chunk's gradient k exp(z - m) - off (softmax_ce.grad_terms; times
   the focal factor F for the softmax focal loss, softmax_focal.target_terms), the target's own gradient
   g_y in chunk 0's edge tile.
A chunk with no class (its body columns past the row's end, or only the target's vector) has
(m_j, s_j) = (_LOWEST, 0), and the rescaling is written as exp((m_j - m) log2 e) so that such a part adds
exactly 0 even when every part is empty (_LOWEST - _LOWEST = 0; the streamed pass's FMA form
m_j log2 e - m log2 e would form -inf + inf there). NaN in a chunk makes its s_j, hence s_ny and the whole
row's loss and gradient, NaN.

The second read. The finish launch reads each chunk again: from L2 when the rows between the two reads fit
in half of it. The launcher runs the two launches on batches of rows whose bytes fit (grid.split_geometry),
stats then finish for each batch, so that between a row's two reads only its batch is read (and its
gradient written). A launch that writes only the loss reads no body again: one stats launch and one finish
launch over all rows, one unit a row.

What is split: class-index targets, without the per-class path (a dense target, or element weights with
label smoothing) and, for the softmax focal loss, without label smoothing (whose sums pass would be a third
launch); the launcher keeps the unsplit kernels for those (kernels.py: split_supports).
"""
import triton
import triton.language as tl

from .fastmath import LOG2E
from .rows import row_frame
from .softmax_ce import (_LOWEST, ce_row_loss, edge_logits, grad_coef, grad_terms, lane_lse, row_setup, store_grad,
                         store_zeros, streamed_grad)
from .softmax_focal import target_terms
from .split import chunk_span, split_unit

STATS = 3  # planes of the statistics buffer (3, N, chunks): m_j, s_j, sz_j (sz_j written with label smoothing)


@triton.jit
def _rescaled_sum(m_p, s_p, m):
    """sum_j s_j exp(m_j - m) over the last axis ([ROWS, J] parts of (max, sum) pairs, m [ROWS] >= every m_j),
    an empty part (_LOWEST, 0) adding exactly 0."""
    return tl.sum(s_p * tl.exp2((m_p - m[:, None]) * LOG2E), axis=1)


@triton.jit
def _unit_frame(logits_ptr, target_ptr, weight_ptr, offset_ptr, margin_ptr, sample_weight_ptr, element_weight_ptr,
                row, chunk, N, C, chunk_cols, ignore_index, HAS_WEIGHT: tl.constexpr, HAS_OFFSET: tl.constexpr,
                HAS_MARGIN: tl.constexpr, HAS_SAMPLE_WEIGHT: tl.constexpr, HAS_ELEMENT_WEIGHT: tl.constexpr,
                VEC: tl.constexpr):
    """A unit's row (softmax_ce.row_setup, one row) and its chunk: (rows, row_mask, valid, alpha, body, y_vec,
    e_at, e_mask, e_is_y, z_y, body_o, e_o, margin_y, body_z, body_at, row_store, e_store, compute, lo, hi,
    first), the edge tile masked off but in the first chunk."""
    (rows, row_mask, valid, alpha, a_up, body, y_vec, e_at, e_mask, e_is_y, z_y, body_o, e_o, margin_y, head,
     e_cols) = row_setup(logits_ptr, target_ptr, weight_ptr, offset_ptr, margin_ptr, sample_weight_ptr,
                         element_weight_ptr, row, N, C, ignore_index, HAS_WEIGHT, HAS_OFFSET, HAS_MARGIN,
                         HAS_SAMPLE_WEIGHT, HAS_ELEMENT_WEIGHT, False, False, 1, VEC)
    body_z, body_at, row_store, e_store, body_1, compute = row_frame(logits_ptr, a_up, row_mask, e_mask, body,
                                                                     valid, True)
    lo, hi, first = chunk_span(chunk, chunk_cols, body_1)
    e_mask = e_mask & first
    return (rows, row_mask, valid, alpha, body, y_vec, e_at, e_mask, e_is_y & first, z_y, body_o, e_o, margin_y,
            body_z, body_at, row_store, e_store & first, compute, lo, hi, first)


@triton.jit
def softmax_split_stats_kernel(
    logits_ptr, target_ptr, weight_ptr, offset_ptr, margin_ptr, sample_weight_ptr, element_weight_ptr, stats_ptr,
    row0, row_end, N, C, chunk_cols, chunks, ignore_index,
    HAS_WEIGHT: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_SAMPLE_WEIGHT: tl.constexpr,
    HAS_ELEMENT_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    BLOCK: tl.constexpr, VEC: tl.constexpr, STAGES: tl.constexpr,
):
    """Launch 1 on rows [row0, row_end): the partial statistics (m_j, s_j, sz_j) of every chunk of a row that is
    not ignored, to stats_ptr ((STATS, N, chunks) fp32). Persistent programs over the batch's units."""
    cols = tl.arange(0, BLOCK)[None, :]
    for unit in tl.range(row0 * chunks + tl.program_id(0), row_end * chunks, tl.num_programs(0)):
        row, chunk = split_unit(unit, chunks)
        (rows, row_mask, valid, alpha, body, y_vec, e_at, e_mask, e_is_y, z_y, body_o, e_o, margin_y, body_z, body_at,
         row_store, e_store, compute, lo, hi, first) = _unit_frame(
            logits_ptr, target_ptr, weight_ptr, offset_ptr, margin_ptr, sample_weight_ptr, element_weight_ptr, row,
            chunk, N, C, chunk_cols, ignore_index, HAS_WEIGHT, HAS_OFFSET, HAS_MARGIN, HAS_SAMPLE_WEIGHT,
            HAS_ELEMENT_WEIGHT, VEC)
        if compute:
            m_l, s_l, sz_l = lane_lse(body_z, body_o, cols, body, lo, hi, y_vec, HAS_SMOOTHING, HAS_OFFSET, 1, BLOCK,
                                      VEC, STAGES)
            z_e = edge_logits(logits_ptr, e_at, e_mask, e_is_y, e_o, margin_y, HAS_OFFSET, HAS_MARGIN)
            z_ne = tl.where(e_is_y, float("-inf"), z_e)  # the target stays out of the parts (combined as z_y)
            m = tl.maximum(tl.max(m_l, axis=1), tl.max(z_ne, axis=0))
            s = _rescaled_sum(m_l, s_l, m) + tl.sum(tl.exp2((z_ne - m[None, :]) * LOG2E), axis=0)
            at = stats_ptr + rows * chunks + chunk
            plane = N * chunks
            tl.store(at, m)
            tl.store(at + plane, s)
            if HAS_SMOOTHING:
                tl.store(at + 2 * plane, tl.sum(sz_l, axis=1) + tl.sum(tl.where(e_mask, z_e, 0.0), axis=0))


@triton.jit
def _combine(stats_ptr, rows, N, chunks, z_y, HAS_SMOOTHING: tl.constexpr, CHUNKS: tl.constexpr):
    """(m, s_ny, sum_z) of a row from its `chunks` parts (CHUNKS: the power of two >= chunks): the module
    docstring's combination, sum_z 0 without smoothing."""
    j = tl.arange(0, CHUNKS)[None, :]
    mask = j < chunks
    at = stats_ptr + rows[:, None] * chunks + j
    plane = N * chunks
    m_p = tl.load(at, mask=mask, other=_LOWEST)
    m = tl.maximum(tl.max(m_p, axis=1), z_y)
    s_ny = _rescaled_sum(m_p, tl.load(at + plane, mask=mask, other=0.0), m)
    sum_z = tl.zeros_like(m)
    if HAS_SMOOTHING:
        sum_z = tl.sum(tl.load(at + 2 * plane, mask=mask, other=0.0), axis=1)
    return m, s_ny, sum_z


@triton.jit
def softmax_split_finish_kernel(
    logits_ptr, target_ptr, weight_ptr, offset_ptr, margin_ptr, sample_weight_ptr, element_weight_ptr, grad_loss_ptr,
    loss_ptr, grad_ptr, stats_ptr, row0, row_end, N, C, chunk_cols, chunks, gamma, eps, ignore_index,
    HAS_WEIGHT: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_SAMPLE_WEIGHT: tl.constexpr,
    HAS_ELEMENT_WEIGHT: tl.constexpr, FOCAL: tl.constexpr, GAMMA_MODE: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    WRITE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr, SCALE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr, VEC: tl.constexpr, STAGES: tl.constexpr, CHUNKS: tl.constexpr,
):
    """Launch 2 on rows [row0, row_end): combine each row's parts, then chunk 0 writes the row's loss
    (WRITE_LOSS) and every chunk its gradient (WRITE_GRAD; without it, one unit a row). FOCAL: the softmax
    focal loss (gamma, GAMMA_MODE; no label smoothing), loss mod_y l_y and the cross entropy's gradient times F;
    else the cross entropy (eps). Ignored rows: zeros."""
    tl.static_assert(not (FOCAL and HAS_SMOOTHING), "the softmax focal loss with label smoothing is not split")
    cols = tl.arange(0, BLOCK)[None, :]
    units = chunks if WRITE_GRAD else 1
    for unit in tl.range(row0 * units + tl.program_id(0), row_end * units, tl.num_programs(0)):
        row, chunk = split_unit(unit, units)
        (rows, row_mask, valid, alpha, body, y_vec, e_at, e_mask, e_is_y, z_y, body_o, e_o, margin_y, body_z, body_at,
         row_store, e_store, compute, lo, hi, first) = _unit_frame(
            logits_ptr, target_ptr, weight_ptr, offset_ptr, margin_ptr, sample_weight_ptr, element_weight_ptr, row,
            chunk, N, C, chunk_cols, ignore_index, HAS_WEIGHT, HAS_OFFSET, HAS_MARGIN, HAS_SAMPLE_WEIGHT,
            HAS_ELEMENT_WEIGHT, VEC)
        if compute:
            m, s_ny, sum_z = _combine(stats_ptr, rows, N, chunks, z_y, HAS_SMOOTHING, CHUNKS)
            coef = grad_coef(alpha, grad_loss_ptr, rows, SCALE_GRAD)
            if FOCAL:
                e_y, s, inv_s, q_y, l_y, mod_y, f = target_terms(m, s_ny, z_y, gamma, GAMMA_MODE)
                row_loss = mod_y * l_y
                coef *= f
            else:
                s = s_ny + tl.exp2((z_y - m) * LOG2E)
                row_loss = ce_row_loss(m, s, s_ny, z_y, sum_z, eps, C, HAS_SMOOTHING)
            if WRITE_LOSS:
                tl.store(loss_ptr + rows, tl.where(valid, alpha * row_loss, 0.0), mask=row_mask & first)
            if WRITE_GRAD:
                k, off, g_y = grad_terms(coef, s, s_ny, eps, C, HAS_SMOOTHING)
                streamed_grad(grad_ptr, body_z, body_o, body_at, cols, body, lo, hi, y_vec, row_store, valid, m, k,
                              off, HAS_OFFSET, True, BLOCK, VEC, STAGES)
                z_e = edge_logits(logits_ptr, e_at, e_mask, e_is_y, e_o, margin_y, HAS_OFFSET, HAS_MARGIN)
                ex_e = tl.exp2(z_e * LOG2E - (m * LOG2E)[None, :])
                store_grad(grad_ptr + e_at, e_store, tl.where(e_is_y, g_y[None, :], ex_e * k[None, :] - off[None, :]),
                           valid[None, :], True)
        else:
            store_zeros(grad_ptr, body_at, cols, body, lo, hi, y_vec, row_store, e_at, e_store, loss_ptr, rows,
                        row_mask & first, WRITE_LOSS, WRITE_GRAD, False, 1, BLOCK, VEC)
