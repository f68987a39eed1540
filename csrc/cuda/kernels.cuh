// Device code of the CUDA backend: the sigmoid-family and softmax kernels of docs/op-contract.md.
// No torch header: launch.cu instantiates these on raw pointers, so nvcc compiles them anywhere.
//
// Every kernel walks rows with a bounded, persistent grid (row_io.cuh: Slot), a few blocks per SM, so the
// launch cost does not grow with N and a block's next row starts while the memory system is still busy
// with its last one. Memory and arithmetic overlap in two ways: the column loops load the next step's
// 16-byte vectors before they compute the current ones (row_io.cuh: for_each_vector), and a block asks L2
// for its next row before it reduces and writes the current one (row_io.cuh: prefetch_row_l2; those
// requests stay in flight across the row's barriers). Per row: one reduction for the sigmoid family's loss, two (max, then the
// sums) for the softmax; no barrier inside a column loop.
//
// The per-element loops treat every column as a non-target column; the target column is handled once per
// row by the thread that holds it (a branch on the vector index, not a select on every element).
// Arithmetic is fp32 whatever the storage type, each result is rounded once when stored, approximations
// as device_math.cuh decides them.
#pragma once

#include <math_constants.h>

#include <cstdint>

#include "block_reduce.cuh"
#include "common/gamma_case.h"
#include "common/loss_args.h"
#include "device_math.cuh"
#include "row_io.cuh"

