// Device code of the CUDA backend: the sigmoid-family and softmax kernels of docs/op-contract.md.
// No torch header: launch.cu instantiates these on raw pointers, so nvcc compiles them anywhere.
//
// Layout. A block runs rows_per_block rows; each row has tpr = blockDim.x / rows_per_block threads (a
// multiple of 32, so a warp never straddles two rows) that stride over the row's columns. Any C works:
// the threads loop over the row, and a row is split into
//   head: the first elements up to the first VEC-element (vector-aligned) boundary, one per thread,
//   body: aligned vectors of VEC elements (16-byte loads and stores by default),
//   tail: the last < VEC elements, one per thread.
// Each row finds its own head from its address, because a row of C = 8142 bf16 (16284 bytes) starts at
// a different offset modulo 16 than the row before it. The gradient row is written with the logits row's
// split, which is right only when both rows have the same address modulo the vector size: the launcher
// (launch.cu) checks that once per call and otherwise picks a narrower vector.
//
// Every thread of a block reaches every barrier: rows that are ignored, have a bad target or lie past
// the last row take part in the reductions with no columns, and only then write their constant rows.
//
// Arithmetic is fp32 whatever the storage type, each result is rounded once when stored, and indices into
// the (n, c) arrays are int64 (n * c exceeds 2^31 on large problems).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

#include <cstdint>
#include <type_traits>

#include "common/gamma_case.h"
#include "common/loss_args.h"

