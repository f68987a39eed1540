// Rows split into column chunks, for calls with too few rows for the device (launch.cu: split_plan decides).
//
// Why. The kernels of kernels.cuh walk rows with a persistent grid, one row per row slot. With fewer rows
// than SMs, most SMs are idle, and each busy one holds a single row slot, which can neither overlap its own
// loads, reductions and arithmetic nor keep enough bytes in flight to cover DRAM's latency. Splitting each
// row into S chunks makes N * S work units, enough to fill every block of the persistent grid.
//
// How. A unit is (row, chunk): unit u of a launch covering rows [row0, row0 + rows) is row row0 + u / S,
// chunk u % S, and the grid walks units as the unsplit kernels walk rows (row_io.cuh Slot). A chunk is a
// range of the row's aligned body (row_io.cuh Span): body vectors [j W, min(j W + W, nvec)), W = chunk_vecs,
// so every chunk starts on a vector boundary of the row's own aligned body (16-byte aligned). The row's
// edge columns (head, tail, the target's vector: row_io.cuh edge_column) belong to chunk 0 only, and the
// body loops of every chunk skip the target's vector, so each column of the row belongs to exactly one unit.
// No unit waits for another; what a row needs from all its chunks is combined by a later launch, in one fixed
// order, so results do not depend on which block ran first, and no float atomic is used:
//   - the sigmoid family: an element's gradient does not depend on the rest of its row, so the chunks are
//     independent. Each writes its part of the row's loss (alpha times its sum; 0 for an ignored row, NaN
//     for a bad target) to an (N, S) fp32 workspace, which sum_parts_kernel sums over each row into the loss.
//   - the softmax (cross entropy; focal loss without label smoothing): the gradient needs the row's max and
//     sums, so softmax_split_stats_kernel writes each chunk's statistics over its classes other than the
//     target, and softmax_split_finish_kernel combines a row's S statistics (combined_row), then writes the
//     chunk's gradient (chunk 0 also the row's loss). launch.cu runs the pair on batches of rows that fit
//     half of L2, so that the finish launch's second read of a chunk comes from L2.
#pragma once

#include <math_constants.h>

#include <cstdint>

#include "block_reduce.cuh"
#include "common/gamma_case.h"
#include "common/loss_args.h"
#include "kernels.cuh"
#include "row_io.cuh"