namespace cbkernels::cuda {
namespace device {

// The cached softmax keeps up to this many elements of its row per thread in registers: a row of up to
// 64 * tpr columns is read from memory once. Holding them takes more than the 64 registers of the other
// kernels' bound, so it has its own: blocks of at most kCachedMaxThreads threads, kCachedMinBlocks of
// them resident per SM, i.e. at most 65536 / (128 * 3) = 170 (168 allocated) registers a thread; 128
// did not hold the row without spills. Rows of up to 64 * 128 = 8192 columns.
constexpr int kCachedElemsPerThread = 64;
constexpr int kCachedVecBytes = 16;
constexpr int kCachedMaxThreads = 128;
constexpr int kCachedMinBlocks = 3;

// Vectors per step of the streaming softmax's loops on a target architecture (arch: 800, 900, ...). One
// 8-element (16-bit) vector a step leaves a thread 16 bytes in flight, half of what the other kernels keep
// (row_io.cuh: kStep), too few for long bf16 rows. Two of them fit the 64 registers of the launch bound
// on sm_90, but not on sm_80, whose ptxas spills them (its pass 1 keeps a running max and the target test
// live per element): sm_80 keeps one.
constexpr int stream_step(int vec, int arch) { return vec == 8 && arch < 900 ? 1 : kStep; }

#ifdef __CUDA_ARCH__
template <int VEC>
constexpr int kStreamStep = stream_step(VEC, __CUDA_ARCH__);
#else
template <int VEC>
constexpr int kStreamStep = stream_step(VEC, 0);  // the host pass compiles no kernel body
#endif

// ---- sigmoid family (focal; gamma 0 is sigmoid cross entropy) -------------------------------------------

// One element (docs/math.md, section 5), with u = t z (t = +1 on the target column, else -1):
//   -log p = max(-u, 0) + log1p(e),  e = exp(-|u|);  p, q = 1 - p from e without cancellation:
//   u >= 0: p = 1/(1+e), q = e/(1+e); else swapped.
//   mod = (1-p)^gamma, term = mod * (-log p), dterm/du = mod * (gamma p log p - q), dterm/dz = t dterm/du.
// One exp and one reciprocal (device_math.cuh: sigmoid_parts), plus one exp for a general gamma; G is
// gamma's case (common/gamma_case.h): sqrt(q), q or q * q for gamma 0.5, 1, 2, no modulator for gamma 0.
// fmaxf(-u, 0) may drop a NaN u, but then e, l1pe and q are NaN and carry it to every output.
template <GammaCase G, bool Positive>
__device__ __forceinline__ void focal_element(float z, float gamma, float& term, float& dz) {
  const float u = Positive ? z : -z;
  const SigmoidParts s = sigmoid_parts(fabsf(u));
  const float nlogp = fmaxf(-u, 0.f) + s.l1pe;
  const float small = s.e * s.inv_1pe;  // e / (1 + e): the smaller of p and q
  const bool nonneg = u >= 0.f;
  const float q = nonneg ? small : s.inv_1pe;
  float ddu;
  if constexpr (G == GammaCase::kZero) {
    term = nlogp;
    ddu = -q;
  } else {
    const float p = nonneg ? s.inv_1pe : small;
    float mod, g;
    if constexpr (G == GammaCase::kHalf) {
      mod = sqrt_approx(q);
      g = 0.5f;
    } else if constexpr (G == GammaCase::kOne) {
      mod = q;
      g = 1.f;
    } else if constexpr (G == GammaCase::kTwo) {
      mod = q * q;
      g = 2.f;
    } else {
      // (1 - p)^gamma = q^gamma = exp(-gamma softplus(u)), softplus(u) = max(u, 0) + log1p(e) = -log q
      mod = ex2_approx(-(gamma * kLog2e) * (fmaxf(u, 0.f) + s.l1pe));
      g = gamma;
    }
    term = mod * nlogp;
    ddu = mod * (-g * p * nlogp - q);
  }
  dz = Positive ? ddu : -ddu;
}

// One column of a row that may be the target (the edge step): the negative form at -z is the positive form
// at z (u = t z either way), and its slope is d/d(-z) = -d/dz. Selects, not a branch: the edge step's
// lanes of a warp take both kinds.
template <GammaCase G>
__device__ __forceinline__ void focal_at(float z, bool target, float gamma, float& term, float& dz) {
  focal_element<G, false>(target ? -z : z, gamma, term, dz);
  dz = target ? -dz : dz;
}

// Loss (when a.loss) and gradient (Write: coef * dloss/dz into a.grad) of each row, in one read. The body
// loop skips the vector holding the target column, so it computes every element as a non-target column;
// the row's edge step (head, tail, that vector: row_io.cuh edge_column) takes one column per thread.
template <typename E, int VEC, GammaCase G, bool Write>
__global__ void __launch_bounds__(kMaxThreads) sigmoid_focal_kernel(LossArgs a, int tpr) {
  using B = typename E::bits;
  __shared__ float slots[2][kMaxWarps];  // alternate rows: one reduction per row (block_reduce.cuh)
  const Slot at = slot_of(tpr);
  const int c = static_cast<int>(a.num_classes);
  const float gamma = a.gamma;

  int parity = 0;
  for (int64_t first = at.first; first < a.num_rows; first += at.stride, parity ^= 1) {
    const int64_t row = first + at.group;
    const Row r = row_state(a, row);
    const int64_t base = r.kind == kNoRow ? 0 : row;
    const B* x = static_cast<const B*>(a.logits) + base * a.row_stride;
    B* g = Write ? static_cast<B*>(a.grad) + base * a.num_classes : nullptr;

    float acc = 0.f;
    if (r.kind == kCompute) {
      const Span s = split_row<VEC>(x, c);
      const int target_v = s.vector_of(r.y, VEC);
      B* const g_body = Write ? g + s.head : nullptr;
      for_each_vector<E, VEC>(x + s.head, s.nvec, target_v, at.tid, tpr, [&](int col, const float (&z)[VEC]) {
        float out[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          float term, dz;
          focal_element<G, false>(z[j], gamma, term, dz);
          acc += term;
          out[j] = r.coef * dz;
        }
        if (Write) store_word<E, VEC>(g_body + col, out);
      });
      const EdgeColumn e = edge_column<VEC>(s, target_v, at.tid);
      if (e.present) {
        float term, dz;
        focal_at<G>(E::load(x[e.col]), e.col == r.y, gamma, term, dz);
        acc += term;
        if (Write) g[e.col] = E::store(r.coef * dz);
      }
    }
    if (a.loss != nullptr) {
      float total[1] = {acc};
      row_reduce<SumOp>(total, tpr, at.group, slots[parity]);
      if (at.tid == 0 && r.kind != kNoRow) a.loss[row] = row_loss(r, r.alpha * total[0]);
    }
    if (Write && (r.kind == kIgnored || r.kind == kBadTarget))
      fill_row<E>(g, c, r.kind == kIgnored ? 0.f : CUDART_NAN_F, at.tid, tpr);
  }
}

// ---- softmax cross entropy with label smoothing eps ------------------------------------------------------
// With m = max z, sr = sum over c != y of exp(z_c - m), e_y = exp(z_y - m), s = sr + e_y, lse = m + log s
// (docs/math.md, sections 6-7):
//   loss = alpha (lse - (1 - eps) z_y - eps/C sum z) = alpha ((lse - z_y) + eps (z_y - mean z))
//   grad = coef (exp(z - m) / s - (1 - eps)[c == y] - eps/C), and at c = y: coef (eps - eps/C - sr / s)
// 1 - p_y = sr / s keeps its relative precision when p_y -> 1, where s - e_y would cancel: every thread
// sums only the non-target columns (sr), and the one thread holding z_y adds e_y in a sum of its own.
// lse - z_y = log(s) - d = log1p(sr exp(-d)) with d = z_y - m <= 0: a confident row's s = 1 + sr rounds
// to 1 in float and log(s) - d to 0, where log1p keeps sr. Below d = -16 (p_y < 1.2e-7, a loss above 16)
// the plain form is exact enough and exp(-d) could overflow. The eps term is skipped when eps == 0
// (eps * sum z would be 0 * inf = NaN for an infinite logit the reference never multiplies).
//
// Per element: exp(z - m) as ex2.approx((z - m) log2 e) (device_math.cuh), the subtraction kept apart
// from the multiplication: folding log2 e into one FMA, z log2e - m log2e, would add |m| u to every
// exp's relative error (0.6e-3 at |m| = 1e4), where z - m is exact near the max (Sterbenz) and costs one
// FADD of a budget the softmax is far from. exp once per element: the cached kernel keeps it in the
// registers that held z and forms the gradient from it.

// Shift for exp(z - shift): the row max, or 0 while it is -inf (exp(-inf - -inf) would be NaN; with
// shift 0 the -inf elements contribute exp(-inf) = 0).
__device__ __forceinline__ float lse_shift(float m) { return m == -CUDART_INF_F ? 0.f : m; }

__device__ __forceinline__ float exp_shifted(float z, float shift) { return ex2_approx((z - shift) * kLog2e); }

// The reduced state of a row: max, the three sums, and the per-row constants of the gradient.
struct SoftmaxRow {
  float m, sr, ey, sz;  // max; sum of exp(z - shift) off the target; exp(z_y - shift); sum of z
};

// Per row, accurate functions (once per row, their cost does not matter).
__device__ __forceinline__ float softmax_row_loss(const SoftmaxRow& t, float z_y, float eps, int c) {
  const float d = z_y - t.m;
  float v = d > -16.f ? log1pf(t.sr * expf(-d)) : logf(t.sr + t.ey) - d;
  if (eps != 0.f) v += eps * (z_y - t.sz / static_cast<float>(c));
  return v;
}

// The gradient of a row: coef (p_c - off) = fma(e_c, coef / s, -coef off) off the target, and at the
// target coef ((eps - off) - sr / s), formed without the cancellation of p_y - 1.
struct SoftmaxGrad {
  float scale, offset, target;
};

__device__ __forceinline__ SoftmaxGrad softmax_grad(const SoftmaxRow& t, float coef, float eps, int c) {
  const float inv_s = 1.f / (t.sr + t.ey);
  const float off = eps / static_cast<float>(c);
  return {coef * inv_s, -coef * off, coef * ((eps - off) - t.sr * inv_s)};
}

// Thread `at` of a row whose target sits in its share: which share. The row split (row_io.cuh) gives
// thread tid the head element tid, body vectors tid, tid + tpr, ..., and the tail element tid.
struct TargetPlace {
  bool mine;    // this thread holds column y
  bool head;    // ... as its head element
  bool tail;    // ... as its tail element
  int k, j;     // ... else as element j of its k-th body vector (k counted from this thread's first)
};

__device__ __forceinline__ TargetPlace target_place(const Span& s, int y, int vec, int tid, int tpr) {
  TargetPlace p{false, false, false, 0, 0};
  if (y < 0) return p;
  if (y < s.head) {
    p.head = p.mine = y == tid;
  } else if (y >= s.tail_start) {
    p.tail = p.mine = y - s.tail_start == tid;
  } else {
    const int v = (y - s.head) / vec;
    p.mine = v % tpr == tid;
    p.k = v / tpr;
    p.j = (y - s.head) - v * vec;
  }
  return p;
}

// Rows of any length: pass 1 reads the row into a per-thread online (max, sum), pass 2 (Write) reads it
// again to write the gradient (the launcher bounds the grid so that the rows in flight fit in L2 when
// it can, where the second read is served).
template <typename E, int VEC, bool Write>
__global__ void __launch_bounds__(kMaxThreads) softmax_stream_kernel(LossArgs a, int tpr) {
  using B = typename E::bits;
  __shared__ float max_slots[kMaxWarps];
  __shared__ float sum_slots[3 * kMaxWarps];
  const Slot at = slot_of(tpr);
  const int c = static_cast<int>(a.num_classes);
  const float eps = a.label_smoothing;

  for (int64_t first = at.first; first < a.num_rows; first += at.stride) {
    const int64_t row = first + at.group;
    const Row r = row_state(a, row);
    const int64_t base = r.kind == kNoRow ? 0 : row;
    const B* x = static_cast<const B*>(a.logits) + base * a.row_stride;
    const Span s = split_row<VEC>(x, r.kind == kCompute ? c : 0);
    const TargetPlace ty = target_place(s, r.y, VEC, at.tid, tpr);
    const int target_col = s.vector_of(r.y, VEC) * VEC;  // the target's vector (< 0: not in the body)

    // Pass 1. The running max m moves rarely: when a vector raises it, sr is rescaled once.
    float m = -CUDART_INF_F, sr = 0.f, sz = 0.f, z_y = -CUDART_INF_F;
    auto add = [&](float z, bool target) {
      sz += z;
      if (target) {
        z_y = z;
      } else {
        sr += exp_shifted(z, lse_shift(m));
      }
    };
    auto raise_max = [&](float cm) {
      if (cm > m) {
        sr *= exp_shifted(m, cm);  // m = -inf: sr is still 0, and 0 * exp(-inf) = 0
        m = cm;
      }
    };
    auto scalar = [&](int col) {
      const float z = E::load(x[col]);
      raise_max(z);
      add(z, col == r.y);
    };
    if (at.tid < s.head) scalar(at.tid);
    if (at.tid < s.len - s.tail_start) scalar(s.tail_start + at.tid);
    for_each_vector<E, VEC, kStreamStep<VEC>>(x + s.head, s.nvec, -1, at.tid, tpr, [&](int col, const float (&z)[VEC]) {
      float cm = z[0];
#pragma unroll
      for (int j = 1; j < VEC; ++j) cm = fmaxf(cm, z[j]);
      raise_max(cm);
      if (col != target_col) {
        const float shift = lse_shift(m);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          sz += z[j];
          sr += exp_shifted(z[j], shift);
        }
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) add(z[j], s.head + col + j == r.y);
      }
    });