namespace cbkernels::cuda {
namespace device {

constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / 32;
// The cached softmax keeps this many elements of its row per thread in registers: a row of up to
// 16 * tpr columns is read from memory once.
constexpr int kCachedElemsPerThread = 16;

// ---- storage types: what the arrays hold (bits) and the conversions to and from fp32 -------------------
// Half types travel as their 16-bit patterns so that vector unions stay trivial types.
struct F32 {
  using bits = float;
  static __device__ __forceinline__ float load(bits b) { return b; }
  static __device__ __forceinline__ bits store(float v) { return v; }
};
struct F16 {
  using bits = unsigned short;
  static __device__ __forceinline__ float load(bits b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ bits store(float v) { return __half_as_ushort(__float2half_rn(v)); }
};
struct BF16 {
  using bits = unsigned short;
  static __device__ __forceinline__ float load(bits b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
  static __device__ __forceinline__ bits store(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};

template <int Bytes> struct RawWord;
template <> struct RawWord<16> { using type = uint4; };
template <> struct RawWord<8> { using type = uint2; };
template <> struct RawWord<4> { using type = unsigned int; };
template <> struct RawWord<2> { using type = unsigned short; };

// VEC elements moved as one machine word (ld/st.global.v4.u32 for 16 bytes).
template <typename E, int VEC>
union Pack {
  typename RawWord<VEC * sizeof(typename E::bits)>::type raw;
  typename E::bits v[VEC];
};

template <typename E, int VEC>
__device__ __forceinline__ void load_vec(const typename E::bits* p, float (&z)[VEC]) {
  using Raw = typename RawWord<VEC * sizeof(typename E::bits)>::type;
  Pack<E, VEC> pack;
  pack.raw = *reinterpret_cast<const Raw*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) z[j] = E::load(pack.v[j]);
}

template <typename E, int VEC>
__device__ __forceinline__ void store_vec(typename E::bits* p, const float (&g)[VEC]) {
  using Raw = typename RawWord<VEC * sizeof(typename E::bits)>::type;
  Pack<E, VEC> pack;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pack.v[j] = E::store(g[j]);
  *reinterpret_cast<Raw*>(p) = pack.raw;
}

// ---- the row split: head | aligned body | tail ---------------------------------------------------------
struct Span {
  int64_t head;        // elements before the first aligned vector (< VEC)
  int64_t nvec;        // aligned vectors
  int64_t tail_start;  // first element after the body; tail = [tail_start, len), < VEC elements
  int64_t len;         // columns processed (0 for rows that compute nothing)
};

template <int VEC, typename Bits>
__device__ __forceinline__ Span split_row(const Bits* x, int64_t len) {
  Span s;
  s.len = len;
  if (VEC == 1) {
    s.head = 0;
    s.nvec = len;
    s.tail_start = len;
    return s;
  }
  // Tensors are element-aligned, so the misalignment is a whole number of elements.
  constexpr uintptr_t kBytes = VEC * sizeof(Bits);
  const uintptr_t past = reinterpret_cast<uintptr_t>(x) % kBytes;
  const int64_t head = past == 0 ? 0 : static_cast<int64_t>((kBytes - past) / sizeof(Bits));
  s.head = head < len ? head : len;
  s.nvec = (len - s.head) / VEC;
  s.tail_start = s.head + s.nvec * VEC;
  return s;
}

// Calls f(col, z, out) on every chunk of the row: z holds the fp32 values of columns col .. col+K-1
// (K = VEC for body vectors, 1 for head and tail elements); with Write, out is stored to g at the same
// columns, rounded once. f is a generic lambda: it is instantiated for K = 1 and K = VEC.
template <typename E, int VEC, bool Write, typename F>
__device__ __forceinline__ void visit_row(const typename E::bits* x, typename E::bits* g, const Span& s, int tid,
                                          int tpr, F& f) {
  // At most VEC - 1 <= 7 head and tail elements: one per thread, tpr >= 32.
  if (tid < s.head) {
    const float z[1] = {E::load(x[tid])};
    float out[1];
    f(static_cast<int64_t>(tid), z, out);
    if (Write) g[tid] = E::store(out[0]);
  }
  auto body = [&](int64_t v) {
    const int64_t col = s.head + v * VEC;
    float z[VEC];
    load_vec<E, VEC>(x + col, z);
    float out[VEC];
    f(col, z, out);
    if (Write) store_vec<E, VEC>(g + col, out);
  };
  if constexpr (VEC == 1) {
    // The one-element fallback (rows that cannot share a vector alignment): unrolling it only buys
    // register spills under the 64-register cap of 1024-thread blocks.
#pragma unroll 1
    for (int64_t v = tid; v < s.nvec; v += tpr) body(v);
  } else {
    for (int64_t v = tid; v < s.nvec; v += tpr) body(v);
  }
  if (tid < s.len - s.tail_start) {
    const int64_t col = s.tail_start + tid;
    const float z[1] = {E::load(x[col])};
    float out[1];
    f(col, z, out);
    if (Write) g[col] = E::store(out[0]);
  }
}

// Number of elements of the array a generic lambda's parameter refers to (a type trait, so usable
// in device code without --expt-relaxed-constexpr).
template <typename Array>
struct ExtentOf : std::integral_constant<int, static_cast<int>(std::extent<std::remove_cv_t<std::remove_reference_t<Array>>>::value)> {};

// ---- the row's target, weight and fate --------------------------------------------------------------------
enum RowKind : int { kCompute = 0, kIgnored = 1, kBadTarget = 2, kNoRow = 3 };

struct Row {
  int kind;
  int64_t y;
  float alpha;  // class_weight[y] (1 without weights)
  float coef;   // alpha * upstream grad of the row (1 in forward): the gradient's row factor
};

__device__ __forceinline__ Row row_state(const LossArgs& a, int64_t row) {
  Row r{kNoRow, 0, 0.f, 0.f};
  if (row >= a.num_rows) return r;
  const int64_t y = a.target_is_int64 ? static_cast<const int64_t*>(a.target)[row]
                                      : static_cast<int64_t>(static_cast<const int32_t*>(a.target)[row]);
  if (y == a.ignore_index) {
    r.kind = kIgnored;
    return r;
  }
  if (y < 0 || y >= a.num_classes) {  // never used as an index: NaN row (functional.py also asserts on the device)
    r.kind = kBadTarget;
    return r;
  }
  r.kind = kCompute;
  r.y = y;
  r.alpha = a.class_weight != nullptr ? a.class_weight[y] : 1.f;
  r.coef = r.alpha * (a.grad_loss != nullptr ? a.grad_loss[row] : 1.f);
  return r;
}

// The loss written for a row that computed `value` (alpha_y already applied); 0 ignored, NaN bad target.
__device__ __forceinline__ float row_loss(const Row& r, float value) {
  return r.kind == kCompute ? value : (r.kind == kIgnored ? 0.f : CUDART_NAN_F);
}

// Gradient rows of ignored (0) and bad-target (NaN) rows.
template <typename E>
__device__ __forceinline__ void fill_row(typename E::bits* g, int64_t c, float value, int tid, int tpr) {
  const typename E::bits b = E::store(value);
  for (int64_t col = tid; col < c; col += tpr) g[col] = b;
}

// ---- reductions over a row's threads -----------------------------------------------------------------
// Warp shuffles, then (tpr > 32) one shared-memory slot per warp; every thread of the row then sums its
// row's warp slots in the same order, so all of them hold the same value. Called by every thread of
// the block (tpr is uniform over the block, so the branch on it is too).

__device__ __forceinline__ float group_sum(float v, int tpr, int group) {
  __shared__ float partial[kMaxWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (tpr == 32) return v;
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  const int warps = tpr >> 5, first = group * warps;
  float r = partial[first];
  for (int i = 1; i < warps; ++i) r += partial[first + i];
  __syncthreads();  // the slots are free again for the next reduction
  return r;
}

// max that keeps NaN from either side (fmaxf(NaN, x) == x would hide a NaN logit).
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || isnan(a)) ? a : b; }

// Shift for exp(z - shift): the running max, or 0 while it is -inf (exp(-inf - -inf) would be NaN; with
// shift 0 the -inf elements contribute exp(-inf) = 0).
__device__ __forceinline__ float lse_shift(float m) { return m == -CUDART_INF_F ? 0.f : m; }

// Online log-sum-exp state of a set of logits: m = max, s = sum exp(z - lse_shift(m)), sr = the same sum
// over the columns other than the row's target (docs/math.md, section 7: 1 - p_y = sr / s keeps its
// relative precision when p_y -> 1, where s - exp(z_y - m) would cancel), sz = sum z.
struct Lse {
  float m, s, sr, sz;
};

__device__ __forceinline__ Lse lse_merge(const Lse& a, const Lse& b) {
  const float m = nan_max(a.m, b.m);
  const float shift = lse_shift(m);
  const float ra = expf(a.m - shift), rb = expf(b.m - shift);
  return {m, a.s * ra + b.s * rb, a.sr * ra + b.sr * rb, a.sz + b.sz};
}

__device__ __forceinline__ Lse group_lse(Lse v, int tpr, int group) {
  __shared__ float pm[kMaxWarps], ps[kMaxWarps], psr[kMaxWarps], pz[kMaxWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Lse o{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset),
                __shfl_xor_sync(0xffffffffu, v.sr, offset), __shfl_xor_sync(0xffffffffu, v.sz, offset)};
    v = lse_merge(v, o);
  }
  if (tpr == 32) return v;
  if ((threadIdx.x & 31) == 0) {
    const int w = threadIdx.x >> 5;
    pm[w] = v.m;
    ps[w] = v.s;
    psr[w] = v.sr;
    pz[w] = v.sz;
  }
  __syncthreads();
  const int warps = tpr >> 5, first = group * warps;
  Lse r{pm[first], ps[first], psr[first], pz[first]};
  for (int i = 1; i < warps; ++i) r = lse_merge(r, Lse{pm[first + i], ps[first + i], psr[first + i], pz[first + i]});
  __syncthreads();
  return r;
}

// ---- where a thread sits ------------------------------------------------------------------------------
struct Place {
  int group;    // row slot within the block
  int tid;      // thread within the row, 0 .. tpr-1
  int64_t row;  // global row index
};

__device__ __forceinline__ Place place(int tpr) {
  Place p;
  p.group = static_cast<int>(threadIdx.x) / tpr;
  p.tid = static_cast<int>(threadIdx.x) - p.group * tpr;
  p.row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / tpr) + p.group;
  return p;
}

// A thread's view of its row: where it sits, the row's state, its logits row x, its gradient row g
// (nullptr without Write) and the split of the columns it computes. A thread past the last row points at
// row 0 with an empty split: it computes nothing but still reaches the block's barriers.
template <typename E, int VEC, bool Write>
struct ThreadRow {
  Place at;
  Row r;
  const typename E::bits* x;
  typename E::bits* g;
  Span span;
};

template <typename E, int VEC, bool Write>
__device__ __forceinline__ ThreadRow<E, VEC, Write> thread_row(const LossArgs& a, int tpr) {
  using B = typename E::bits;
  ThreadRow<E, VEC, Write> t;
  t.at = place(tpr);
  t.r = row_state(a, t.at.row);
  const int64_t row = t.r.kind == kNoRow ? 0 : t.at.row;
  t.x = static_cast<const B*>(a.logits) + row * a.row_stride;
  t.g = Write ? static_cast<B*>(a.grad) + row * a.num_classes : nullptr;
  t.span = split_row<VEC>(t.x, t.r.kind == kCompute ? a.num_classes : 0);
  return t;
}

// ---- sigmoid family (focal; gamma 0 is sigmoid cross entropy) -------------------------------------------

// One element (docs/math.md, section 5): t = +1 on the target column, else -1; u = t z; e = exp(-|u|).
//   -log p = max(-u, 0) + log1p(e),  log(1-p) = -(max(u, 0) + log1p(e))
//   p, q = 1 - p from e without cancellation: u >= 0: p = 1/(1+e), q = e/(1+e); else swapped
//   mod = (1-p)^gamma, term = mod * (-log p), dterm/du = mod * (gamma p log p - q), dterm/dz = t dterm/du
// One exp, one log1p and one reciprocal per element (plus one exp for a general gamma). G is gamma's case
// (common/gamma_case.h): the modulator sqrt(q), q or q * q for gamma 0.5, 1, 2, none for gamma 0.
// max(+-u, 0) are selects, not fmaxf, so that no NaN is dropped (a NaN u reaches every output via e).
template <GammaCase G>
__device__ __forceinline__ void focal_element(float z, bool positive, float gamma, float& term, float& dz) {
  const float u = positive ? z : -z;
  const float e = expf(-fabsf(u));
  const float l1pe = log1pf(e);
  const float nlogp = (u < 0.f ? -u : 0.f) + l1pe;
  const float r = 1.f / (1.f + e);
  const bool nonneg = u >= 0.f;
  const float p = nonneg ? r : e * r;
  const float q = nonneg ? e * r : r;
  float ddu;
  if (G == GammaCase::kZero) {
    term = nlogp;
    ddu = -q;
  } else {
    float mod, g;
    if (G == GammaCase::kHalf) {
      mod = sqrtf(q);
      g = 0.5f;
    } else if (G == GammaCase::kOne) {
      mod = q;
      g = 1.f;
    } else if (G == GammaCase::kTwo) {
      mod = q * q;
      g = 2.f;
    } else {
      mod = expf(-gamma * ((u > 0.f ? u : 0.f) + l1pe));
      g = gamma;
    }
    term = mod * nlogp;
    ddu = mod * (-g * p * nlogp - q);
  }
  dz = positive ? ddu : -ddu;
}

// Loss (when a.loss) and gradient (Write: coef * dloss/dz into a.grad) of each row, in one read.
template <typename E, int VEC, GammaCase G, bool Write>
__global__ void __launch_bounds__(kMaxThreads) sigmoid_focal_kernel(LossArgs a, int tpr) {
  const ThreadRow<E, VEC, Write> row = thread_row<E, VEC, Write>(a, tpr);
  const float gamma = a.gamma;

  float acc = 0.f;
  auto element = [&](int64_t col, const auto& z, auto& out) {
    constexpr int K = ExtentOf<decltype(z)>::value;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      float term, dz;
      focal_element<G>(z[j], col + j == row.r.y, gamma, term, dz);
      acc += term;
      out[j] = row.r.coef * dz;
    }
  };
  visit_row<E, VEC, Write>(row.x, row.g, row.span, row.at.tid, tpr, element);