namespace cbkernels::cuda::device {

// The rows a split launch covers and how they are cut. The workspace is indexed by the row's index in the
// whole call (row * chunks + chunk), so batches of one call share it without overlapping.
struct SplitRows {
  int64_t row0;    // first row of the launch
  int64_t rows;    // rows of the launch
  int chunks;      // S: chunks of every row
  int chunk_vecs;  // W: body vectors of a chunk (the last one of a row may have fewer, or none)
};

// A unit's row and chunk; a row slot past the launch's units gets row num_rows, which row_state reads as
// kNoRow (it then takes part in the block's reductions only).
struct Unit {
  int64_t row;
  int chunk;
};

__device__ __forceinline__ Unit unit_of(const SplitRows& sr, int units_per_row, int64_t unit, int64_t num_rows) {
  if (unit >= sr.rows * units_per_row) return {num_rows, 0};
  return {sr.row0 + unit / units_per_row, static_cast<int>(unit % units_per_row)};
}

// A chunk's body vectors [lo, hi), clamped to the row's body (a row whose head is not 0 may have a vector
// fewer than the launcher counted: its last chunk may be short or empty), and the columns it owns, [col_lo,
// col_hi): chunk 0 also owns the head, the last chunk the tail, so the chunks' columns partition the row
// (the fill of an ignored or bad-target row's gradient).
struct Chunk {
  int lo, hi;
  int col_lo, col_hi;
};

template <int VEC>
__device__ __forceinline__ Chunk chunk_of(const Span& s, const SplitRows& sr, int chunk) {
  const int64_t start = static_cast<int64_t>(chunk) * sr.chunk_vecs;
  const int lo = start < s.nvec ? static_cast<int>(start) : s.nvec;
  const int hi = s.nvec - lo < sr.chunk_vecs ? s.nvec : lo + sr.chunk_vecs;
  return {lo, hi, chunk == 0 ? 0 : s.head + lo * VEC, chunk == sr.chunks - 1 ? s.len : s.head + hi * VEC};
}

// ---- sigmoid family -----------------------------------------------------------------------------------------

// Each unit: its chunk's gradient (Write) and, when the call writes the loss, its part of the row's loss
// into parts[row * chunks + chunk] (kernels.cuh sigmoid_body, sigmoid_edge: the unsplit kernel's work, on the chunk).
template <typename E, int VEC, GammaCase G, bool Write, bool Extended>
__global__ void __launch_bounds__(kMaxThreads) sigmoid_split_kernel(LossArgs a, int tpr, SplitRows sr, float* parts) {
  using B = typename E::bits;
  __shared__ float slots[2][kMaxWarps];  // alternate units: one reduction per unit (block_reduce.cuh)
  const Slot at = slot_of(tpr);
  const int c = static_cast<int>(a.num_classes);

  int parity = 0;
  for (int64_t first = at.first; first < sr.rows * sr.chunks; first += at.stride, parity ^= 1) {
    const int64_t unit = first + at.group;
    const Unit u = unit_of(sr, sr.chunks, unit, a.num_rows);
    const Row r = row_state(a, u.row);
    const int64_t base = r.kind == kNoRow ? 0 : u.row;
    const B* x = static_cast<const B*>(a.logits) + base * a.row_stride;
    B* g = Write ? static_cast<B*>(a.grad) + base * a.num_classes : nullptr;
    const Span s = split_row<VEC>(x, c);
    const Chunk k = chunk_of<VEC>(s, sr, u.chunk);

    // Chunk 0's edge columns before its body, and the fill of a row that computes nothing before the
    // reduction, so that neither keeps registers live across the column loop.
    float acc = 0.f;
    if (r.kind == kCompute) {
      const int target_v = s.vector_of(r.y, VEC);
      if (u.chunk == 0) acc = sigmoid_edge<E, VEC, G, Write, Extended>(a, r, x, g, s, target_v, at.tid);
      acc += sigmoid_body<E, VEC, G, Write, Extended>(a, r, x, g, s, k.lo, k.hi, target_v, at.tid, tpr);
    } else if (Write && r.kind != kNoRow) {
      fill_columns<E>(g, k.col_lo, k.col_hi, r.kind == kIgnored ? 0.f : CUDART_NAN_F, at.tid, tpr);
    }
    if (parts != nullptr) {
      float total[1] = {acc};
      row_reduce<SumOp>(total, tpr, at.group, slots[parity]);
      // The part of unit u sits at row * chunks + chunk = row0 * chunks + u.
      if (at.tid == 0 && r.kind != kNoRow) parts[sr.row0 * sr.chunks + unit] = row_loss(r, r.alpha * total[0]);
    }
  }
}

// out[i] = parts[i * chunks] + parts[i * chunks + 1] + ... in that order, one thread per row: a split call
// has fewer rows than SMs, each of S parts (S at most the grid's row slots), a few hundred additions at most.
constexpr int kSumPartsThreads = 128;

__global__ void __launch_bounds__(kSumPartsThreads) sum_parts_kernel(const float* parts, int chunks, int64_t rows,
                                                                    float* out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const float* p = parts + row * chunks;
  float total = p[0];
  for (int j = 1; j < chunks; ++j) total += p[j];
  out[row] = total;
}

// ---- softmax ------------------------------------------------------------------------------------------------
// Launch 1, per unit (row i, chunk j) of a computed row, over the chunk's classes other than the target
// (its body vectors but the target's, and for chunk 0 the edge columns but the target):
//   m_j = max z_c,   s_j = sum exp(z_c - m_j),   and when SumZ (label smoothing) sz_j = sum z_c, this one
//   with the target's z_y (less its margin) in chunk 0's edge: sz = sum_j sz_j is the row's sum of z.
// Launch 2 combines them (combined_row): m = max(z_y, max_j m_j) and
//   sr = sum_j s_j exp(m_j - m) = sum_j sum_{c in j} exp(z_c - m_j) exp(m_j - m) = sum_{c != y} exp(z_c - m),
// the sum off the target relative to the row's max, as the unsplit kernels form it (their per-thread sums are
// rescaled to the row max the same way, one level down); e_y = exp(z_y - m) is formed apart from it, so
// 1 - p_y = sr / s and the log1p form of the loss keep their precision (kernels.cuh softmax_row_loss).
// An empty chunk (no class: past the row's body, or only the target's vector) has (m_j, s_j) = (-inf, 0), and
// adds s_j exp(m_j - lse_shift(m)) = 0 * 0 even when every m_j and z_y are -inf (shift 0: no -inf + inf).
// A NaN logit makes its chunk's s_j, then sr and every output of the row, NaN (fmaxf may drop it from a max,
// not from a sum); a NaN z_y makes e_y NaN.
// The statistics live in three planes of the workspace, each (N, S) fp32: m_j, s_j, sz_j.
constexpr int kStatPlanes = 3;

// Chunks a row splits into at most: 32 lanes x kPartsPerLane parts a lane in combined_row. launch.cu caps the
// split there; more chunks than 256 would only come from a row of over 8M columns on a handful of rows.
constexpr int kPartsPerLane = 8;
constexpr int kMaxChunks = 32 * kPartsPerLane;

// A thread's running (max, sum of exp(z - max)) over the classes it has seen: when a value raises the max,
// the sum is rescaled once (exp(m_old - m_new); m_old = -inf: the sum is still 0, and 0 * 0 = 0).
// Starts at (-inf, 0): no class seen.
struct RunningSum {
  float m, s;

