// How the CUDA kernels read and write one row of an (N, C) array: storage types, 16-byte vector words,
// the split of a row into an unaligned head, an aligned body and a tail, and the row's target state.
// No torch header (launch.cu compiles with a CPU-only torch).
//
// A row of C = 8142 bf16 (16284 bytes) starts at a different offset modulo 16 than the row before it, so
// each row finds its own head from its address. The gradient row is written with the logits row's split,
// which is right only when both rows have the same address modulo the vector size: the launcher
// (launch.cu) checks that once per call and otherwise picks a narrower vector.
//
// Offsets: the row base is int64 (row * stride exceeds 2^31 on large problems); inside a row, columns are
// int (the launcher refuses C above kMaxColumns), so the per-element address is one 32-bit index added to
// a 64-bit row pointer.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

#include <cstdint>

#include "common/loss_args.h"

namespace cbkernels::cuda::device {

// The widest row the kernels index with int columns: col + a vector's width never overflows.
constexpr int64_t kMaxColumns = 2147483647 - 64;

// ---- storage types: what the arrays hold (bits) and the conversions to and from fp32 -------------------
// Half types travel as their 16-bit patterns so that vector words stay trivial types.
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

// VEC elements as one machine word (ld/st.global.v4.b32 for 16 bytes), held as 32-bit registers: what a
// prefetch keeps (4 registers for 8 bf16), converted to fp32 only when used. The elements are taken out
// of and put into the 32-bit lanes with shifts, never through an array of 16-bit values (which ptxas
// splits into 16-bit pieces and may spill), and a 16-byte word is stored from one uint4 (a union store
// of four floats is split into narrower stores).
template <int Bytes> struct RawWord;
template <> struct RawWord<16> { using type = uint4; };
template <> struct RawWord<8> { using type = uint2; };
template <> struct RawWord<4> { using type = unsigned int; };
template <> struct RawWord<2> { using type = unsigned short; };

template <typename E, int VEC>
struct Word {
  static constexpr int kBytes = VEC * static_cast<int>(sizeof(typename E::bits));
  using Raw = typename RawWord<kBytes>::type;
  Raw raw;
};

// The 32-bit lane i of a raw word (a 2-byte word is its own lane).
__device__ __forceinline__ unsigned lane_of(const uint4& r, int i) { return i == 0 ? r.x : i == 1 ? r.y : i == 2 ? r.z : r.w; }
__device__ __forceinline__ unsigned lane_of(const uint2& r, int i) { return i == 0 ? r.x : r.y; }
__device__ __forceinline__ unsigned lane_of(unsigned r, int) { return r; }
__device__ __forceinline__ unsigned lane_of(unsigned short r, int) { return r; }

// Element j of a word as its storage bits.
template <typename E, int VEC>
__device__ __forceinline__ typename E::bits element_bits(const Word<E, VEC>& w, int j) {
  if constexpr (sizeof(typename E::bits) == 4) {
    return __uint_as_float(lane_of(w.raw, j));
  } else {
    return static_cast<unsigned short>(lane_of(w.raw, j / 2) >> (16 * (j % 2)));
  }
}

template <typename E, int VEC>
__device__ __forceinline__ Word<E, VEC> load_word(const typename E::bits* p) {
  return {*reinterpret_cast<const typename Word<E, VEC>::Raw*>(p)};
}

template <typename E, int VEC>
__device__ __forceinline__ void unpack(const Word<E, VEC>& w, float (&z)[VEC]) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) z[j] = E::load(element_bits(w, j));
}

// The 32-bit lane holding elements 2i, 2i+1 (16-bit types) or element i (fp32) of g, each rounded once.
template <typename E, int VEC>
__device__ __forceinline__ unsigned lane_from(const float (&g)[VEC], int i) {
  if constexpr (sizeof(typename E::bits) == 4) {
    return __float_as_uint(g[i]);
  } else if constexpr (VEC == 1) {
    return E::store(g[0]);
  } else {
    return static_cast<unsigned>(E::store(g[2 * i])) | (static_cast<unsigned>(E::store(g[2 * i + 1])) << 16);
  }
}