  if (a.loss != nullptr) {
    const float total = group_sum(acc, tpr, row.at.group);
    if (row.at.tid == 0 && row.r.kind != kNoRow) a.loss[row.at.row] = row_loss(row.r, row.r.alpha * total);
  }
  if (Write && (row.r.kind == kIgnored || row.r.kind == kBadTarget))
    fill_row<E>(row.g, a.num_classes, row.r.kind == kIgnored ? 0.f : CUDART_NAN_F, row.at.tid, tpr);
}

// ---- softmax cross entropy with label smoothing eps ------------------------------------------------------
// With m = max z, s = sum exp(z - m) = sr + exp(z_y - m), lse = m + log s (docs/math.md, sections 6-7):
//   loss = alpha (lse - (1 - eps) z_y - eps/C sum z) = alpha ((lse - z_y) + eps (z_y - mean z))
//   grad = coef (exp(z - m) / s - (1 - eps)[c == y] - eps/C), and at c = y: coef (eps - eps/C - sr / s)
// lse - z_y = log(s) - d = log1p(sr exp(-d)) with d = z_y - m <= 0: a confident row's s = 1 + sr rounds to
// 1 in float and log(s) - d to 0, where log1p keeps sr. Below d = -16 (p_y < 1.2e-7, a loss above 16) the
// plain form is exact enough and exp(-d) could overflow. exp(z - m) / s avoids rounding lse (|m| ulp)
// inside the exponent. The eps term is skipped when eps == 0 (eps * sum z would be 0 * inf = NaN for an
// infinite logit the reference never multiplies).
__device__ __forceinline__ float softmax_row_loss(const Lse& t, float z_y, float eps, int64_t c) {
  const float d = z_y - t.m;
  float v = d > -16.f ? log1pf(t.sr * expf(-d)) : logf(t.s) - d;
  if (eps != 0.f) v += eps * (z_y - t.sz / static_cast<float>(c));
  return v;
}

