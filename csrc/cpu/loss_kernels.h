// Bodies of the fused CPU loss kernels (docs/op-contract.md; the math: docs/math.md, sections 5-7).
//
// Included once by each per-ISA translation unit (loss_kernels.cpp, loss_kernels_avx2.cpp,
// loss_kernels_avx512.cpp); CPU_CAPABILITY names the variant, so the entry points and ATen's
// Vectorized<float> both land in a namespace of that name and the three copies never collide.
// exp and log1p come from vec_math.h: inline polynomials for the ranges used here (x <= 0, [0, 1]),
// a couple of ulp, NaN in NaN out; -ffast-math auto-vectorisation would give neither guarantee.
//
// Work split: the op wrappers (common/loss_ops.h) check everything and allocate, ops.cpp validates the
// targets and runs at::parallel_for over rows; the functions here process a range of rows, one row at a
// time, the row's C logits in vectors.
// All arithmetic is fp32; per-row sums are accumulated in fp32 vectors over blocks of kBlock elements
// and the block sums in double, so a 70001-class row loses no more than a 1024-class one.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

#include "common/gamma_case.h"
#include "rows.h"
#include "vec_math.h"

namespace cbkernels::cpu {
namespace CPU_CAPABILITY {

constexpr int64_t kLanes = Vec::size();
constexpr int64_t kBlock = 1024;  // elements per fp32 partial sum (a multiple of every kLanes)

// Software prefetch, `ahead` elements past p. The hardware streamer stops at 4 KiB page boundaries and
// idles while a loop computes on data already in L1; on rows too big for the caches the loops below
// then wait for DRAM once per page (measured ~3x slower per element at (1024, 8142) than at (128, 8142)).
// A prefetch per vector keeps the next lines in flight during the exp/log1p work. Prefetching past the end
// of the tensor is harmless: prefetches never fault.
template <typename T>
inline void prefetch(const T* p, int64_t ahead) {
  __builtin_prefetch(reinterpret_cast<const char*>(p + ahead), 0, 3);
}
constexpr int64_t kPrefetchAhead = 512;  // elements: 2 KiB of fp32, 32 lines in flight

// Requests ownership of p's line ahead of a store. The softmax gradient is written in a second sweep over
// the row, with almost no arithmetic per store: without this, each store misses, and the sweep waits on
// the read-for-ownership of every line (at (1024, 8142) fp32 on one thread the gradient sweep cost about
// as much as the whole exp pass). Issued during the exp pass, the ownership requests overlap its
// arithmetic: loss + gradient 0.92 -> 0.69 ns per element. (The sigmoid family stores as it computes,
// and the store buffer hides the misses: no measurable gain there, so no prefetch.)
template <typename T>
inline void prefetch_for_write(T* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p), 1, 3);
}

// ---- loads and stores in the logits' type, math in fp32 ---------------------------------------------

template <typename T>
inline Vec load_vec(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec out;
    at::vec::load_to_float(p, out);
    return out;
  }
}

// The last n < kLanes elements of a row; lanes >= n read as 0.
template <typename T>
inline Vec load_vec_tail(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p, n);
  } else {
    float buf[kLanes] = {};
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
    return Vec::loadu(buf);
  }
}

template <typename T>
inline void store_vec(T* p, const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, kLanes);
  }
}

template <typename T>
inline void store_vec_tail(T* p, const Vec& v, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, n);
  } else {
    float buf[kLanes];
    v.store(buf);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(buf[i]);  // round to nearest even, as the vector path
  }
}

inline double sum_lanes(const Vec& v) {
  float buf[kLanes];
  v.store(buf);
  double s = 0.0;
  for (int64_t i = 0; i < kLanes; ++i) s += buf[i];
  return s;
}

// ---- one row's context -----------------------------------------------------------------------------

template <typename Index>
inline int64_t target_at(const LossArgs& a, int64_t row) {
  return static_cast<int64_t>(static_cast<const Index*>(a.target)[row]);
}

inline int64_t row_target(const LossArgs& a, int64_t row) {
  return a.target_is_int64 ? target_at<int64_t>(a, row) : target_at<int32_t>(a, row);
}

// Writes the outputs of an ignored row: loss 0, gradient exactly 0 whatever its logits or upstream grad.
template <typename T>
inline void write_ignored_row(const LossArgs& a, int64_t row) {
  if (a.loss != nullptr) a.loss[row] = 0.0f;
  if (a.grad != nullptr) {
    T* g = static_cast<T*>(a.grad) + row * a.num_classes;
    std::memset(static_cast<void*>(g), 0, sizeof(T) * static_cast<size_t>(a.num_classes));  // +0.0 in all three types
  }
}

