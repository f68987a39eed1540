"""Per-row setup shared by the kernels: which rows a program walks, the row's target data, and where its
aligned body lies.

Persistent grid: a launch has P programs (a few per SM, cbkernels/triton/grid.py) and program p walks
the row blocks p, p + P, p + 2P, ... (`tl.range`, so the loads of the next block can be issued while
this one computes). A row block is ROWS consecutive rows; ROWS > 1 only for short rows.

Row geometry. The logits and the gradient are contiguous (N, C), so row i is the flat range
[a, b) = [i C, i C + C), and a row of C = 8142 classes starts on a 16-byte boundary only every few rows.
Triton emits 16-byte vector accesses only where it can prove a base aligned and a mask constant over
each vector, so each row is split (VEC = 16 bytes of elements):
    head [a, a_up)  |  body [a_up, b_dn): whole aligned vectors  |  tail [b_dn, b)
with a_up = a rounded up and b_dn = b rounded down to a multiple of VEC. The body is addressed from the
aligned pointer base + a_up with int32 offsets (a row has C < 2^31 elements; only the row base a needs
int64, since i * C passes 2^31 once N * C does). The head and tail (< VEC elements each) and the vector
that holds the target column form one edge tile with exact element masks (edge_columns): the kernels
treat every body element as a non-target class, with no per-element test for the target, and give the
target its own formula in the edge tile, once per row. No access ever leaves the row.

Logit adjustments (docs/op-contract.md, "Inputs"): the kernels compute at z' = z + logit_offset[c] -
[c == y] target_margin[y]. The (C,) offset is added where the logits are loaded (add_offset: the vector stays
in cache), the margin on the target column only, which the edge tile (or the softmax's z_y) holds apart. Both
are compile-time flags (HAS_OFFSET, HAS_MARGIN): without them no code is emitted.
"""
import triton
import triton.language as tl