// Thread 0 of each row writes the row's loss from the row's reduced state.
template <typename E, int VEC, bool Write>
__device__ __forceinline__ void write_softmax_loss(const LossArgs& a, const ThreadRow<E, VEC, Write>& row,
                                                   const Lse& t) {
  if (a.loss != nullptr && row.at.tid == 0 && row.r.kind != kNoRow) {
    const float z_y = row.r.kind == kCompute ? E::load(row.x[row.r.y]) : 0.f;
    a.loss[row.at.row] = row_loss(row.r, row.r.alpha * softmax_row_loss(t, z_y, a.label_smoothing, a.num_classes));
  }
}

// The smoothed target distribution is (1 - eps) [c == y] + off with off = eps / C. Its gradient at the
// target column, p_y - (1 - eps) - off = (eps - off) - sr / s, is formed without the cancellation of p_y - 1.
__device__ __forceinline__ float target_gradient(const Lse& t, float inv_s, float eps, float off) {
  return (eps - off) - t.sr * inv_s;
}

// Rows of any length: pass 1 reads the row into the online (m, s, sum z); pass 2 (Write) reads it again
// to write the gradient (a long row's second read mostly hits L2).
template <typename E, int VEC, bool Write>
__global__ void __launch_bounds__(kMaxThreads) softmax_stream_kernel(LossArgs a, int tpr) {
  const ThreadRow<E, VEC, Write> row = thread_row<E, VEC, Write>(a, tpr);
  const float eps = a.label_smoothing;

  Lse acc{-CUDART_INF_F, 0.f, 0.f, 0.f};
  auto accumulate = [&](int64_t col, const auto& z, auto&) {
    constexpr int K = ExtentOf<decltype(z)>::value;
    float cm = z[0];
#pragma unroll
    for (int j = 1; j < K; ++j) cm = nan_max(cm, z[j]);
    const float m = nan_max(acc.m, cm);
    const float shift = lse_shift(m);
    // Rescale only when the max moved (NaN != NaN, so a NaN max also rescales, to NaN).
    const float rescale = expf(acc.m - shift);
    float s = m == acc.m ? acc.s : acc.s * rescale;
    float sr = m == acc.m ? acc.sr : acc.sr * rescale;
    float sz = acc.sz;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const float e = expf(z[j] - shift);
      s += e;
      sr += col + j == row.r.y ? 0.f : e;
      sz += z[j];
    }
    acc = Lse{m, s, sr, sz};
  };
  visit_row<E, VEC, false>(row.x, nullptr, row.span, row.at.tid, tpr, accumulate);
  const Lse t = group_lse(acc, tpr, row.at.group);

  write_softmax_loss(a, row, t);
  if (Write) {
    if (row.r.kind == kCompute) {
      const float inv_s = 1.f / t.s;
      const float off = eps / static_cast<float>(a.num_classes);
      const float g_y = target_gradient(t, inv_s, eps, off);
      auto gradient = [&](int64_t col, const auto& z, auto& out) {
        constexpr int K = ExtentOf<decltype(z)>::value;
#pragma unroll
        for (int j = 0; j < K; ++j)
          out[j] = row.r.coef * (col + j == row.r.y ? g_y : expf(z[j] - t.m) * inv_s - off);
      };
      visit_row<E, VEC, true>(row.x, row.g, row.span, row.at.tid, tpr, gradient);
    } else if (row.r.kind != kNoRow) {
      fill_row<E>(row.g, a.num_classes, row.r.kind == kIgnored ? 0.f : CUDART_NAN_F, row.at.tid, tpr);
    }
  }
}