// ---- sigmoid family ------------------------------------------------------------------------------------
// Per element, t = +1 for the target column and -1 elsewhere, u = t * z, e = exp(-|u|), l = log1p(e):
//   -log p = softplus(-u) = max(-u, 0) + l          (the one log)
//   p = 1/(1+e), q = e/(1+e) for u >= 0, swapped for u < 0   (q = 1 - p without the cancellation)
//   modulator (1-p)^gamma: 1, sqrt(q), q, q*q for gamma = 0, 0.5, 1, 2 (GammaCase, common/gamma_case.h);
//   exp(-gamma * softplus(u)) otherwise
//   term = mod * softplus(-u)
//   dterm/du = mod * (gamma * p * log p - q) = -mod * (q + gamma * p * softplus(-u));  dterm/dz = t * dterm/du
// Derivation of dterm/du: d/du[-log p] = -(1 - p) = -q and d/du[q^gamma] = -gamma * q^gamma * p, so
// d/du[q^gamma * (-log p)] = -gamma q^gamma p (-log p) - q^gamma q. No 1/q appears: no singularity at q = 0
// for gamma < 1 (the pow form's derivative has one). With |z| = 1e4: e = 0, l = 0, every quantity finite.
// NaN: |u| is NaN, so e, l and everything after are NaN (clamp_min returns a NaN argument as well).

// Always inlined, so that whichever of term / dterm_dz the caller does not use is never computed.
template <GammaCase kCase>
C10_ALWAYS_INLINE void focal_terms(const Vec& z, const Vec& t, const Vec& gamma, Vec& term, Vec& dterm_dz) {
  // No comparisons, blends or at::vec::maximum here: on AVX-512 those go through mask registers and
  // measured several times slower (vec_math.h); clamp_min and the sign-bit select do the same job.
  const Vec zero(0.0f), one(1.0f);
  const Vec u = z * t;
  const Vec e = exp_nonpositive(u.abs().neg());
  const Vec r = one / (one + e);
  const Vec l = log1p_unit(e);
  const Vec sp_neg = at::vec::clamp_min(u.neg(), zero) + l;  // -log p; clamp_min keeps a NaN u
  const Vec er = e * r;
  const Vec u_negative = sign_mask(u);  // u = -0 counts as negative: there r = er = 1/2
  const Vec q = select(u_negative, r, er);
  Vec dterm_du;
  if constexpr (kCase == GammaCase::kZero) {
    term = sp_neg;
    dterm_du = q.neg();
  } else {
    const Vec p = select(u_negative, er, r);
    Vec mod;
    if constexpr (kCase == GammaCase::kHalf) {
      mod = q.sqrt();
    } else if constexpr (kCase == GammaCase::kOne) {
      mod = q;
    } else if constexpr (kCase == GammaCase::kTwo) {
      mod = q * q;
    } else {
      const Vec sp_pos = at::vec::clamp_min(u, zero) + l;  // -log q
      mod = exp_nonpositive((gamma * sp_pos).neg());
    }
    term = mod * sp_neg;
    dterm_du = (mod * at::vec::fmadd(gamma * p, sp_neg, q)).neg();
  }
  dterm_dz = dterm_du * t;
}

// Loss (kLoss) and/or gradient (kGrad) of one row. alpha scales the loss; gscale the gradient
// (alpha in the forward op, alpha * grad_loss[row] in the backward op).
template <typename T, GammaCase kCase, bool kLoss, bool kGrad>
inline void focal_row(const T* z, T* g, int64_t C, int64_t y, float gamma_f, float alpha, float gscale, float* loss) {
  const Vec gamma(gamma_f), scale(gscale), zero(0.0f), one(1.0f), minus_one(-1.0f);
  // The target's vector gets t = +1 in the target's lane; every other vector has t = -1 throughout.
  const int64_t y_base = y - y % kLanes;
  const Vec t_y = Vec::blendv(minus_one, one, Vec::arange(0.0f, 1.0f) == Vec(static_cast<float>(y - y_base)));
  const int64_t full = C - C % kLanes;
  double total = 0.0;
  Vec term, dz;
  for (int64_t block = 0; block < full; block += kBlock) {
    const int64_t block_end = std::min(block + kBlock, full);
    Vec acc(0.0f);
    for (int64_t c = block; c < block_end; c += kLanes) {
      prefetch(z + c, kPrefetchAhead);
      focal_terms<kCase>(load_vec(z + c), c == y_base ? t_y : minus_one, gamma, term, dz);
      if constexpr (kLoss) acc = acc + term;
      if constexpr (kGrad) store_vec(g + c, dz * scale);
    }
    if constexpr (kLoss) total += sum_lanes(acc);
  }
  if (full < C) {
    const int64_t n = C - full;
    focal_terms<kCase>(load_vec_tail(z + full, n), full == y_base ? t_y : minus_one, gamma, term, dz);
    if constexpr (kLoss) total += sum_lanes(Vec::set(zero, term, n));  // lanes >= n hold term(0) != 0
    if constexpr (kGrad) store_vec_tail(g + full, dz * scale, n);
  }
  if constexpr (kLoss) *loss = static_cast<float>(static_cast<double>(alpha) * total);
}