// One vector store of VEC results. The 16- and 8-byte stores are written as st.global.v4 / .v2 in PTX: a
// plain store through a uint4 pointer is split into 4-byte stores when the compiler loses track of the
// address's alignment (seen in the scaling kernel, whose stores reuse its loads' addresses).
template <typename E, int VEC>
__device__ __forceinline__ void store_word(typename E::bits* p, const float (&g)[VEC]) {
  using Raw = typename Word<E, VEC>::Raw;
  if constexpr (Word<E, VEC>::kBytes == 16) {
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(lane_from<E>(g, 0)),
                 "r"(lane_from<E>(g, 1)), "r"(lane_from<E>(g, 2)), "r"(lane_from<E>(g, 3))
                 : "memory");
  } else if constexpr (Word<E, VEC>::kBytes == 8) {
    asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(p), "r"(lane_from<E>(g, 0)), "r"(lane_from<E>(g, 1))
                 : "memory");
  } else {
    *reinterpret_cast<Raw*>(p) = static_cast<Raw>(lane_from<E>(g, 0));
  }
}

// ---- the row split: head | aligned body | tail ---------------------------------------------------------
struct Span {
  int head;        // elements before the first aligned vector (< VEC)
  int nvec;        // aligned vectors
  int tail_start;  // first element after the body; tail = [tail_start, len), < VEC elements
  int len;         // columns processed (0 for rows that compute nothing)

  // The aligned vector holding column col, or -1 for a head or tail column.
  __device__ __forceinline__ int vector_of(int col, int vec) const {
    return col >= head && col < tail_start ? (col - head) / vec : -1;
  }
};

template <int VEC, typename Bits>
__device__ __forceinline__ Span split_row(const Bits* x, int len) {
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
  const int head = past == 0 ? 0 : static_cast<int>((kBytes - past) / sizeof(Bits));
  s.head = head < len ? head : len;
  s.nvec = (len - s.head) / VEC;
  s.tail_start = s.head + s.nvec * VEC;
  return s;
}

// ---- the optional per-class inputs (LossArgs::logit_offset, target_margin, element_weight) ---------------
// The offset is added where a logit is loaded (the (C,) vector stays in L1/L2: no extra pass over the row);
// the margin, once per row, where a kernel handles the target column apart (margin_of); the element weights
// where a column's terms are formed. The index-target kernels take a template flag Extended for them: without
// it, none of this code is compiled in. So do the dense-target kernels, but for the streaming softmax, which
// reads each at run time (Extended true).

// The offset vector (indexed by column), or nullptr without one (or without Extended). The kernels pass it
// with the column it starts at to for_each_vector rather than a pointer into it: the parameter stays in the
// constant bank, where a row pointer would hold two more registers across the loop.
template <bool Extended>
__device__ __forceinline__ const float* offset_at(const LossArgs& a) {
  return Extended ? a.logit_offset : nullptr;
}

// Adds offset[0 .. VEC) to z.
template <int VEC>
__device__ __forceinline__ void add_offset(const float* offset, float (&z)[VEC]) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) z[j] += __ldg(offset + j);
}

// The logit of column col of row x in fp32, offset when Extended and the call has one (the edge and scalar
// loads).
template <typename E, bool Extended>
__device__ __forceinline__ float load_logit(const LossArgs& a, const typename E::bits* x, int col) {
  const float z = E::load(x[col]);
  return Extended && a.logit_offset != nullptr ? z + __ldg(a.logit_offset + col) : z;
}

// The margin subtracted from the target's logit (column y of a computed row): 0 unless Extended and set.
template <bool Extended>
__device__ __forceinline__ float margin_of(const LossArgs& a, int y) {
  return Extended && a.target_margin != nullptr ? __ldg(a.target_margin + y) : 0.f;
}

// The element weight of column col: element_weight[col] when Extended and the call has them, else 1 (without
// Extended a constant, so that multiplying by it compiles to nothing).
template <bool Extended>
__device__ __forceinline__ float weight_at(const LossArgs& a, int col) {
  return Extended && a.element_weight != nullptr ? __ldg(a.element_weight + col) : 1.f;
}

// The element weights of columns col .. col + VEC (weight_at).
template <bool Extended, int VEC>
__device__ __forceinline__ void weights_at(const LossArgs& a, int col, float (&w)[VEC]) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) w[j] = weight_at<Extended>(a, col + j);
}

// ---- the body loop -----------------------------------------------------------------------------------
// Vectors a thread loads per step by default: two, whatever their width (8 fp32 or 16 16-bit elements for
// 16-byte vectors), so that two independent 16-byte loads are in flight while the previous step computes.
constexpr int kStep = 2;