// Whether this thread's share of the row (visit_row's split: head element tid, body vectors tid, tid + tpr,
// ..., tail element tid) holds column col.
template <typename E, int VEC, bool Write>
__device__ __forceinline__ bool holds_column(const ThreadRow<E, VEC, Write>& row, int tpr, int64_t col) {
  if (col < row.span.head) return col == row.at.tid;
  if (col >= row.span.tail_start) return col - row.span.tail_start == row.at.tid;
  return ((col - row.span.head) / VEC) % tpr == row.at.tid;
}

// Rows of at most kCachedElemsPerThread * tpr columns, gradient always written: the row is loaded once
// into registers (all loads issued before any use), reduced, and the gradient computed from the
// registers. Thread tid holds body vectors tid, tid + tpr, ... and at most one head and one tail element.
// Only for 16-byte vectors: with narrower accesses the 16 cached elements need more addresses than the
// 64 registers of a 1024-thread block hold (ptxas spills), and such calls take the streaming kernel.
constexpr int kCachedVecBytes = 16;

template <typename E, int VEC>
__global__ void __launch_bounds__(kMaxThreads) softmax_cached_kernel(LossArgs a, int tpr) {
  static_assert(VEC * sizeof(typename E::bits) == kCachedVecBytes, "the cached softmax uses 16-byte vectors");
  constexpr int KV = kCachedElemsPerThread / VEC;
  const ThreadRow<E, VEC, true> row = thread_row<E, VEC, true>(a, tpr);
  const float eps = a.label_smoothing;

  // Absent slots hold -inf: they leave the max alone and add exp(-inf) = 0 to s; sum z skips them.
  const bool has_head = row.at.tid < row.span.head;
  const bool has_tail = row.at.tid < row.span.len - row.span.tail_start;
  float zh = has_head ? E::load(row.x[row.at.tid]) : -CUDART_INF_F;
  float zt = has_tail ? E::load(row.x[row.span.tail_start + row.at.tid]) : -CUDART_INF_F;
  float z[KV][VEC];
#pragma unroll
  for (int k = 0; k < KV; ++k) {
    const int64_t v = row.at.tid + static_cast<int64_t>(k) * tpr;
    if (v < row.span.nvec) {
      load_vec<E, VEC>(row.x + row.span.head + v * VEC, z[k]);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) z[k][j] = -CUDART_INF_F;
    }
  }

  float m = nan_max(zh, zt);
  float sz = (has_head ? zh : 0.f) + (has_tail ? zt : 0.f);