  __device__ __forceinline__ void raise_max(float cm) {
    if (cm > m) {
      s *= exp_shifted(m, cm);
      m = cm;
    }
  }
  __device__ __forceinline__ void add(float z) { s += exp_shifted(z, lse_shift(m)); }
};

template <typename E, int VEC, bool SumZ, bool Extended>
__global__ void __launch_bounds__(kMaxThreads) softmax_split_stats_kernel(LossArgs a, int tpr, SplitRows sr,
                                                                          float* stats) {
  using B = typename E::bits;
  __shared__ float max_slots[kMaxWarps];
  __shared__ float sum_slots[2 * kMaxWarps];
  const Slot at = slot_of(tpr);
  const int c = static_cast<int>(a.num_classes);
  const int64_t plane = a.num_rows * sr.chunks;

  for (int64_t first = at.first; first < sr.rows * sr.chunks; first += at.stride) {
    const Unit u = unit_of(sr, sr.chunks, first + at.group, a.num_rows);
    const Row r = row_state(a, u.row);
    const B* x = static_cast<const B*>(a.logits) + (r.kind == kNoRow ? 0 : u.row) * a.row_stride;
    const Span s = split_row<VEC>(x, r.kind == kCompute ? c : 0);
    const Chunk k = chunk_of<VEC>(s, sr, u.chunk);
    const int target_v = s.vector_of(r.kind == kCompute ? r.y : -1, VEC);

    RunningSum run{-CUDART_INF_F, 0.f};
    float sz = 0.f;
    const int col0 = s.head + k.lo * VEC;
    for_each_vector<E, VEC, kLoopStep<Extended, VEC, kStreamStep<VEC>>>(x + col0, k.hi - k.lo, target_v - k.lo, at.tid, tpr, [&](int, const float (&z)[VEC]) {
      float cm = z[0];
#pragma unroll
      for (int j = 1; j < VEC; ++j) cm = fmaxf(cm, z[j]);
      run.raise_max(cm);
      const float shift = lse_shift(run.m);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if constexpr (SumZ) sz += z[j];
        run.s += exp_shifted(z[j], shift);
      }
    }, offset_at<Extended>(a), col0);
    const EdgeColumn e = edge_column<VEC>(s, target_v, at.tid);
    if (u.chunk == 0 && e.present) {
      const bool is_y = e.col == r.y;
      const float z = load_logit<E, Extended>(a, x, e.col) - (is_y ? margin_of<Extended>(a, r.y) : 0.f);
      if constexpr (SumZ) sz += z;
      if (!is_y) {
        run.raise_max(z);
        run.add(z);
      }
    }

    // The chunk's max, then every thread's sum rescaled to it once (as the unsplit kernels' pass 1).
    float mx[1] = {run.m};
    row_reduce<MaxOp>(mx, tpr, at.group, max_slots);
    float sums[2] = {run.s * exp_shifted(run.m, lse_shift(mx[0])), sz};
    row_reduce<SumOp>(sums, tpr, at.group, sum_slots);
    if (at.tid == 0 && r.kind == kCompute) {
      float* const at_part = stats + u.row * sr.chunks + u.chunk;
      at_part[0] = mx[0];
      at_part[plane] = sums[0];
      if constexpr (SumZ) at_part[2 * plane] = sums[1];
    }
  }
}