// The row loop both families share: ignored rows get zeros, the others their alpha_y, the gradient scale
// alpha_y * grad_loss[row] (alpha_y alone in forward) and their output pointers, then row_fn does the math.
template <typename T, bool kLoss, bool kGrad, typename RowFn>
void for_each_row(const LossArgs& a, int64_t begin, int64_t end, RowFn row_fn) {
  const T* logits = static_cast<const T*>(a.logits);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t y = row_target(a, row);
    if (y == a.ignore_index) {
      write_ignored_row<T>(a, row);
      continue;
    }
    const float alpha = a.class_weight != nullptr ? a.class_weight[y] : 1.0f;
    const float gscale = a.grad_loss != nullptr ? alpha * a.grad_loss[row] : alpha;
    T* g = kGrad ? static_cast<T*>(a.grad) + row * a.num_classes : nullptr;
    row_fn(logits + row * a.row_stride, g, y, alpha, gscale, kLoss ? a.loss + row : nullptr);
  }
}

template <typename T, GammaCase kCase, bool kLoss, bool kGrad>
void focal_rows(const LossArgs& a, int64_t begin, int64_t end) {
  for_each_row<T, kLoss, kGrad>(a, begin, end, [&](const T* z, T* g, int64_t y, float alpha, float gscale,
                                                    float* loss) {
    focal_row<T, kCase, kLoss, kGrad>(z, g, a.num_classes, y, a.gamma, alpha, gscale, loss);
  });
}

template <typename T, GammaCase kCase>
void focal_rows_for_outputs(const LossArgs& a, int64_t begin, int64_t end) {
  if (a.loss != nullptr && a.grad != nullptr) {
    focal_rows<T, kCase, true, true>(a, begin, end);
  } else if (a.loss != nullptr) {
    focal_rows<T, kCase, true, false>(a, begin, end);
  } else {
    focal_rows<T, kCase, false, true>(a, begin, end);
  }
}

template <typename T>
void focal_rows_for_gamma(const LossArgs& a, int64_t begin, int64_t end) {
  switch (gamma_case(a.gamma)) {
    case GammaCase::kZero: return focal_rows_for_outputs<T, GammaCase::kZero>(a, begin, end);
    case GammaCase::kHalf: return focal_rows_for_outputs<T, GammaCase::kHalf>(a, begin, end);
    case GammaCase::kOne: return focal_rows_for_outputs<T, GammaCase::kOne>(a, begin, end);
    case GammaCase::kTwo: return focal_rows_for_outputs<T, GammaCase::kTwo>(a, begin, end);
    case GammaCase::kGeneral: return focal_rows_for_outputs<T, GammaCase::kGeneral>(a, begin, end);
  }
}