#pragma unroll
  for (int k = 0; k < KV; ++k) {
    const bool present = row.at.tid + static_cast<int64_t>(k) * tpr < row.span.nvec;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      m = nan_max(m, z[k][j]);
      sz += present ? z[k][j] : 0.f;
    }
  }
  const float shift = lse_shift(m);
  // The one thread that holds the target column moves its value out of the cached row (to -inf, which adds
  // exp(-inf) = 0), so the sums below are sr, the sum over the other columns, on every thread: a fix-up
  // once per row instead of a select on every element. The gradient never reads the target's cached value.
  float z_y = -CUDART_INF_F;
  if (row.r.kind == kCompute && holds_column(row, tpr, row.r.y)) {
    if (has_head && row.at.tid == row.r.y) {
      z_y = zh;
      zh = -CUDART_INF_F;
    }
    if (has_tail && row.span.tail_start + row.at.tid == row.r.y) {
      z_y = zt;
      zt = -CUDART_INF_F;
    }
#pragma unroll
    for (int k = 0; k < KV; ++k) {
      const int64_t col = row.span.head + (row.at.tid + static_cast<int64_t>(k) * tpr) * VEC;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (col + j == row.r.y) {
          z_y = z[k][j];
          z[k][j] = -CUDART_INF_F;
        }
      }
    }
  }
  float sr = expf(zh - shift) + expf(zt - shift);