// The row's state (kernels.cuh SoftmaxRow) from its S statistics (part: the row's first, plane: the planes'
// stride) and z_y, combined as derived above. Every warp of a unit combines the row on its own (no barrier,
// no shared memory): lane l takes parts l, l + 32, ... (at most kPartsPerLane of them) in order, then a
// butterfly (block_reduce.cuh warp_reduce) combines the lanes; every warp of every unit of the row forms the
// same operations in the same order, so all agree to the bit. All 32 lanes must call it. The parts are read
// by an unrolled, predicated sequence rather than a loop: its loads are issued together, and the kernel's
// only loop over global memory stays the chunk's column loop (which the static audit reads as its tile loop).
template <bool SumZ>
__device__ __forceinline__ SoftmaxRow combined_row(const float* part, int64_t plane, int chunks, float z_y) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  float m[kPartsPerLane];  // a lane's maxima, kept for their rescaling; its sums are loaded after the max
  float mx[1] = {z_y};
#pragma unroll
  for (int k = 0; k < kPartsPerLane; ++k) {
    const int j = lane + 32 * k;
    m[k] = j < chunks ? part[j] : -CUDART_INF_F;
    mx[0] = fmaxf(mx[0], m[k]);
  }
  warp_reduce<MaxOp>(mx);
  const float shift = lse_shift(mx[0]);
  float sums[2] = {0.f, 0.f};
#pragma unroll
  for (int k = 0; k < kPartsPerLane; ++k) {
    const int j = lane + 32 * k;
    if (j < chunks) {
      sums[0] += part[plane + j] * exp_shifted(m[k], shift);
      if constexpr (SumZ) sums[1] += part[2 * plane + j];
    }
  }
  warp_reduce<SumOp>(sums);
  return {mx[0], sums[0], exp_shifted(z_y, shift), sums[1], z_y, 0.f};
}

// Launch 2, per unit: the row's state from its statistics (combined_row), the row's loss (chunk 0), and with
// Write the chunk's gradient (chunk 0 also its edge columns, the target's own gradient among them); without
// Write one unit per row (chunk 0), which writes the loss. L: SoftmaxCe<Smooth> or SoftmaxFocal (kernels.cuh;
// their loss and gradient constants, row_value and row_grad, are the unsplit kernels'). Extended: the logit
// offset and target margin, and element weights without label smoothing (they fold into the row's weight,
// target_weight); launch.cu splits no call with element weights and smoothing.
// Without Write a block holds kLossOnlyThreads threads (launch.cu), and the bound leaves the row's accurate
// per-row functions the registers they need (at the 64 of kMaxThreads, sm_80 spilled).
constexpr int kLossOnlyThreads = 128;