    // Max first, then every thread rescales its own sum to the row max once: one exp per thread.
    float mx[1] = {m};
    row_reduce<MaxOp>(mx, tpr, at.group, max_slots);
    const float shift = lse_shift(mx[0]);
    float sums[3] = {sr * exp_shifted(m, shift), ty.mine ? exp_shifted(z_y, shift) : 0.f, sz};
    // (sr * exp(m - shift): a thread without columns has m = -inf and sr = 0: 0 * 0.)
    row_reduce<SumOp>(sums, tpr, at.group, sum_slots);
    const SoftmaxRow t{mx[0], sums[0], sums[1], sums[2]};

    if (ty.mine && a.loss != nullptr) a.loss[row] = r.alpha * softmax_row_loss(t, z_y, eps, c);
    if (r.kind != kCompute && r.kind != kNoRow && at.tid == 0 && a.loss != nullptr) a.loss[row] = row_loss(r, 0.f);
    if (!Write) continue;
    B* g = static_cast<B*>(a.grad) + base * a.num_classes;
    if (r.kind == kCompute) {
      const SoftmaxGrad q = softmax_grad(t, r.coef, eps, c);
      auto grad_at = [&](float z) { return fmaf(exp_shifted(z, shift), q.scale, q.offset); };
      if (at.tid < s.head) g[at.tid] = E::store(grad_at(E::load(x[at.tid])));
      if (at.tid < s.len - s.tail_start) {
        const int col = s.tail_start + at.tid;
        g[col] = E::store(grad_at(E::load(x[col])));
      }
      for_each_vector<E, VEC, kStreamStep<VEC>>(x + s.head, s.nvec, -1, at.tid, tpr, [&](int col, const float (&z)[VEC]) {
        float out[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] = grad_at(z[j]);
        store_word<E, VEC>(g + s.head + col, out);
      });
      // The target column, over the value the loop wrote there (same thread, so in program order).
      if (ty.mine) g[r.y] = E::store(q.target);
    } else if (r.kind != kNoRow) {
      fill_row<E>(g, c, r.kind == kIgnored ? 0.f : CUDART_NAN_F, at.tid, tpr);
    }
  }
}