#pragma unroll
  for (int k = 0; k < KV; ++k)
#pragma unroll
    for (int j = 0; j < VEC; ++j) sr += expf(z[k][j] - shift);
  const float s = sr + expf(z_y - shift);
  const Lse t = group_lse(Lse{m, s, sr, sz}, tpr, row.at.group);

  write_softmax_loss(a, row, t);
  if (row.r.kind == kCompute) {
    const float inv_s = 1.f / t.s;
    const float off = eps / static_cast<float>(a.num_classes);
    const float g_y = target_gradient(t, inv_s, eps, off);
    auto grad_at = [&](float zc, int64_t col) {
      return row.r.coef * (col == row.r.y ? g_y : expf(zc - t.m) * inv_s - off);
    };
    if (has_head) row.g[row.at.tid] = E::store(grad_at(zh, row.at.tid));
#pragma unroll
    for (int k = 0; k < KV; ++k) {
      const int64_t v = row.at.tid + static_cast<int64_t>(k) * tpr;
      if (v < row.span.nvec) {
        const int64_t col = row.span.head + v * VEC;
        float out[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] = grad_at(z[k][j], col + j);
        store_vec<E, VEC>(row.g + col, out);
      }
    }
    if (has_tail) row.g[row.span.tail_start + row.at.tid] = E::store(grad_at(zt, row.span.tail_start + row.at.tid));
  } else if (row.r.kind != kNoRow) {
    fill_row<E>(row.g, a.num_classes, row.r.kind == kIgnored ? 0.f : CUDART_NAN_F, row.at.tid, tpr);
  }
}

}  // namespace device
}  // namespace cbkernels::cuda