template <typename E, int VEC, typename L, bool Write, bool Extended>
__global__ void __launch_bounds__(Write ? kMaxThreads : kLossOnlyThreads) softmax_split_finish_kernel(LossArgs a, int tpr, SplitRows sr,
                                                                           const float* stats) {
  static_assert(!L::kTerms, "the smoothed focal loss is not split");
  using B = typename E::bits;
  const Slot at = slot_of(tpr);
  const int c = static_cast<int>(a.num_classes);
  const int64_t plane = a.num_rows * sr.chunks;
  const float eps = L::kSumZ ? a.label_smoothing : 0.f;
  const int units_per_row = Write ? sr.chunks : 1;

  for (int64_t first = at.first; first < sr.rows * units_per_row; first += at.stride) {
    const Unit u = unit_of(sr, units_per_row, first + at.group, a.num_rows);
    Row r = row_state(a, u.row);
    const TargetWeight tw = target_weight<Extended>(a, eps, r);
    const int64_t base = r.kind == kNoRow ? 0 : u.row;
    const B* x = static_cast<const B*>(a.logits) + base * a.row_stride;
    const bool writes_loss = u.chunk == 0 && at.tid == 0 && a.loss != nullptr;
    if (r.kind == kCompute) {
      const float z_y = load_logit<E, Extended>(a, x, r.y) - margin_of<Extended>(a, r.y);
      const SoftmaxRow t = combined_row<L::kSumZ>(stats + u.row * sr.chunks, plane, sr.chunks, z_y);
      FocalTarget ft{};
      if constexpr (L::kFocal) ft = focal_target(t, a.gamma, c);
      if (writes_loss) a.loss[u.row] = r.alpha * row_value<L>(t, z_y, ft, 0.f, eps, c, tw);
      if (!Write) continue;
      B* g = static_cast<B*>(a.grad) + base * a.num_classes;
      const SoftmaxGrad q = row_grad<L>(t, ft, SmoothRow{}, 0.f, r.coef, eps, c, tw);
      const float shift = lse_shift(t.m);
      const Span s = split_row<VEC>(x, c);
      const Chunk k = chunk_of<VEC>(s, sr, u.chunk);
      const int target_v = s.vector_of(r.y, VEC);
      const int col0 = s.head + k.lo * VEC;
      for_each_vector<E, VEC, kLoopStep<Extended, VEC, kStreamStep<VEC>>>(x + col0, k.hi - k.lo, target_v - k.lo, at.tid, tpr, [&](int col, const float (&z)[VEC]) {
        float out[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] = column_grad(z[j], shift, q, 1.f);
        store_word<E, VEC>(g + col0 + col, out);
      }, offset_at<Extended>(a), col0);
      const EdgeColumn e = edge_column<VEC>(s, target_v, at.tid);
      if (u.chunk == 0 && e.present)
        g[e.col] = E::store(e.col == r.y ? q.target : column_grad(load_logit<E, Extended>(a, x, e.col), shift, q, 1.f));
    } else if (r.kind != kNoRow) {
      if (writes_loss) a.loss[u.row] = row_loss(r, 0.f);
      if (!Write) continue;
      B* g = static_cast<B*>(a.grad) + base * a.num_classes;
      const Chunk k = chunk_of<VEC>(split_row<VEC>(x, c), sr, u.chunk);
      fill_columns<E>(g, k.col_lo, k.col_hi, r.kind == kIgnored ? 0.f : CUDART_NAN_F, at.tid, tpr);
    }
  }
}

}  // namespace cbkernels::cuda::device