// ---- softmax cross entropy -----------------------------------------------------------------------------
// Pass 1 (one read of the row from memory): online log-sum-exp over blocks of kBlock elements. Each block
// is scanned for its maximum, then re-read from L1 to add exp(z - m_b) under the running maximum m_b; when
// a block raises it, the running sum is rescaled once by exp(m_old - m_new) (one exp per element overall,
// not the two of a per-element online update). The sum of z for label smoothing rides along.
// The target's own term is left out of the vector sum: s_rest = sum_{c != y} exp(z_c - m), and
// s = s_rest + exp(z_y - m) in double. Then 1 - p_y = s_rest / s keeps its digits when p_y is near 1
// (added to an fp32 lane holding exp(0) = 1, terms below 6e-8 would vanish and p_y - 1 with them).
//   lse = m + log s,  loss = alpha * (lse - (1 - eps) z_y - eps/C sum_c z_c)
// Gradient: when it is wanted, pass 1 also keeps every exp(z_c - m_b) in an fp32 row cache (L1/L2 sized:
// 4 C bytes) with its block's m_b. Pass 2 then needs no exp: p_c = exp(z_c - m_b) * exp(m_b - m) / s, the
// second factor once per block in double, so
//   g_c = gscale * (p_c - eps/C),  then the target column is rewritten as
//   g_y = gscale * (p_y - (1 - eps) - eps/C) = gscale * (eps (1 - 1/C) - s_rest / s),
// formed before any rounding to the logits' type. (Measured at (16, 8142) fp32 on one AVX-512 thread: the
// cache took the loss + gradient row from 0.93 to 0.65 ns per element; a second exp per element costs
// more than the cache traffic.) Each factor is exact to fp32 rounding and z_c - m_b is exact near the maximum,
// so for |z| ~ 1e4 the probabilities keep their digits (an fp32 lse, with its ulp of 1e-3, would not).
// A block whose running maximum was still -inf (every logit so far masked) cached exp(-inf) = 0 and gets
// the factor 0 / s (0, or NaN when s is NaN).
// NaN in the row makes s NaN (its exp term, or exp(z_y - m) for the target), hence lse, the loss and every
// gradient entry NaN. The maximum itself skips NaN (maxps(x, m) returns m when x is NaN): a plain max
// instead of at::vec::maximum, whose NaN handling goes through mask registers (slow on AVX-512, see
// vec_math.h). The scalar comparisons below still keep a NaN maximum should one arrive.

template <typename T>
inline float block_max(const T* z, int64_t begin, int64_t end, int64_t tail) {
  const Vec minus_inf(-std::numeric_limits<float>::infinity());
  Vec m = minus_inf;
  for (int64_t c = begin; c < end; c += kLanes) m = at::vec::clamp_min(m, load_vec(z + c));
  if (tail > 0) m = at::vec::clamp_min(m, Vec::set(minus_inf, load_vec_tail(z + end, tail), tail));
  float buf[kLanes];
  m.store(buf);
  float out = buf[0];
  for (int64_t i = 1; i < kLanes; ++i) out = (buf[i] > out || std::isnan(buf[i])) ? buf[i] : out;
  return out;
}

inline int64_t num_blocks(int64_t C) { return (C + kBlock - 1) / kBlock; }

// cache: C + num_blocks(C) floats of scratch when kGrad (the row's exp terms, then each block's m_b).
template <typename T, bool kLoss, bool kGrad>
inline void softmax_row(const T* z, T* g, int64_t C, int64_t y, float eps, float alpha, float gscale, float* loss,
                        float* cache) {
  const bool smoothing = kLoss && eps != 0.0f;
  const int64_t full = C - C % kLanes;
  const int64_t y_base = y - y % kLanes;
  const Vec zero(0.0f);
  const Vec y_lane = Vec::arange(0.0f, 1.0f) == Vec(static_cast<float>(y - y_base));
  constexpr float kMinusInf = -std::numeric_limits<float>::infinity();
  float* block_shift = kGrad ? cache + C : nullptr;  // m_b of each block, -inf while every logit was -inf
  float m = 0.0f;
  double s_rest = 0.0, sum_z = 0.0;
  for (int64_t block = 0; block < C; block += kBlock) {
    const int64_t block_end = std::min(block + kBlock, full);  // full vectors of this block
    const int64_t tail = block + kBlock >= C ? C - full : 0;   // the row's last partial vector, if here
    const float bm = block_max(z, block, block_end, tail);
    if (block == 0) {
      m = bm;
    } else if (bm > m || std::isnan(bm)) {
      s_rest *= std::exp(static_cast<double>(m) - static_cast<double>(bm));
      m = bm;
    }
    // While every logit so far is -inf (masked classes), m = -inf and z - m would be NaN; their exp
    // terms are 0, which exp(-inf - 0) gives. A later finite block then rescales s_rest = 0 harmlessly.
    const Vec vm(m == kMinusInf ? 0.0f : m);
    if constexpr (kGrad) block_shift[block / kBlock] = m;
    Vec acc(0.0f), acc_z(0.0f);
    for (int64_t c = block; c < block_end; c += kLanes) {
      prefetch(z + c, kBlock);  // the next block, while this one is in L1
      if constexpr (kGrad) prefetch_for_write(g + c);
      const Vec zc = load_vec(z + c);
      const Vec ez = exp_nonpositive(zc - vm);
      if constexpr (kGrad) ez.store(cache + c);
      acc = acc + (c == y_base ? Vec::blendv(ez, zero, y_lane) : ez);
      if (smoothing) acc_z = acc_z + zc;
    }
    if (tail > 0) {
      const Vec zc = load_vec_tail(z + block_end, tail);  // lanes >= tail read 0: masked out of the exp sum
      const Vec ez = Vec::set(zero, exp_nonpositive(zc - vm), tail);
      if constexpr (kGrad) ez.store(cache + block_end, tail);
      acc = acc + (block_end == y_base ? Vec::blendv(ez, zero, y_lane) : ez);
      if (smoothing) acc_z = acc_z + zc;
    }
    s_rest += sum_lanes(acc);
    if (smoothing) sum_z += sum_lanes(acc_z);
  }
  const double z_y = static_cast<double>(static_cast<float>(z[y]));
  const double s = s_rest + std::exp(z_y - m);
  if constexpr (kLoss) {
    const double e = eps;
    // lse - (1 - e) z_y - e/C sum z, with lse - z_y = log s - (z_y - m). The smoothing term only when
    // e != 0: 0 * z_y would turn the +inf loss of a target masked with -inf into NaN.
    double rows = std::log(s) - (z_y - m);
    if (smoothing) rows = rows + e * z_y - (e / static_cast<double>(C)) * sum_z;
    *loss = static_cast<float>(static_cast<double>(alpha) * rows);
  }
  if constexpr (kGrad) {
    const Vec shift(-gscale * (eps / static_cast<float>(C)));
    for (int64_t block = 0; block < C; block += kBlock) {
      const double m_b = block_shift[block / kBlock];
      const double factor = (m_b == kMinusInf ? 0.0 : std::exp(m_b - m)) / s;
      const Vec scale(static_cast<float>(static_cast<double>(gscale) * factor));
      const int64_t block_end = std::min(block + kBlock, full);
      for (int64_t c = block; c < block_end; c += kLanes) {
        store_vec(g + c, at::vec::fmadd(Vec::loadu(cache + c), scale, shift));
      }
      if (block + kBlock >= C && full < C) {
        const int64_t n = C - full;
        store_vec_tail(g + full, at::vec::fmadd(Vec::loadu(cache + full, n), scale, shift), n);
      }
    }
    const double e = eps;
    const double g_y = static_cast<double>(gscale) * (e * (1.0 - 1.0 / static_cast<double>(C)) - s_rest / s);
    g[y] = static_cast<T>(static_cast<float>(g_y));
  }
}