@triton.jit
def row_block(block, N, ROWS: tl.constexpr):
    """The rows of row block `block` (int64, clamped to N - 1) and which of them exist (< N).

    Padding rows recompute row N - 1; every store is masked by the second value, so no load needs it."""
    rows = (block * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # block * ROWS < N + ROWS: no int32 overflow
    return tl.minimum(rows, N - 1), rows < N


@triton.jit
def row_targets(target_ptr, weight_ptr, sample_weight_ptr, rows, C, ignore_index, HAS_WEIGHT: tl.constexpr,
                HAS_SAMPLE_WEIGHT: tl.constexpr, DENSE_TARGET: tl.constexpr, ROWS: tl.constexpr):
    """(y, valid, alpha) per row: y the target as an int32 column in [0, C) (safe as an address),
    valid = target != ignore_index, alpha = class_weight[y] * sample_weight[row] (each 1 when absent).

    A target outside [0, C) that is not ignore_index is never used as an address: its alpha is NaN, so
    that row's loss and gradient are NaN (the op contract's GPU convention).

    A dense target (DENSE_TARGET) has no target column and no ignored row: y = -1 (so that no body vector is
    left out for it, target_vector, and no edge lane is its), valid everywhere, and alpha = sample_weight[row]:
    the class weights' part, sum_c t_c class_weight[c], is a sum over the row that the kernels form."""
    if DENSE_TARGET:
        y = tl.full([ROWS], -1, tl.int32)
        valid = tl.full([ROWS], 1, tl.int1)
        alpha = tl.full([ROWS], 1.0, tl.float32)
        if HAS_SAMPLE_WEIGHT:
            alpha *= tl.load(sample_weight_ptr + rows)
        return y, valid, alpha
    else:
        target = tl.load(target_ptr + rows).to(tl.int64)
        valid = target != ignore_index
        in_range = (target >= 0) & (target < C)
        y = tl.where(in_range, target, 0).to(tl.int32)
        if HAS_WEIGHT:
            alpha = tl.load(weight_ptr + y)
        else:
            alpha = tl.full([ROWS], 1.0, tl.float32)
        if HAS_SAMPLE_WEIGHT:
            alpha *= tl.load(sample_weight_ptr + rows)
        return y, valid, tl.where(valid & ~in_range, float("nan"), alpha)


@triton.jit
def dense_values(t, UNIT: tl.constexpr):
    """Dense target values (fp32) as the kernels use them: a value outside the family's range (UNIT: the
    sigmoid family's [0, 1]; else the softmax families' >= 0), NaN included, reads as NaN, so that its row's
    loss and gradient are NaN (the op contract's GPU convention: no host check, no sync)."""
    if UNIT:
        ok = (t >= 0.0) & (t <= 1.0)
    else:
        ok = t >= 0.0
    return tl.where(ok, t, float("nan"))


@triton.jit
def columns_at(vector_ptr, head, e_cols):
    """Pointers into a (C,) vector for the body tiles ([ROWS, 1]: at the body's first column, which the body
    tile's offs index as they index the logits) and for the edge tile's columns."""
    return vector_ptr + head[:, None], vector_ptr + e_cols


@triton.jit
def class_pointers(target_ptr, weight_ptr, element_weight_ptr, body_at, e_at, head, e_cols, HAS_WEIGHT: tl.constexpr,
                   HAS_ELEMENT_WEIGHT: tl.constexpr, DENSE_TARGET: tl.constexpr):
    """(body_t, e_t, body_w, e_w, body_ew, e_ew): the body and edge tiles' pointers into a dense target's row
    (split as the logits' row: body_at, e_at from row_frame and the edge tile), into class_weight for a dense
    row's weight sum_c t_c class_weight[c], and into element_weight; a 0 placeholder where that input is
    absent or not read per class (never read then)."""
    body_t = 0
    e_t = 0
    body_w = 0
    e_w = 0
    body_ew = 0
    e_ew = 0
    if DENSE_TARGET:
        body_t = target_ptr + body_at
        e_t = target_ptr + e_at
        if HAS_WEIGHT:
            body_w, e_w = columns_at(weight_ptr, head, e_cols)
    if HAS_ELEMENT_WEIGHT:
        body_ew, e_ew = columns_at(element_weight_ptr, head, e_cols)
    return body_t, e_t, body_w, e_w, body_ew, e_ew


@triton.jit
def column_values(at, offs, mask):
    """A tile of a (C,) float32 vector, or of a dense target row, at the pointers at + offs, as fp32 (0 on
    masked lanes). at may be a placeholder where the caller's flag is off, hence apart from offs."""
    return tl.load(at + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def row_adjustments(offset_ptr, margin_ptr, y, head, e_cols, HAS_OFFSET: tl.constexpr, HAS_MARGIN: tl.constexpr):
    """(body_o, e_o, margin_y): logit_offset at the body's first column ([ROWS, 1] pointers, the body tile's
    offs index it as they index the logits) and at the edge tile's columns, and target_margin[y] per row;
    a constant 0 for an adjustment that is absent (never read then: a compiled function cannot return None).
    y is in [0, C) (row_targets), so the margin's load is safe."""
    body_o = 0
    e_o = 0
    margin_y = 0
    if HAS_OFFSET:
        body_o, e_o = columns_at(offset_ptr, head, e_cols)
    if HAS_MARGIN:
        margin_y = tl.load(margin_ptr + y)
    return body_o, e_o, margin_y


@triton.jit
def add_offset(z, offset_at, offs, mask, HAS_OFFSET: tl.constexpr):
    """z + logit_offset at the pointers offset_at + offs (masked lanes, padding at -inf or 0, unchanged).
    offset_at may be a placeholder without HAS_OFFSET, hence apart from offs: nothing is formed from it then."""
    if HAS_OFFSET:
        z += tl.load(offset_at + offs, mask=mask, other=0.0)
    return z


@triton.jit
def adjust_edge(z_e, e_o, e_mask, e_is_y, margin_y, HAS_OFFSET: tl.constexpr, HAS_MARGIN: tl.constexpr):
    """The edge tile's logits ([4 VEC, ROWS]) adjusted: the offset on every lane, the margin on the target's."""
    z_e = add_offset(z_e, e_o, 0, e_mask, HAS_OFFSET)
    if HAS_MARGIN:
        z_e -= tl.where(e_is_y, margin_y[None, :], 0.0)
    return z_e


@triton.jit
def row_split(rows, C, VEC: tl.constexpr):
    """(a, a_up, head, body): the row base a = i C and the body's flat start a_up (int64), the body's first
    column head = a_up - a and its length body = max(b_dn - a_up, 0) (int32). Pointers to the body are
    formed from a_up, which the compiler sees as a multiple of VEC (from a + head it could not tell)."""
    a = rows * C
    a_up = (a + (VEC - 1)) // VEC * VEC
    b_dn = (a + C) // VEC * VEC
    head = (a_up - a).to(tl.int32)
    body = tl.maximum(b_dn - a_up, 0).to(tl.int32)
    return a, a_up, head, body


@triton.jit
def target_vector(y, head, body, VEC: tl.constexpr):
    """The index within the body of the VEC-wide vector that holds the target column y, or -1 when y lies
    in the head or tail (int32, per row). The body's accesses leave that vector out with a mask that is
    constant over each vector (body_mask), so they stay 16-byte vectors; the edge tile handles it."""
    y_body = y - head
    return tl.where((y_body >= 0) & (y_body < body), y_body // VEC, -1)


@triton.jit
def body_mask(offs, body, y_vec, VEC: tl.constexpr):
    """Which body lanes offs ([ROWS, BLOCK] int32) a body tile loads and stores: inside the body, outside
    the target's vector."""
    return (offs < body[:, None]) & (offs // VEC != y_vec[:, None])


@triton.jit
def edge_columns(head, body, y_vec, C, VEC: tl.constexpr):
    """Columns (int32) and mask of the edge tile, the elements of a row that the body tiles leave out, in
    groups of VEC lanes: the head (columns [0, min(head, C))), the tail ([head + body, C); empty when the
    row is shorter than the head, which then holds it all), the target's vector (when y_vec >= 0), and a
    fourth group that is always masked (the lane count must be a power of two).

    The tile is [4 VEC, ROWS], lanes along the first axis: Triton then gives each thread one lane (a
    [ROWS, 4 VEC] tile would take the body's layout, VEC lanes per thread, every thread computing VEC of
    them), and its sums over axis 0 stay inside a warp."""
    lane = tl.arange(0, 4 * VEC)[:, None]
    group = lane // VEC
    within = lane % VEC
    head_end = tl.minimum(head, C)[None, :]
    tail_start = (head + body)[None, :]
    y_start = (head + y_vec * VEC)[None, :]
    cols = tl.where(group == 0, within, tl.where(group == 1, tail_start, y_start) + within)
    mask = tl.where(group == 0, within < head_end,
                    tl.where(group == 1, (cols >= head_end) & (cols < C), (group == 2) & (y_vec[None, :] >= 0)))
    return cols, mask


@triton.jit
def row_frame(logits_ptr, a_up, row_mask, e_mask, body, valid, PER_ROW: tl.constexpr):
    """What each kernel's row walk derives once per row block: (body_z, body_at, row_store, e_store, body_1,
    compute): the body's 16-byte aligned base pointer and flat start (the gradient's pointers), the store
    masks of the body and edge tiles, the body loop's bound (the longest body of the block), and whether to
    compute at all: a one-row block skips an ignored row; a block of rows always computes and its ignored
    rows are zeroed through `valid`."""
    body_1 = row_scalar(body) if PER_ROW else tl.max(body, axis=0)
    if PER_ROW:
        compute = row_scalar(valid.to(tl.int32)) != 0
    else:
        compute = True
    return logits_ptr + a_up[:, None], a_up[:, None], row_mask[:, None], e_mask & row_mask[None, :], body_1, compute


@triton.jit
def row_scalar(x):
    """The one value of a [1]-shaped per-row tensor, as a scalar (for per-row branches when ROWS == 1)."""
    return tl.sum(x, axis=0)