// Calls f(col, z) for the body vectors v = tid, tid + tpr, ... of a row (body: its first aligned element,
// nvec vectors), except vector `skip` (-1: none), with col = v * VEC the vector's first column in the body
// and z its VEC values in fp32. The skipped vector is the one that holds the target column: the kernels
// give it to the row's edge step (edge_column below), so every vector f sees holds only non-target
// columns; the test is one compare per vector, constant over its elements.
// Step vectors a step (kStep unless a kernel needs fewer registers). Software-pipelined: the next step's
// vectors are loaded before f runs on the current ones, so with kStep each thread has two independent
// 16-byte loads in flight while it computes the step before (32 KB per SM at the 1024 resident threads of
// the 64-register kernels, against the ~24 KB per SM that keeps an H200's memory busy). The loop counts
// vectors, not columns: v + Step * tpr stays far below 2^31 for every row the launcher accepts
// (kMaxColumns), where a column count could pass it. offset (offset_at), or nullptr: offset[col0 + column]
// is added to z before f sees it (col0: the body's first column in the row).
template <typename E, int VEC, int Step = kStep, typename F>
__device__ __forceinline__ void for_each_vector(const typename E::bits* body, int nvec, int skip, int tid, int tpr,
                                                F&& f, const float* offset = nullptr, int col0 = 0) {
  Word<E, VEC> next[Step];
  auto fetch = [&](int v0) {
#pragma unroll
    for (int k = 0; k < Step; ++k) {
      const int v = v0 + k * tpr;
      if (v < nvec) next[k] = load_word<E, VEC>(body + v * VEC);
    }
  };
  fetch(tid);
  for (int v0 = tid; v0 < nvec; v0 += Step * tpr) {
    Word<E, VEC> cur[Step];
#pragma unroll
    for (int k = 0; k < Step; ++k) cur[k] = next[k];
    fetch(v0 + Step * tpr);
#pragma unroll
    for (int k = 0; k < Step; ++k) {
      const int v = v0 + k * tpr;
      if (v >= nvec) break;
      if (v == skip) continue;
      float z[VEC];
      unpack(cur[k], z);
      if (offset != nullptr) add_offset(offset + col0 + v * VEC, z);
      f(v * VEC, z);
    }
  }
}

// The walk of for_each_vector with what a vector loads left to the caller (the dense-target kernels' loops):
// load(v) issues the loads of body vector v and returns what they fill (any trivially copyable type, kept
// in registers), use(v, loaded) computes with it; the next step's Step vectors are loaded before the current
// step's are used.
template <int Step, typename Load, typename Use>
__device__ __forceinline__ void for_each_loaded(int nvec, int tid, int tpr, Load&& load, Use&& use) {
  using Loaded = decltype(load(0));
  Loaded next[Step];
  auto fetch = [&](int v0) {
#pragma unroll
    for (int k = 0; k < Step; ++k) {
      const int v = v0 + k * tpr;
      if (v < nvec) next[k] = load(v);
    }
  };
  fetch(tid);
  for (int v0 = tid; v0 < nvec; v0 += Step * tpr) {
    Loaded cur[Step];
#pragma unroll
    for (int k = 0; k < Step; ++k) cur[k] = next[k];
    fetch(v0 + Step * tpr);
#pragma unroll
    for (int k = 0; k < Step; ++k) {
      const int v = v0 + k * tpr;
      if (v >= nvec) break;
      use(v, cur[k]);
    }
  }
}

// for_each_vector over two rows at the same columns, the logits (body) and a dense target row (tbody: the
// logits' storage type, and the logits row's alignment, which the launcher checks): f(col, z, t), t the
// target's VEC values in fp32; both rows' next vectors are loaded while f computes. No vector is skipped.
template <typename E, int VEC, int Step, typename F>
__device__ __forceinline__ void for_each_pair(const typename E::bits* body, const typename E::bits* tbody, int nvec,
                                              int tid, int tpr, F&& f, const float* offset, int col0) {
  struct Loaded {
    Word<E, VEC> z, t;
  };
  for_each_loaded<Step>(nvec, tid, tpr, [&](int v) {
    return Loaded{load_word<E, VEC>(body + v * VEC), load_word<E, VEC>(tbody + v * VEC)};
  }, [&](int v, const Loaded& words) {
    float z[VEC], t[VEC];
    unpack(words.z, z);
    unpack(words.t, t);
    if (offset != nullptr) add_offset(offset + col0 + v * VEC, z);
    f(v * VEC, z, t);
  });
}