template <typename T, bool kLoss, bool kGrad>
void softmax_rows(const LossArgs& a, int64_t begin, int64_t end) {
  // One row cache per call of this function, i.e. per thread's share of rows.
  std::unique_ptr<float[]> cache(kGrad ? new float[a.num_classes + num_blocks(a.num_classes)] : nullptr);
  for_each_row<T, kLoss, kGrad>(a, begin, end, [&](const T* z, T* g, int64_t y, float alpha, float gscale,
                                                    float* loss) {
    softmax_row<T, kLoss, kGrad>(z, g, a.num_classes, y, a.label_smoothing, alpha, gscale, loss, cache.get());
  });
}

template <typename T>
void softmax_rows_for_outputs(const LossArgs& a, int64_t begin, int64_t end) {
  if (a.loss != nullptr && a.grad != nullptr) {
    softmax_rows<T, true, true>(a, begin, end);
  } else if (a.loss != nullptr) {
    softmax_rows<T, true, false>(a, begin, end);
  } else {
    softmax_rows<T, false, true>(a, begin, end);
  }
}

// ---- entry points of this ISA variant: <family>_rows for every family of common/families.h ----------
// (declared by rows.h's CBKERNELS_DECLARE_ROWS, which ops.cpp indexes by Family) ----------------------

void sigmoid_focal_rows(const LossArgs& a, int64_t begin, int64_t end) {
  switch (a.logits_dtype) {
    case Dtype::kFloat32: return focal_rows_for_gamma<float>(a, begin, end);
    case Dtype::kBFloat16: return focal_rows_for_gamma<c10::BFloat16>(a, begin, end);
    case Dtype::kFloat16: return focal_rows_for_gamma<c10::Half>(a, begin, end);
  }
}

void softmax_ce_rows(const LossArgs& a, int64_t begin, int64_t end) {
  switch (a.logits_dtype) {
    case Dtype::kFloat32: return softmax_rows_for_outputs<float>(a, begin, end);
    case Dtype::kBFloat16: return softmax_rows_for_outputs<c10::BFloat16>(a, begin, end);
    case Dtype::kFloat16: return softmax_rows_for_outputs<c10::Half>(a, begin, end);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cbkernels::cpu
