"""Rows split into column chunks, for launches with too few rows for the device (grid.split_geometry decides).

Why. A launch walks its rows with a persistent grid of a few programs per SM (grid.py). With fewer rows than
about two per SM (at N x C = 2^24: C >= 65536), some SMs hold one program or none: one program per SM
cannot overlap its own loads, reductions and arithmetic, nor keep enough bytes in flight to cover DRAM's
latency, and the idle SMs' share of the bandwidth is lost (docs/roofline.md, "Where the predicted cliffs
come from"). Splitting each row into S chunks makes N x S work units, enough to fill every SM.

How. A unit is (row, chunk): row = unit // S, chunk = unit % S (split_unit). A chunk is a range of the row's
aligned body (rows.py): body columns [chunk W, min(chunk W + W, body)), W = chunk_cols a multiple of the
launch's tile, so that every tile of the row lies in one chunk and starts on a 16-byte boundary (chunk_span).
The row's edge tile (head, tail, the target's vector) goes with chunk 0 only: the other chunks mask it off,
so that each element of the row belongs to exactly one unit. No unit waits for another (no spin-wait, no
cross-program barrier: the interpreter runs programs one after another, and a GPU need not run them at
once); what a row needs from all of its chunks is combined by a later launch, in a fixed order, so the
results do not depend on which program ran first, and no float atomics are used:
- the sigmoid family (sigmoid_focal.py): an element's gradient does not depend on the rest of its row (the
  row weight is per row), so the chunks are independent; each writes its part of the row's loss to an
  (N, S) fp32 buffer, which sum_parts_kernel sums over each row, in a fixed order, into the loss;
- the softmax families (softmax_split.py): the gradient needs the row's max and sums, so a first launch
  writes each chunk's partial statistics and a second one combines a row's S partials, then writes its
  chunk's gradient (and chunk 0 the row's loss). The two reads of a row are a launch apart: the launcher
  runs the pair on batches of rows that fit half of L2 (grid.split_geometry), so the second read comes
  from L2.
"""
import triton
import triton.language as tl

SUM_ROWS = 32  # rows per program of sum_parts_kernel


@triton.jit
def split_unit(unit, chunks):
    """(row, chunk) of a work unit: units run row-major, the chunks of a row one after another."""
    return unit // chunks, unit % chunks


@triton.jit
def chunk_span(chunk, chunk_cols, body_1):
    """(lo, hi, first): the chunk's body columns [lo, hi) (empty where the body ends before it), and whether
    it is the row's first chunk, the one that takes the edge tile."""
    lo = chunk * chunk_cols
    return lo, tl.minimum(lo + chunk_cols, body_1), chunk == 0


@triton.jit
def sum_parts_kernel(parts_ptr, out_ptr, N, chunks, ROWS: tl.constexpr, CHUNKS: tl.constexpr):
    """out[i] = sum_j parts[i, j] over the row's `chunks` parts ((N, chunks) fp32, row-major); CHUNKS is the
    power of two >= chunks. One reduction tree over a fixed tile: the same order at every call."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    j = tl.arange(0, CHUNKS)
    mask = (rows < N)[:, None] & (j < chunks)[None, :]
    parts = tl.load(parts_ptr + rows[:, None] * chunks + j[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + rows, tl.sum(parts, axis=1), mask=rows < N)