template <typename E>
__device__ __forceinline__ const typename E::bits* logits_row(const LossArgs& a, int64_t row) {
  return static_cast<const typename E::bits*>(a.logits) + (row < a.num_rows ? row : 0) * a.row_stride;
}

// Rows of at most kCachedElemsPerThread * tpr columns, gradient always written: each row is read once,
// into registers (the next row is already on its way to L2, prefetch_row_l2); the max, then exp once per
// element (kept in the same registers), the sums, and the gradient from the registers. Only for 16-byte
// vectors. Smooth: label smoothing eps != 0, the only case that needs the sum of z.
//
// The target column without a per-element test: the body vectors are loaded except the one holding the
// target (and past the body's end), whose slots hold -inf (they leave the max alone and add exp(-inf) = 0
// to the sums); that vector, the head and the tail go to the edge step (row_io.cuh: edge_column), one
// column per thread, which alone tells the target from the rest. So sr, the sum off the target, is formed
// by adding, never by subtracting e_y (see above for why).
template <typename E, int VEC, bool Smooth>
__global__ void __launch_bounds__(kCachedMaxThreads, kCachedMinBlocks) softmax_cached_kernel(LossArgs a, int tpr) {
  static_assert(VEC * sizeof(typename E::bits) == kCachedVecBytes, "the cached softmax uses 16-byte vectors");
  constexpr int KV = kCachedElemsPerThread / VEC;
  using B = typename E::bits;
  __shared__ float max_slots[kMaxWarps];
  __shared__ float sum_slots[3 * kMaxWarps];
  const Slot at = slot_of(tpr);
  const int c = static_cast<int>(a.num_classes);
  const float eps = a.label_smoothing;
  if (at.first >= a.num_rows) return;  // block-uniform

  RowInputs next = row_inputs(a, at.first + at.group);
  for (int64_t first = at.first; first < a.num_rows; first += at.stride) {
    const int64_t row = first + at.group;
    const RowInputs in = next;
    // The next row: its target and upstream gradient into registers, its logits into L2. Every existing
    // row's logits are fetched whatever its target (classifying it first would wait for the target).
    if (first + at.stride < a.num_rows) {
      next = row_inputs(a, row + at.stride);
      if (row + at.stride < a.num_rows)
        prefetch_row_l2(logits_row<E>(a, row + at.stride), a.num_classes * static_cast<int64_t>(sizeof(B)), at.tid, tpr);
    }
    const Row r = row_of(a, row, in);
    const B* x = logits_row<E>(a, row);
    const Span s = split_row<VEC>(x, row < a.num_rows ? c : 0);
    const int target_v = s.vector_of(r.kind == kCompute ? r.y : -1, VEC);
    const EdgeColumn e = edge_column<VEC>(s, target_v, at.tid);
    const bool is_y = e.present && e.col == r.y;
    // All of this thread's loads of the row before any use.
    const float ze = e.present ? E::load(x[e.col]) : -CUDART_INF_F;
    float z[KV][VEC];
#pragma unroll
    for (int k = 0; k < KV; ++k) {
      const int v = at.tid + k * tpr;
      if (v < s.nvec && v != target_v) {
        unpack(load_word<E, VEC>(x + s.head + v * VEC), z[k]);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) z[k][j] = -CUDART_INF_F;
      }
    }
    float m = ze;
#pragma unroll
    for (int k = 0; k < KV; ++k)
#pragma unroll
      for (int j = 0; j < VEC; ++j) m = fmaxf(m, z[k][j]);
    float sz = 0.f;
    if constexpr (Smooth) {
      sz = e.present ? ze : 0.f;
#pragma unroll
      for (int k = 0; k < KV; ++k) {
        float part = 0.f;
#pragma unroll
        for (int j = 0; j < VEC; ++j) part += z[k][j];
        const int v = at.tid + k * tpr;
        sz += v < s.nvec && v != target_v ? part : 0.f;  // a left-out vector's -inf is no logit
      }
    }

    float mx[1] = {m};
    row_reduce<MaxOp>(mx, tpr, at.group, max_slots);
    const float shift = lse_shift(mx[0]);
    // exp once per element, kept where z was: the sum and the gradient below both use it.
    const float ee = exp_shifted(ze, shift);
    float sr = is_y ? 0.f : ee;
#pragma unroll
    for (int k = 0; k < KV; ++k)
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        z[k][j] = exp_shifted(z[k][j], shift);
        sr += z[k][j];
      }
    float sums[3] = {sr, is_y ? ee : 0.f, sz};
    row_reduce<SumOp>(sums, tpr, at.group, sum_slots);
    const SoftmaxRow t{mx[0], sums[0], sums[1], sums[2]};

    // The gradient first, then the loss: the row's registers are free before the loss's log and exp.
    B* g = static_cast<B*>(a.grad) + (r.kind == kNoRow ? 0 : row) * a.num_classes;
    if (r.kind == kCompute) {
      const SoftmaxGrad q = softmax_grad(t, r.coef, Smooth ? eps : 0.f, c);
#pragma unroll
      for (int k = 0; k < KV; ++k) {
        const int v = at.tid + k * tpr;
        if (v < s.nvec && v != target_v) {
          float out[VEC];
#pragma unroll
          for (int j = 0; j < VEC; ++j) out[j] = fmaf(z[k][j], q.scale, q.offset);
          store_word<E, VEC>(g + s.head + v * VEC, out);
        }
      }
      if (e.present) g[e.col] = E::store(is_y ? q.target : fmaf(ee, q.scale, q.offset));
    } else if (r.kind != kNoRow) {
      fill_row<E>(g, c, r.kind == kIgnored ? 0.f : CUDART_NAN_F, at.tid, tpr);
    }
    if (a.loss != nullptr) {
      if (is_y) a.loss[row] = r.alpha * softmax_row_loss(t, ze, Smooth ? eps : 0.f, c);
      if (r.kind != kCompute && r.kind != kNoRow && at.tid == 0) a.loss[row] = row_loss(r, 0.f);
    }
  }
}

}  // namespace device
}  // namespace cbkernels::cuda