// for_each_vector over a row (body) with a (C,) fp32 vector at the same columns (values: its element at the
// body's first column; not aligned like the row, so read one element at a time): f(col, z, w), w its VEC
// values; both are loaded a step ahead. The dense kernels' class-weight sums.
template <typename E, int VEC, int Step, typename F>
__device__ __forceinline__ void for_each_vector_with(const typename E::bits* body, const float* values, int nvec,
                                                     int tid, int tpr, F&& f) {
  struct Loaded {
    Word<E, VEC> z;
    float w[VEC];
  };
  for_each_loaded<Step>(nvec, tid, tpr, [&](int v) {
    Loaded in{load_word<E, VEC>(body + v * VEC), {}};
#pragma unroll
    for (int j = 0; j < VEC; ++j) in.w[j] = __ldg(values + v * VEC + j);
    return in;
  }, [&](int v, const Loaded& in) {
    float z[VEC];
    unpack(in.z, z);
    f(v * VEC, z, in.w);
  });
}

// ---- the edge step: head, tail and the target's vector, one column per thread --------------------------
// The columns a row's body loop leaves to the edge step: the head [0, head), the tail [tail_start, len) and
// the VEC columns of the body vector target_v (when target_v >= 0), at most 3 VEC <= 24 columns. Thread
// tid takes column `col` of lane tid of three groups of VEC lanes (head, tail, target vector); `present`
// is false for a lane past its group's columns and for every thread from 3 VEC on. Each thread computes at
// most one edge element, with the general (target or not) form, once per row; tpr >= 32 >= 3 VEC.
struct EdgeColumn {
  int col;
  bool present;
};

template <int VEC>
__device__ __forceinline__ EdgeColumn edge_column(const Span& s, int target_v, int tid) {
  static_assert(3 * VEC <= 32, "the edge step's columns must fit in the smallest row slot, one warp");
  const int group = tid / VEC, lane = tid - group * VEC;
  if (group == 0) return {lane, lane < s.head};
  if (group == 1) return {s.tail_start + lane, s.tail_start + lane < s.len};
  if (group == 2) return {s.head + target_v * VEC + lane, target_v >= 0};
  return {0, false};
}

// ---- prefetch of the next row into L2 ----------------------------------------------------------------
// A block asks L2 for the start of its next row (up to kPrefetchBytes) before it computes the current one:
// fire-and-forget requests that hold no register, so the memory system stays busy through the current
// row's reductions and stores, and the next row's loads find their lines in L2. One prefetch.global.L2
// per 128-byte line, spread over the row's threads (one instruction per thread for a row of up to
// tpr * 128 bytes). Capped so that the lines prefetched by all resident blocks stay far below L2's size.
constexpr int kPrefetchBytes = 32 * 1024;

template <typename Bits>
__device__ __forceinline__ void prefetch_row_l2(const Bits* x, int64_t row_bytes, int tid, int tpr) {
  const int64_t bytes = row_bytes < kPrefetchBytes ? row_bytes : kPrefetchBytes;
  const char* base = reinterpret_cast<const char*>(x);
  for (int64_t off = static_cast<int64_t>(tid) * 128; off < bytes; off += static_cast<int64_t>(tpr) * 128)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(base + off));
}

// ---- the row's target, weight and fate --------------------------------------------------------------------
enum RowKind : int { kCompute = 0, kIgnored = 1, kBadTarget = 2, kNoRow = 3 };

struct Row {
  int kind;
  int y;        // the target column (kCompute only)
  float alpha;  // class_weight[y] * sample_weight[row] (each 1 when absent)
  float coef;   // alpha * upstream grad of the row (1 in forward): the gradient's row factor
};

// The row's target, sample weight and upstream gradient, loaded without being used: a prefetch issues these
// for the next row and classifies it (row_of) once they are needed, so no load waits on another.
struct RowInputs {
  int64_t y;       // target value as stored (unchecked)
  float sample;    // sample_weight[row], 1 without it
  float upstream;  // grad_loss[row], 1 without it
};

__device__ __forceinline__ RowInputs row_inputs(const LossArgs& a, int64_t row) {
  RowInputs in{a.ignore_index, 1.f, 1.f};
  if (row >= a.num_rows) return in;
  in.y = a.target_is_int64 ? static_cast<const int64_t*>(a.target)[row]
                           : static_cast<int64_t>(static_cast<const int32_t*>(a.target)[row]);
  if (a.sample_weight != nullptr) in.sample = a.sample_weight[row];
  if (a.grad_loss != nullptr) in.upstream = a.grad_loss[row];
  return in;
}

__device__ __forceinline__ Row row_of(const LossArgs& a, int64_t row, const RowInputs& in) {
  Row r{kNoRow, -1, 0.f, 0.f};
  if (row >= a.num_rows) return r;
  if (in.y == a.ignore_index) {
    r.kind = kIgnored;
    return r;
  }
  if (in.y < 0 || in.y >= a.num_classes) {  // never used as an index: NaN row (functional.py also asserts on the device)
    r.kind = kBadTarget;
    return r;
  }
  r.kind = kCompute;
  r.y = static_cast<int>(in.y);
  r.alpha = (a.class_weight != nullptr ? a.class_weight[in.y] : 1.f) * in.sample;
  r.coef = r.alpha * in.upstream;
  return r;
}

__device__ __forceinline__ Row row_state(const LossArgs& a, int64_t row) { return row_of(a, row, row_inputs(a, row)); }

// The loss written for a row that computed `value` (alpha_y already applied); 0 ignored, NaN bad target.
__device__ __forceinline__ float row_loss(const Row& r, float value) {
  return r.kind == kCompute ? value : (r.kind == kIgnored ? 0.f : CUDART_NAN_F);
}

// Columns [lo, hi) of a gradient row set to value (the row's threads share them); fill_row: the whole row,
// of ignored (0) and bad-target (NaN) rows.
template <typename E>
__device__ __forceinline__ void fill_columns(typename E::bits* g, int lo, int hi, float value, int tid, int tpr) {
  const typename E::bits b = E::store(value);
  for (int col = lo + tid; col < hi; col += tpr) g[col] = b;
}

template <typename E>
__device__ __forceinline__ void fill_row(typename E::bits* g, int c, float value, int tid, int tpr) {
  fill_columns<E>(g, 0, c, value, tid, tpr);
}

// ---- dense target rows (LossArgs::dense_target) -------------------------------------------------------------
// Row i's target values: (N, C) contiguous of the logits' storage type, so row i starts at row * C (int64).
template <typename E>
__device__ __forceinline__ const typename E::bits* target_row(const LossArgs& a, int64_t row) {
  return static_cast<const typename E::bits*>(a.target) + row * a.num_classes;
}

// A dense row is computed whenever it exists (none is ignored): alpha = sample_weight[row] and coef = alpha *
// grad_loss[row] (each 1 when absent); with class weights the kernels multiply both by sum_c t_c
// class_weight[c] (dense_row_weight) once they have it.
__device__ __forceinline__ Row dense_row_of(const LossArgs& a, int64_t row) {
  Row r{kNoRow, -1, 0.f, 0.f};
  if (row >= a.num_rows) return r;
  r.kind = kCompute;
  r.alpha = a.sample_weight != nullptr ? a.sample_weight[row] : 1.f;
  r.coef = r.alpha * (a.grad_loss != nullptr ? a.grad_loss[row] : 1.f);
  return r;
}

__device__ __forceinline__ void dense_row_weight(Row& r, float class_sum) {
  r.alpha *= class_sum;
  r.coef *= class_sum;
}

// A dense target value outside the family's range (common/loss_ops.h: dense_target_in_range) reads as NaN, so
// the row's loss and gradient are NaN: the CPU raises on the host, where here a check would synchronise.
__device__ __forceinline__ float unit_target(float t) { return t >= 0.f && t <= 1.f ? t : CUDART_NAN_F; }
__device__ __forceinline__ float nonnegative_target(float t) { return t >= 0.f ? t : CUDART_NAN_F; }

// ---- the persistent walk ------------------------------------------------------------------------------
// A block holds rows_per_block row slots of tpr threads each (tpr a multiple of 32: a warp never straddles
// two rows). The grid is bounded (a few blocks per SM, launch.cu); block b takes rows b * rpb, b * rpb +
// gridDim * rpb, ... so every thread of a block runs the same number of iterations and reaches the same
// barriers; a slot past the last row computes nothing but still takes part in the reductions.
struct Slot {
  int group;       // row slot within the block
  int tid;         // thread within the row, 0 .. tpr-1
  int64_t first;   // the block's first row of this iteration (uniform over the block)
  int64_t stride;  // rows from one iteration to the next
};

__device__ __forceinline__ Slot slot_of(int tpr) {
  Slot s;
  const int rpb = static_cast<int>(blockDim.x) / tpr;
  s.group = static_cast<int>(threadIdx.x) / tpr;
  s.tid = static_cast<int>(threadIdx.x) - s.group * tpr;
  s.first = static_cast<int64_t>(blockIdx.x) * rpb;
  s.stride = static_cast<int64_t>(gridDim.x) * rpb;
  return s;
}

}  // namespace cbkernels::cuda::device
