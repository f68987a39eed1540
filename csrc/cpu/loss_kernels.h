// Bodies of the fused CPU loss kernels (docs/op-contract.md; the math: docs/math.md, sections 5-7, 13 and 14).
//
// Included once by each per-ISA translation unit (loss_kernels.cpp, loss_kernels_avx2.cpp,
// loss_kernels_avx512.cpp); CPU_CAPABILITY names the variant, so the entry points and ATen's
// Vectorized<float> both land in a namespace of that name and the three copies never collide.
// exp, log1p and log come from vec_math.h: inline polynomials for the ranges used here (x <= 0, [0, 1]),
// a couple of ulp, NaN in NaN out; -ffast-math auto-vectorisation would give neither guarantee.
//
// Work split: the op wrappers (common/loss_ops.h) check everything and allocate, ops.cpp validates the
// class-index targets and runs at::parallel_for over rows; the functions here process a range of rows, one row
// at a time, the row's C logits in vectors, and check each dense target row before they compute it.
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

// The prefetches of a dense target row t (C values) at the vector at c, issued by the pass of a row's kernel
// that reads its targets: the row's own values kPrefetchAhead ahead (for_each_dense_row's sweep has just read
// them into the caches), and the next row's at c into the L2 cache only (locality 2: prefetcht1), one line per
// vector, for that row's sweep, which would otherwise wait on memory with nothing to overlap. Measured at
// (1024, 8142) fp32 on one AVX-512 thread, the L3 cache flushed before each call, forward with gradient, without
// and with the second: softmax CE 9.3 -> 9.0 ms, softmax focal (gamma 2) 10.2 -> 9.7 ms, sigmoid focal
// (gamma 0.5) 10.9 -> 9.4 ms. The next row of a thread's last is another thread's, or past the end of the
// targets: a wasted request, and prefetches never fault.
template <typename T>
C10_ALWAYS_INLINE void prefetch_targets(const T* t, int64_t c, int64_t C) {
  prefetch(t + c, kPrefetchAhead);
  __builtin_prefetch(reinterpret_cast<const char*>(t + C + c), 0, 2);
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

// ---- the logit adjustments (docs/op-contract.md) ---------------------------------------------------------
// z'_c = z_c + offset_c - [c == y] margin_y. The offset is added in fp32 right after each load (kOffset, a
// template flag: without it the loads are as before); the (C,) offset stays in cache across rows. The margin
// is subtracted in the target's lane of the target's vector, which every loop already handles apart: a per-row
// vector holding margin_y in that lane and +0 elsewhere (x - +0 = x, -0 included), all +0 without a margin.
template <bool kOffset, typename T>
C10_ALWAYS_INLINE Vec load_logits(const T* z, const float* offset, int64_t c) {
  if constexpr (kOffset) return load_vec(z + c) + Vec::loadu(offset + c);
  return load_vec(z + c);
}

// Lanes >= n read 0 (the offset's too).
template <bool kOffset, typename T>
C10_ALWAYS_INLINE Vec load_logits_tail(const T* z, const float* offset, int64_t c, int64_t n) {
  if constexpr (kOffset) return load_vec_tail(z + c, n) + Vec::loadu(offset + c, n);
  return load_vec_tail(z + c, n);
}

// The margin vector of a row whose target is in lane y - y_base of its vector.
inline Vec margin_vec(const LossArgs& a, int64_t y, int64_t y_base) {
  if (a.target_margin == nullptr) return Vec(0.0f);
  return Vec::blendv(Vec(0.0f), Vec(a.target_margin[y]), Vec::arange(0.0f, 1.0f) == Vec(static_cast<float>(y - y_base)));
}

// z'_y in fp32, as the vector lanes form it.
template <bool kOffset, typename T>
inline float adjusted_target_logit(const LossArgs& a, const T* z, int64_t y) {
  float z_y = static_cast<float>(z[y]);
  if constexpr (kOffset) z_y = z_y + a.logit_offset[y];
  return a.target_margin != nullptr ? z_y - a.target_margin[y] : z_y;
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

// Soft targets t in [0, 1] (dense targets; docs/math.md section 14.1):
//   bce = t softplus(-z) + (1 - t) softplus(z),  A = t softplus(z) + (1 - t) softplus(-z),
//   term = mod * bce, mod = exp(-gamma A) (1 for gamma = 0),
//   dterm/dz = mod * ((p - t) - gamma (t - q) bce),  p = sigmoid(z), q = sigmoid(-z)
// (d bce/dz = p - t, dA/dz = t - q, d mod/dz = -gamma mod dA/dz). Both bce and A, hence the term, are
// unchanged by (z, t) -> (-z, 1 - t), and the derivative changes sign. Lanes with t > 1/2 are evaluated
// there: with u = +-z and tau = t or 1 - t <= 1/2 (1 - t is exact for t >= 1/2),
//   bce = max(u, 0) - tau u + l,  A = tau u - min(u, 0) + l,  l = log1p(exp(-|u|)),
// each a sum of two non-negative terms (no cancellation: at |z| = 1e4 they are 1e4 (1 - tau) or 1e4 tau,
// or 0), and the derivative's p_u - tau and tau - q_u are differences of a tau <= 1/2 and a probability
// computed to full relative precision. At t = 1 this is the index path's u = z: p_u - tau = -q keeps its
// digits where p rounds to 1 (the form p - t would give 0 for every z above 17). e = exp(-|u|) serves the
// log1p and both probabilities, as in focal_terms. NaN z gives NaN (t is never NaN: for_each_dense_row checks it).
// Hard labels (t in {0, 1}, so tau = 0) make A = softplus(-u) and mod = sigmoid(u)^gamma: for the
// specialised gammas a vector whose every tau is 0 (multi-hot rows: all of them) takes the index path's
// sqrt, p or p * p instead of the exp (measured at (1024, 8142) fp32, gamma = 2, one AVX-512 thread: the
// forward with gradient of one-hot rows took 10.7 ms, of rows of 0.3, which take the exp, 13.8 ms).
template <GammaCase kCase>
C10_ALWAYS_INLINE void soft_focal_terms(const Vec& z, const Vec& t, const Vec& gamma, Vec& term, Vec& dterm_dz) {
  const Vec zero(0.0f), one(1.0f);
  const Vec flip = sign_mask(Vec(0.5f) - t);  // all ones where t > 1/2
  const Vec sign = flip & Vec(-0.0f);          // the sign bit there
  const Vec u = z ^ sign;
  const Vec tau = select(flip, one - t, t);
  const Vec e = exp_nonpositive(u.abs().neg());
  const Vec r = one / (one + e);
  const Vec l = log1p_unit(e);
  const Vec er = e * r;
  const Vec u_negative = sign_mask(u);
  const Vec p = select(u_negative, er, r);  // sigmoid(u)
  const Vec q = select(u_negative, r, er);  // sigmoid(-u)
  const Vec bce = at::vec::fnmadd(tau, u, at::vec::clamp_min(u, zero)) + l;
  Vec dterm_du;
  if constexpr (kCase != GammaCase::kZero) {
    Vec mod;
    if (kCase != GammaCase::kGeneral && all_at_most(tau, zero)) {
      if constexpr (kCase == GammaCase::kHalf) {
        mod = p.sqrt();
      } else if constexpr (kCase == GammaCase::kOne) {
        mod = p;
      } else {
        mod = p * p;
      }
    } else {
      const Vec A = at::vec::fmadd(tau, u, at::vec::clamp_min(u.neg(), zero)) + l;
      mod = exp_nonpositive((gamma * A).neg());
    }
    term = mod * bce;
    dterm_du = mod * at::vec::fnmadd(gamma * (tau - q), bce, p - tau);
  } else {
    term = bce;
    dterm_du = p - tau;
  }
  dterm_dz = dterm_du ^ sign;
}

// Loss (kLoss) and/or gradient (kGrad) of one row. alpha scales the loss; gscale the gradient
// (alpha in the forward op, alpha * grad_loss[row] in the backward op).
// offset: the logit offset when kOffset; element: the element weights, or nullptr.
// Index targets (kDense false): y and margin_y (margin_vec's: the target's vector is its own branch).
// Dense targets (kDense true): t, the row's targets; y and margin_y are unused.
template <typename T, GammaCase kCase, bool kDense, bool kLoss, bool kGrad, bool kOffset>
inline void focal_row(const T* z, const T* t, const float* offset, const float* element, const Vec& margin_y, T* g,
                      int64_t C, int64_t y, float gamma_f, float alpha, float gscale, float* loss) {
  const Vec gamma(gamma_f), scale(gscale), zero(0.0f), one(1.0f), minus_one(-1.0f);
  // The target's vector gets t = +1 in the target's lane; every other vector has t = -1 throughout.
  const int64_t y_base = y - y % kLanes;
  const Vec t_y = Vec::blendv(minus_one, one, Vec::arange(0.0f, 1.0f) == Vec(static_cast<float>(y - y_base)));
  const auto terms = [&](const Vec& zc, int64_t c, const Vec& tc, Vec& term, Vec& dz) {
    if constexpr (kDense) {
      soft_focal_terms<kCase>(zc, tc, gamma, term, dz);
    } else {
      focal_terms<kCase>(c == y_base ? zc - margin_y : zc, c == y_base ? t_y : minus_one, gamma, term, dz);
    }
  };
  const int64_t full = C - C % kLanes;
  double total = 0.0;
  Vec term, dz;
  for (int64_t block = 0; block < full; block += kBlock) {
    const int64_t block_end = std::min(block + kBlock, full);
    Vec acc(0.0f);
    for (int64_t c = block; c < block_end; c += kLanes) {
      prefetch(z + c, kPrefetchAhead);
      if constexpr (kDense) prefetch_targets(t, c, C);
      terms(load_logits<kOffset>(z, offset, c), c, kDense ? load_vec(t + c) : zero, term, dz);
      // Element weights: a runtime test, not an instance of its own (a predicted branch per vector).
      if (element != nullptr) {
        const Vec ec = Vec::loadu(element + c);
        if constexpr (kLoss) acc = at::vec::fmadd(term, ec, acc);
        if constexpr (kGrad) store_vec(g + c, dz * (scale * ec));
      } else {
        if constexpr (kLoss) acc = acc + term;
        if constexpr (kGrad) store_vec(g + c, dz * scale);
      }
    }
    if constexpr (kLoss) total += sum_lanes(acc);
  }
  if (full < C) {
    const int64_t n = C - full;
    terms(load_logits_tail<kOffset>(z, offset, full, n), full, kDense ? load_vec_tail(t + full, n) : zero, term, dz);
    const Vec ec = element != nullptr ? Vec::loadu(element + full, n) : one;
    if constexpr (kLoss) total += sum_lanes(Vec::set(zero, term * ec, n));  // lanes >= n hold term(0) != 0
    if constexpr (kGrad) store_vec_tail(g + full, dz * (scale * ec), n);
  }
  if constexpr (kLoss) *loss = static_cast<float>(static_cast<double>(alpha) * total);
}

// The row loop of index targets, every family's: ignored rows get zeros, the others their alpha = alpha_y (times
// element_weight[y] when fold_element: the softmax families without smoothing, whose only term is the target's;
// times sample_weight[row] when given), the gradient scale alpha * grad_loss[row] (alpha alone in forward) and
// their output pointers, then row_fn does the math.
template <typename T, bool kLoss, bool kGrad, typename RowFn>
void for_each_row(const LossArgs& a, int64_t begin, int64_t end, bool fold_element, RowFn row_fn) {
  const T* logits = static_cast<const T*>(a.logits);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t y = row_target(a, row);
    if (y == a.ignore_index) {
      write_ignored_row<T>(a, row);
      continue;
    }
    float alpha = a.class_weight != nullptr ? a.class_weight[y] : 1.0f;
    if (fold_element) alpha *= a.element_weight[y];
    if (a.sample_weight != nullptr) alpha *= a.sample_weight[row];
    const float gscale = a.grad_loss != nullptr ? alpha * a.grad_loss[row] : alpha;
    T* g = kGrad ? static_cast<T*>(a.grad) + row * a.num_classes : nullptr;
    row_fn(logits + row * a.row_stride, g, y, alpha, gscale, kLoss ? a.loss + row : nullptr);
  }
}

// The upper end of a family's dense target values (common/loss_ops.h: dense_target_in_range; the lower end is 0):
// a probability per one-vs-all task for the sigmoid family, any value >= 0 for the softmax families.
constexpr float kSigmoidTargetLimit = 1.0f;
constexpr float kSoftmaxTargetLimit = std::numeric_limits<float>::infinity();

// The sweep of a dense row's C targets before the row is computed: whether every value is in [0, limit]
// (NaN is not: two compares per vector, x <= limit and -x <= 0; -0 passes as 0 does, NaN fails both), and
// with class weights w (else nullptr) the row weight's sum_c t_c w_c (docs/math.md 14.3) into weight: every
// product is >= 0, fp32 lanes over blocks of kBlock, the blocks in double.
template <typename T>
inline bool sweep_dense_row(const T* t, const float* w, int64_t C, float limit, double& weight) {
  const Vec upper(limit), zero(0.0f);
  const auto in_range = [&](const Vec& v) { return all_at_most(v, upper) && all_at_most(v.neg(), zero); };
  const int64_t full = C - C % kLanes;
  double total = 0.0;
  for (int64_t block = 0; block < full; block += kBlock) {
    const int64_t block_end = std::min(block + kBlock, full);
    Vec acc(0.0f);
    for (int64_t c = block; c < block_end; c += kLanes) {
      prefetch(t + c, kPrefetchAhead);
      const Vec v = load_vec(t + c);
      if (!in_range(v)) return false;
      if (w != nullptr) acc = at::vec::fmadd(v, Vec::loadu(w + c), acc);
    }
    total += sum_lanes(acc);
  }
  if (full < C) {
    const Vec v = load_vec_tail(t + full, C - full);  // lanes >= C - full read 0, which is in range
    if (!in_range(v)) return false;
    if (w != nullptr) total += sum_lanes(v * Vec::loadu(w + full, C - full));
  }
  weight = total;
  return true;
}

// The row loop of dense targets: no row is ignored. Each row's targets are swept first (sweep_dense_row): a
// value outside [0, limit] stops the loop, which returns false (ops.cpp then raises, naming the first bad value;
// the rows before it were written, and the outputs are discarded with the error); true when every row was
// computed. alpha is the row weight a = sample_weight[row] * sum_c t_c w_c (without class weights: the sample
// weight, or 1), gscale and the outputs as for_each_row's. The sweep finds the row in the L2 cache, where
// row_fn's previous row put it (prefetch_targets), and leaves it in the L1 cache for row_fn.
template <typename T, bool kLoss, bool kGrad, typename RowFn>
bool for_each_dense_row(const LossArgs& a, int64_t begin, int64_t end, float limit, RowFn row_fn) {
  const T* logits = static_cast<const T*>(a.logits);
  const T* target = static_cast<const T*>(a.target);
  const int64_t C = a.num_classes;
  for (int64_t row = begin; row < end; ++row) {
    const T* t = target + row * C;
    double weight = 1.0;
    if (!sweep_dense_row(t, a.class_weight, C, limit, weight)) return false;
    float alpha = a.sample_weight != nullptr ? a.sample_weight[row] : 1.0f;
    if (a.class_weight != nullptr) alpha = static_cast<float>(alpha * weight);
    const float gscale = a.grad_loss != nullptr ? alpha * a.grad_loss[row] : alpha;
    T* g = kGrad ? static_cast<T*>(a.grad) + row * C : nullptr;
    row_fn(logits + row * a.row_stride, t, g, alpha, gscale, kLoss ? a.loss + row : nullptr);
  }
  return true;
}

template <typename T, GammaCase kCase, bool kDense, bool kLoss, bool kGrad, bool kOffset>
bool focal_rows(const LossArgs& a, int64_t begin, int64_t end) {
  if constexpr (kDense) {
    return for_each_dense_row<T, kLoss, kGrad>(a, begin, end, kSigmoidTargetLimit, [&](const T* z, const T* t, T* g,
                                                                                      float alpha, float gscale,
                                                                                      float* loss) {
      focal_row<T, kCase, true, kLoss, kGrad, kOffset>(z, t, a.logit_offset, a.element_weight, Vec(0.0f), g,
                                                       a.num_classes, 0, a.gamma, alpha, gscale, loss);
    });
  } else {
    for_each_row<T, kLoss, kGrad>(a, begin, end, false, [&](const T* z, T* g, int64_t y, float alpha, float gscale,
                                                             float* loss) {
      focal_row<T, kCase, false, kLoss, kGrad, kOffset>(z, nullptr, a.logit_offset, a.element_weight,
                                                        margin_vec(a, y, y - y % kLanes), g, a.num_classes, y, a.gamma,
                                                        alpha, gscale, loss);
    });
    return true;
  }
}

template <typename T, GammaCase kCase, bool kDense, bool kOffset>
bool focal_rows_for_outputs(const LossArgs& a, int64_t begin, int64_t end) {
  if (a.loss != nullptr && a.grad != nullptr) return focal_rows<T, kCase, kDense, true, true, kOffset>(a, begin, end);
  if (a.loss != nullptr) return focal_rows<T, kCase, kDense, true, false, kOffset>(a, begin, end);
  return focal_rows<T, kCase, kDense, false, true, kOffset>(a, begin, end);
}

template <typename T, bool kDense, bool kOffset>
bool focal_rows_for_gamma(const LossArgs& a, int64_t begin, int64_t end) {
  switch (gamma_case(a.gamma)) {
    case GammaCase::kZero: return focal_rows_for_outputs<T, GammaCase::kZero, kDense, kOffset>(a, begin, end);
    case GammaCase::kHalf: return focal_rows_for_outputs<T, GammaCase::kHalf, kDense, kOffset>(a, begin, end);
    case GammaCase::kOne: return focal_rows_for_outputs<T, GammaCase::kOne, kDense, kOffset>(a, begin, end);
    case GammaCase::kTwo: return focal_rows_for_outputs<T, GammaCase::kTwo, kDense, kOffset>(a, begin, end);
    case GammaCase::kGeneral: return focal_rows_for_outputs<T, GammaCase::kGeneral, kDense, kOffset>(a, begin, end);
  }
  return false;
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

// The maximum of the adjusted logits z' of a block: the target's vector, when here, is taken apart with its
// margin (a branch per block), so that the maximum is z''s and s >= 1 as without adjustments.
template <bool kOffset, typename T>
inline float block_max(const T* z, const float* offset, int64_t begin, int64_t end, int64_t tail, int64_t y_base,
                       const Vec& margin_y) {
  const Vec minus_inf(-std::numeric_limits<float>::infinity());
  Vec m = minus_inf;
  const auto scan = [&](int64_t from, int64_t to) {
    for (int64_t c = from; c < to; c += kLanes) m = at::vec::clamp_min(m, load_logits<kOffset>(z, offset, c));
  };
  if (y_base >= begin && y_base < end) {
    scan(begin, y_base);
    m = at::vec::clamp_min(m, load_logits<kOffset>(z, offset, y_base) - margin_y);
    scan(y_base + kLanes, end);
  } else {
    scan(begin, end);
  }
  if (tail > 0) {
    const Vec zc = load_logits_tail<kOffset>(z, offset, end, tail);
    m = at::vec::clamp_min(m, Vec::set(minus_inf, end == y_base ? zc - margin_y : zc, tail));
  }
  float buf[kLanes];
  m.store(buf);
  float out = buf[0];
  for (int64_t i = 1; i < kLanes; ++i) out = (buf[i] > out || std::isnan(buf[i])) ? buf[i] : out;
  return out;
}

inline int64_t num_blocks(int64_t C) { return (C + kBlock - 1) / kBlock; }

// ---- per-class coefficients of the softmax losses (docs/math.md 14.2) --------------------------------------
// Row i's class c enters with u_c = a_i k_c, k_c = e_c ((1 - eps) q_c + eps/C). How the kernels form k_c:
//   kOneHot:  a class index without element weights: two constants, (1 - eps) + eps/C for the target and
//             eps/C for the rest (the kernels' scalar paths). With element weights and eps = 0 too: the
//             target's term alone remains, and for_each_row folds e_y into a (fold_element).
//   kElement: a class index with element weights, eps > 0: k_c = e_c eps/C off the target; the vectors
//             carry e_c, the constant is applied per row.
//   kDense:   a dense target: k_c = e_c ((1 - eps) t_c + eps/C) per class (e_c = 1 without element weights).
enum class Coef { kOneHot, kElement, kDense };

// The vector part of k_c for kElement (e_c) and kDense (all of it); unused for kOneHot.
template <typename T, Coef kCoef>
struct Coefficients {
  const T* t = nullptr;        // kDense: the row's targets
  const float* e = nullptr;    // element weights; kDense: or nullptr
  float c1 = 0.0f, c0 = 0.0f;  // kDense: (1 - eps) and eps/C

  C10_ALWAYS_INLINE Vec at(int64_t c) const {
    if constexpr (kCoef == Coef::kElement) {
      return Vec::loadu(e + c);
    } else {
      const Vec k = at::vec::fmadd(load_vec(t + c), Vec(c1), Vec(c0));
      return e != nullptr ? k * Vec::loadu(e + c) : k;
    }
  }

  // The n < kLanes classes at c; lanes >= n read 0.
  Vec tail(int64_t c, int64_t n) const {
    if constexpr (kCoef == Coef::kElement) {
      return Vec::loadu(e + c, n);
    } else {
      const Vec k = at::vec::fmadd(load_vec_tail(t + c, n), Vec(c1), Vec(c0));
      return Vec::set(Vec(0.0f), e != nullptr ? k * Vec::loadu(e + c, n) : k, n);
    }
  }

  // Class c's, as at()'s lanes form it.
  float scalar(int64_t c) const {
    if constexpr (kCoef == Coef::kElement) {
      return e[c];
    } else {
      const float k = std::fma(static_cast<float>(t[c]), c1, c0);
      return e != nullptr ? k * e[c] : k;
    }
  }
};

// The first class of [begin, end) whose adjusted logit equals m, the maximum of that range; begin when there
// is none (m NaN; the row's sums are NaN then, whichever class is taken apart) or every logit is -inf.
// Vectors whose every lane is below m (at most the float below it) are skipped whole.
template <bool kOffset, typename T>
inline int64_t first_max(const T* z, const float* offset, int64_t begin, int64_t end, float m) {
  if (!(m > -std::numeric_limits<float>::infinity())) return begin;
  const Vec below(std::nextafter(m, -std::numeric_limits<float>::infinity()));
  int64_t c = begin;
  while (c + kLanes <= end && all_at_most(load_logits<kOffset>(z, offset, c), below)) c += kLanes;
  for (; c < end; ++c) {
    const float zc = kOffset ? static_cast<float>(z[c]) + offset[c] : static_cast<float>(z[c]);
    if (zc == m) return c;
  }
  return begin;
}

// What pass 1 leaves for the rest of the row: the maximum m; the class y taken apart (the target for index
// targets; for dense targets the top class, the first with z_y = m); s_rest = sum_{c != y} exp(z_c - m), the
// logit z_y, d = z_y - m, e_y = exp(d), s = s_rest + e_y; sum_c z_c when asked for (else 0); with the
// coefficients (kElement, kDense, when asked for; else 0) k_rest = sum_{c != y} k_c and
// d_rest = sum_{c != y} k_c (z_c - m) <= 0.
struct SoftmaxSums {
  float m;
  double s_rest, z_y, d, e_y, s, sum_z;
  int64_t y;
  double k_rest, d_rest;
};

// Work of another row that pass 1 interleaves with its own: overlap.block(b) at the start of block b, before
// pass 1 overwrites that block's shift in the cache, and overlap.vector(c, n) for the n <= kLanes elements
// at c, before pass 1 overwrites their exp terms. NoOverlap: none (softmax_focal_smoothed_rows has one).
struct NoOverlap {
  void block(int64_t) {}
  void vector(int64_t, int64_t) {}
};

// Pass 1. kCache: cache gets the row's exp terms (C floats) and each block's m_b (num_blocks(C) floats
// after them). kGrad: g is the row's gradient, whose lines are requested for writing as the pass goes.
// Everything here is of the adjusted logits z' (kOffset: a.logit_offset is set): the cached exp terms, the
// maximum, sum_z and z_y; later passes that re-read z add the offset again (the target's lane is never used).
// sums: the coefficients whose k_rest and d_rest to accumulate, or nullptr. d_rest is kept relative to the
// running maximum as s_rest is: when a block raises it from m to m', d_rest += k_rest (m - m'); so the terms
// z_c - m (exact near the maximum) keep their digits at |z| ~ 1e4, where sum_c k_c z_c - m sum_c k_c would not.
// Dense targets (kCoef = kDense) have no target to take apart; the top class is, so that 1 - p_top =
// s_rest / s keeps its digits as 1 - p_y does for a class index (a confident row's gradient there is
// U p_top - u_top, tiny against either term). The top moves only when a block raises the maximum: first_max
// finds it in that block before the block's exp loop, and the previous top, whose term exp(0) = 1 was left
// out, joins s_rest (and k_rest, d_rest) with the rescaled value exp(m - m').
template <typename T, bool kCache, bool kGrad, bool kOffset, Coef kCoef = Coef::kOneHot, typename Overlap = NoOverlap>
inline SoftmaxSums softmax_sums(const LossArgs& a, const T* z, T* g, int64_t y, bool with_sum_z,
                                const Coefficients<T, kCoef>* sums, float* cache, Overlap&& overlap = Overlap()) {
  constexpr bool kTop = kCoef == Coef::kDense;
  const int64_t C = a.num_classes;
  const float* offset = a.logit_offset;
  const int64_t full = C - C % kLanes;
  int64_t y_base = y - y % kLanes;
  const Vec margin_y = margin_vec(a, y, y_base);  // dense targets: no margin, zeros
  const Vec zero(0.0f);
  const auto lane_of = [](int64_t lane) { return Vec::arange(0.0f, 1.0f) == Vec(static_cast<float>(lane)); };
  Vec y_lane = lane_of(y - y_base);
  constexpr float kMinusInf = -std::numeric_limits<float>::infinity();
  float* block_shift = kCache ? cache + C : nullptr;  // m_b of each block, -inf while every logit was -inf
  float m = 0.0f;
  double s_rest = 0.0, sum_z = 0.0, k_rest = 0.0, d_rest = 0.0;
  for (int64_t block = 0; block < C; block += kBlock) {
    const int64_t block_end = std::min(block + kBlock, full);  // full vectors of this block
    const int64_t tail = block + kBlock >= C ? C - full : 0;   // the row's last partial vector, if here
    const float bm = block_max<kOffset>(z, offset, block, block_end, tail, y_base, margin_y);
    const bool raised = block == 0 || bm > m || std::isnan(bm);
    if (block == 0) {
      m = bm;
    } else if (raised) {
      const double shift = static_cast<double>(m) - static_cast<double>(bm);
      const double rescale = std::exp(shift);
      s_rest *= rescale;
      if constexpr (kCoef != Coef::kOneHot) {
        if (sums != nullptr) d_rest += k_rest * shift;
      }
      if constexpr (kTop) {
        s_rest += rescale;
        if (sums != nullptr) {
          const double k_top = sums->scalar(y);
          k_rest += k_top;
          d_rest += k_top * shift;
        }
      }
      m = bm;
    }
    if constexpr (kTop) {
      if (raised) {
        y = first_max<kOffset>(z, offset, block, block_end + tail, bm);
        y_base = y - y % kLanes;
        y_lane = lane_of(y - y_base);
      }
    }
    // While every logit so far is -inf (masked classes), m = -inf and z - m would be NaN; their exp
    // terms are 0, which exp(-inf - 0) gives. A later finite block then rescales s_rest = 0 harmlessly.
    const Vec vm(m == kMinusInf ? 0.0f : m);
    overlap.block(block);
    if constexpr (kCache) block_shift[block / kBlock] = m;
    Vec acc(0.0f), acc_z(0.0f), acc_k(0.0f), acc_d(0.0f);
    // The coefficients' sums of k (lanes >= n of a tail read k = 0) and k (z - m), the class y left out
    // (its z - m zeroed too: a target masked with -inf must not give 0 * -inf).
    const auto add_sums = [&](int64_t c, const Vec& k, const Vec& x) {
      if constexpr (kCoef != Coef::kOneHot) {
        const bool is_y = c == y_base;
        const Vec k_c = is_y ? Vec::blendv(k, zero, y_lane) : k;
        acc_k = acc_k + k_c;
        acc_d = at::vec::fmadd(k_c, is_y ? Vec::blendv(x, zero, y_lane) : x, acc_d);
      }
    };
    for (int64_t c = block; c < block_end; c += kLanes) {
      prefetch(z + c, kBlock);  // the next block, while this one is in L1
      if constexpr (kGrad) prefetch_for_write(g + c);
      Vec zc = load_logits<kOffset>(z, offset, c);
      if (c == y_base) zc = zc - margin_y;
      const Vec x = zc - vm;
      const Vec ez = exp_nonpositive(x);
      overlap.vector(c, kLanes);
      if constexpr (kCache) ez.store(cache + c);
      acc = acc + (c == y_base ? Vec::blendv(ez, zero, y_lane) : ez);
      if (with_sum_z) acc_z = acc_z + zc;
      if constexpr (kCoef != Coef::kOneHot) {
        if (sums != nullptr) {
          if constexpr (kTop) prefetch_targets(sums->t, c, C);
          add_sums(c, sums->at(c), x);
        }
      }
    }
    if (tail > 0) {
      Vec zc = load_logits_tail<kOffset>(z, offset, block_end, tail);  // lanes >= tail read 0: masked out of the exp sum
      if (block_end == y_base) zc = zc - margin_y;
      const Vec x = zc - vm;
      const Vec ez = Vec::set(zero, exp_nonpositive(x), tail);
      overlap.vector(block_end, tail);
      if constexpr (kCache) ez.store(cache + block_end, tail);
      acc = acc + (block_end == y_base ? Vec::blendv(ez, zero, y_lane) : ez);
      if (with_sum_z) acc_z = acc_z + zc;
      if constexpr (kCoef != Coef::kOneHot) {
        if (sums != nullptr) add_sums(block_end, sums->tail(block_end, tail), x);
      }
    }
    s_rest += sum_lanes(acc);
    if (with_sum_z) sum_z += sum_lanes(acc_z);
    if constexpr (kCoef != Coef::kOneHot) {
      if (sums != nullptr) {
        k_rest += sum_lanes(acc_k);
        d_rest += sum_lanes(acc_d);
      }
    }
  }
  const double z_y = static_cast<double>(adjusted_target_logit<kOffset>(a, z, y));
  const double e_y = std::exp(z_y - m);
  return {m, s_rest, z_y, z_y - m, e_y, s_rest + e_y, sum_z, y, k_rest, d_rest};
}

// p_c = cache_c * block_factor for the cached exp terms of a block whose shift was m_b.
inline double block_factor(float m_b, const SoftmaxSums& r) {
  return (m_b == -std::numeric_limits<float>::infinity() ? 0.0 : std::exp(static_cast<double>(m_b) - r.m)) / r.s;
}

// The outcome of a row of the single-pass softmax losses, per unit of alpha (loss) and of gscale
// (gradient): g_c = grad_scale * p_c + grad_shift off the class y taken apart (times k_c for kElement and
// kDense), g_y = grad_target.
struct SoftmaxRowScalars {
  double loss;
  double grad_scale;
  float grad_shift;
  double grad_target;
};

// One row of a single-pass softmax loss: pass 1, then `finish(sums, with_loss)` gives the row's scalars
// (with_loss false: its loss is not used), then, for the gradient, pass 2 over the cache.
// cache: C + num_blocks(C) floats of scratch when kGrad. coef: the coefficients (kElement, kDense; else
// nullptr), summed by pass 1 and multiplying grad_shift.
template <typename T, bool kLoss, bool kGrad, bool kOffset, Coef kCoef, typename Finish>
inline void softmax_row(const LossArgs& a, const T* z, T* g, int64_t y, bool with_sum_z,
                        const Coefficients<T, kCoef>* coef, float alpha, float gscale, float* loss, float* cache,
                        Finish finish) {
  const int64_t C = a.num_classes;
  const SoftmaxSums r = softmax_sums<T, kGrad, kGrad, kOffset, kCoef>(a, z, g, y, with_sum_z, coef, cache);
  const SoftmaxRowScalars k = finish(r, kLoss);
  if constexpr (kLoss) *loss = static_cast<float>(static_cast<double>(alpha) * k.loss);
  if constexpr (kGrad) {
    const int64_t full = C - C % kLanes;
    const double row_scale = static_cast<double>(gscale) * k.grad_scale;
    const Vec shift(gscale * k.grad_shift);
    for (int64_t block = 0; block < C; block += kBlock) {
      const Vec scale(static_cast<float>(row_scale * block_factor(cache[C + block / kBlock], r)));
      const int64_t block_end = std::min(block + kBlock, full);
      for (int64_t c = block; c < block_end; c += kLanes) {
        Vec shift_c = shift;
        if constexpr (kCoef != Coef::kOneHot) shift_c = shift * coef->at(c);
        store_vec(g + c, at::vec::fmadd(Vec::loadu(cache + c), scale, shift_c));
      }
      if (block + kBlock >= C && full < C) {
        const int64_t n = C - full;
        Vec shift_c = shift;
        if constexpr (kCoef != Coef::kOneHot) shift_c = shift * coef->tail(full, n);
        store_vec_tail(g + full, at::vec::fmadd(Vec::loadu(cache + full, n), scale, shift_c), n);
      }
    }
    g[r.y] = static_cast<T>(static_cast<float>(static_cast<double>(gscale) * k.grad_target));
  }
}

// The cross entropy's scalars (section 6): loss lse - (1 - eps) z_y - eps/C sum z = log s - d + eps z_y -
// eps/C sum z, g_c = p_c - eps/C, g_y = eps (1 - 1/C) - s_rest / s (section 7).
inline SoftmaxRowScalars softmax_ce_scalars(const SoftmaxSums& r, bool with_loss, float eps, int64_t C) {
  const double e = eps;
  double loss = 0.0;
  if (with_loss) {
    // The smoothing term only when e != 0: 0 * z_y would turn the +inf loss of a target masked with -inf
    // into NaN.
    loss = std::log(r.s) - r.d;
    if (eps != 0.0f) loss = loss + e * r.z_y - (e / static_cast<double>(C)) * r.sum_z;
  }
  return {loss, 1.0, -(eps / static_cast<float>(C)), e * (1.0 - 1.0 / static_cast<double>(C)) - r.s_rest / r.s};
}

// The cross entropy's scalars with per-class coefficients (docs/math.md 14.2): the class y taken apart has
// u_y = a k_y, the others u_c = a W k_c (kElement: k_y = (1 - eps + eps/C) e_y, W = eps/C; kDense: k_y its
// coefficient, W = 1), with pass 1's k_rest and d_rest. Per unit of a, U = k_y + W k_rest and
//   loss = sum_c u_c (log s - (z_c - m)) = k_y (log s - d) + W (k_rest log s - d_rest)  (terms >= 0),
//   g_c = U p_c - W k_c,   g_y = U p_y - k_y = p_y W k_rest - k_y q_y,  q_y = s_rest / s (no 1 - p_y).
inline SoftmaxRowScalars weighted_softmax_ce_scalars(const SoftmaxSums& r, bool with_loss, double k_y, double W) {
  const double log_s = std::log(r.s);
  const double loss = with_loss ? k_y * (log_s - r.d) + W * (r.k_rest * log_s - r.d_rest) : 0.0;
  return {loss, k_y + W * r.k_rest, static_cast<float>(-W), (r.e_y / r.s) * W * r.k_rest - k_y * (r.s_rest / r.s)};
}

// The kernels' coefficient case of a softmax call (Coef).
inline Coef softmax_coef(const LossArgs& a) {
  if (a.dense_target) return Coef::kDense;
  return a.element_weight != nullptr && a.label_smoothing != 0.0f ? Coef::kElement : Coef::kOneHot;
}

// Runs row_fn(z, t, g, y, alpha, gscale, loss) on every row of a softmax family's call with kCoef: the index
// rows of for_each_row (t nullptr; fold_element for kOneHot) or the dense rows of for_each_dense_row (y 0: the
// row's y is its top class, found by pass 1). Returns for_each_dense_row's verdict on the targets (true for
// class indices).
template <typename T, bool kLoss, bool kGrad, Coef kCoef, typename RowFn>
bool for_each_softmax_row(const LossArgs& a, int64_t begin, int64_t end, RowFn row_fn) {
  if constexpr (kCoef == Coef::kDense) {
    return for_each_dense_row<T, kLoss, kGrad>(a, begin, end, kSoftmaxTargetLimit, [&](const T* z, const T* t, T* g,
                                                                                      float alpha, float gscale,
                                                                                      float* loss) {
      row_fn(z, t, g, 0, alpha, gscale, loss);
    });
  } else {
    const bool fold_element = kCoef == Coef::kOneHot && a.element_weight != nullptr;
    for_each_row<T, kLoss, kGrad>(a, begin, end, fold_element, [&](const T* z, T* g, int64_t y, float alpha,
                                                                    float gscale, float* loss) {
      row_fn(z, static_cast<const T*>(nullptr), g, y, alpha, gscale, loss);
    });
    return true;
  }
}

template <typename T, bool kLoss, bool kGrad, bool kOffset, Coef kCoef>
bool softmax_rows(const LossArgs& a, int64_t begin, int64_t end) {
  // One row cache per call of this function, i.e. per thread's share of rows.
  std::unique_ptr<float[]> cache(kGrad ? new float[a.num_classes + num_blocks(a.num_classes)] : nullptr);
  const float eps = a.label_smoothing;
  const double w = static_cast<double>(eps) / static_cast<double>(a.num_classes);
  const bool with_sum_z = kCoef == Coef::kOneHot && kLoss && eps != 0.0f;
  return for_each_softmax_row<T, kLoss, kGrad, kCoef>(a, begin, end, [&](const T* z, const T* t, T* g, int64_t y,
                                                                          float alpha, float gscale, float* loss) {
    if constexpr (kCoef == Coef::kOneHot) {
      softmax_row<T, kLoss, kGrad, kOffset, kCoef>(a, z, g, y, with_sum_z, nullptr, alpha, gscale, loss, cache.get(),
                                                   [&](const SoftmaxSums& r, bool with_loss) {
                                                     return softmax_ce_scalars(r, with_loss, eps, a.num_classes);
                                                   });
    } else {
      const Coefficients<T, kCoef> coef{t, a.element_weight, 1.0f - eps, static_cast<float>(w)};
      softmax_row<T, kLoss, kGrad, kOffset, kCoef>(
          a, z, g, y, false, &coef, alpha, gscale, loss, cache.get(), [&](const SoftmaxSums& r, bool with_loss) {
            return kCoef == Coef::kDense
                       ? weighted_softmax_ce_scalars(r, with_loss, coef.scalar(r.y), 1.0)
                       : weighted_softmax_ce_scalars(r, with_loss, (1.0 - eps + w) * coef.scalar(r.y), w);
          });
    }
  });
}

template <typename T, bool kOffset, Coef kCoef>
bool softmax_rows_for_outputs(const LossArgs& a, int64_t begin, int64_t end) {
  if (a.loss != nullptr && a.grad != nullptr) return softmax_rows<T, true, true, kOffset, kCoef>(a, begin, end);
  if (a.loss != nullptr) return softmax_rows<T, true, false, kOffset, kCoef>(a, begin, end);
  return softmax_rows<T, false, true, kOffset, kCoef>(a, begin, end);
}

// ---- softmax focal loss ----------------------------------------------------------------------------------
// docs/math.md section 13. Per row, with p = softmax(z), q_c = 1 - p_c, l_c = -log p_c, mod_c = q_c^gamma,
// w = eps / C and F_c = -h_c = mod_c (1 + gamma p_c l_c / q_c) >= 0 (section 13's h with the sign that
// makes it positive; F_y is 13.2's F):
//   loss = alpha ((1 - eps) mod_y l_y + w sum_c mod_c l_c),
//   grad_j = gscale (p_j Phi - w F_j) - gscale (1 - eps) F_y [j == y],   Phi = -G = (1 - eps) F_y + w sum_c F_c.
// gamma = 0 is the cross entropy, and runs its kernel. eps = 0 leaves only the target's terms: the cross
// entropy's passes with its per-row scalars replaced (loss mod_y l_y, gradient times F_y; 13.2).
// eps > 0 takes three passes (13.3): pass 1 as the cross entropy's, caching exp(z_c - m_b); pass 2 sums
// mod_c l_c and F_c from the cache and z (no second exp of z), caching F_c when the gradient is wanted;
// pass 3 writes the gradient from the two caches, interleaved with the next row's pass 1 (FocalGradient).
// In both cases the target's own terms are the double scalars of focal_target, left out of the vector sums
// and written over the vector pass's g_y. Element weights with eps > 0 and dense targets (any eps) take
// the three passes with a coefficient per class (docs/math.md 14.2; softmax_focal_smoothed_pass2), a dense
// row's top class in the target's place.

// The target's terms, from pass 1's split (sections 7 and 13.2); none is formed as 1 - p_y, so a confident
// row keeps them to full relative precision. With x = s_rest / e_y:
//   q_y = s_rest / s, p_y = e_y / s, mod_y = q_y^gamma,
//   l_y = log1p(x); for d < -1 the equal log s - d instead, which cannot overflow as x can and keeps its
//     digits as a sum of two terms >= 0 (s >= 1: the maximum's own term is exp(0) = 1),
//   p_y l_y / q_y = log1p(x) / x = l_y e_y / s_rest, taken at its limit 1 for s_rest = 0,
//   F = mod_y (1 + gamma p_y l_y / q_y).
// NaN in the row makes s, hence l_y, mod_y and F, NaN. A target masked with -inf has loss +inf and F =
// inf * 0 = NaN (e_y = 0, l_y = inf), as the reference's gradient.
struct FocalTarget {
  double p, q, l, mod, F;
};

inline FocalTarget focal_target(const SoftmaxSums& r, float gamma) {
  const double q = r.s_rest / r.s;
  const double l = r.d >= -1.0 ? std::log1p(r.s_rest / r.e_y) : std::log(r.s) - r.d;
  const double l_over_x = r.s_rest == 0.0 ? 1.0 : l * r.e_y / r.s_rest;
  const double mod = std::pow(q, static_cast<double>(gamma));
  return {r.e_y / r.s, q, l, mod, mod * (1.0 + static_cast<double>(gamma) * l_over_x)};
}

// Most classes of a row have a small p (all but a few when C is large), and there a power series replaces
// the general gamma's log, exp and two divisions (about 60 vector operations per vector of classes, against
// 15). With r = (1 - p)^(gamma - 1) = mod / q,
//   mod = r (1 - p),   F = mod + gamma p l r,
// and r = sum_k binom(gamma - 1, k) (-p)^k, cut after p^5. For p <= 2^-6 and gamma - 1 in [-1, 7], every
// |binom(gamma - 1, k)| <= 7 for k >= 6, so the rest of the series is below 7 p^6 / (1 - p) < 2^-32 of
// r >= (1 - 2^-6)^7: far below fp32's rounding. (Formed from p, not from the rounded q = 1 - p, r and mod
// are more precise than the general form's.) Vectors with a larger p, or NaN, and gammas above 8 take the
// general form; max_p = -1 turns the series off. (2^-6 and degree 5, rather than 2^-7 and degree 4: at
// (1024, 8142) fp32 logits of standard deviation 3, 3.4% of the vectors hold a p above 2^-7, 1.6% above
// 2^-6; the extra fma costs less than the general form of the difference.)
struct FocalSeries {
  static constexpr float kMaxP = 0x1p-6f;
  static constexpr float kMaxGamma = 8.0f;
  static constexpr int kDegree = 5;
  Vec max_p;
  Vec coef[kDegree];  // binom(gamma - 1, k) (-1)^k, k = 1..kDegree

  explicit FocalSeries(float gamma) : max_p(gamma <= kMaxGamma ? kMaxP : -1.0f) {
    const double a = static_cast<double>(gamma) - 1.0;
    double b = 1.0;
    for (int k = 1; k <= kDegree; ++k) {
      b *= -(a - (k - 1)) / k;
      coef[k - 1] = Vec(static_cast<float>(b));
    }
  }

  C10_ALWAYS_INLINE Vec r(const Vec& p) const {
    Vec s = coef[kDegree - 1];
    for (int k = kDegree - 2; k >= 0; --k) s = at::vec::fmadd(s, p, coef[k]);
    return at::vec::fmadd(s, p, Vec(1.0f));
  }
};

// mod = q^gamma and F = mod (1 + gamma p l / q) of a vector of classes, from p, q = 1 - p and l. The specialised
// gammas need no division: gamma = 1 gives F = q + p l, gamma = 2 gives F = q^2 + 2 p l q. Otherwise,
// outside the series' range, l / q, which tends to 1 as q -> 0 (l = -log(1 - q) = q + q^2/2 + ...), is taken
// as 1 + q/2 for q < 2^-12 (the next term, q^2/3 < 2^-25, is below fp32's rounding), where q = 1 - p has
// lost its digits and may be 0.
// A masked class (z = -inf: p = 0, l = inf) makes the smoothed loss +inf and F = 1 + 0 * inf NaN, hence
// the row's gradient, as the reference's.
template <GammaCase kCase>
C10_ALWAYS_INLINE void softmax_focal_terms(const Vec& p, const Vec& q, const Vec& l, const Vec& gamma,
                                           const FocalSeries& series, Vec& mod, Vec& F) {
  const Vec one(1.0f);
  if constexpr (kCase == GammaCase::kOne) {
    mod = q;
    F = at::vec::fmadd(p, l, mod);
  } else if constexpr (kCase == GammaCase::kTwo) {
    mod = q * q;
    F = at::vec::fmadd((p + p) * l, q, mod);
  } else if (all_at_most(p, series.max_p)) {
    const Vec r = series.r(p);
    mod = at::vec::fnmadd(r, p, r);
    F = at::vec::fmadd(gamma * p * l, r, mod);
  } else {
    if constexpr (kCase == GammaCase::kHalf) {
      mod = q.sqrt();
    } else {
      mod = exp_nonpositive(gamma * log_unit(q));
    }
    const Vec l_over_q = select(sign_mask(q - Vec(0x1p-12f)), at::vec::fmadd(q, Vec(0.5f), one), l / q);
    F = mod * at::vec::fmadd(gamma * p, l_over_q, one);
  }
}

// Pass 3 of a row: g_j = gscale (p_j Phi - W k_j F_j), p_j = cache_j * block_factor, from the row's cache
// (which holds k_j F_j), then the entry of the class taken apart (the target, or a dense row's top class). It runs inside the next row's pass 1 (as that pass's Overlap, which reads each cached
// value before the pass overwrites it) or, after a thread's last row, on its own. Interleaved, its loads
// and stores overlap the exp arithmetic of pass 1 instead of waiting on the L2 cache by themselves; it
// requests its gradient lines for writing kPrefetchAhead elements ahead (pass 1 does not request its own
// row's, which are written a row later). Measured at (1024, 8142) fp32 on one AVX-512 thread, eps = 0.1,
// gamma = 2: 0.64 ns per element with a separate third pass, 0.55 interleaved (the cross entropy: 0.45).
template <typename T>
struct FocalGradient {
  T* g;
  const float* cache;
  int64_t C, y;
  SoftmaxSums r;
  double gp;      // gscale Phi
  Vec gw;         // -gscale W
  double g_y;     // the entry of class y
  Vec p_scale{};  // gscale Phi times the current block's factor

  void block(int64_t b) { p_scale = Vec(static_cast<float>(gp * block_factor(cache[C + b / kBlock], r))); }

  void vector(int64_t c, int64_t n) {
    const float* F = cache + C + num_blocks(C);
    if (n == kLanes) {
      prefetch_for_write(g + c + kPrefetchAhead);
      store_vec(g + c, at::vec::fmadd(Vec::loadu(F + c), gw, Vec::loadu(cache + c) * p_scale));
    } else {
      store_vec_tail(g + c, at::vec::fmadd(Vec::loadu(F + c, n), gw, Vec::loadu(cache + c, n) * p_scale), n);
    }
  }

  void write_target() const { g[y] = static_cast<T>(static_cast<float>(g_y)); }

  void write() {
    const int64_t full = C - C % kLanes;
    for (int64_t b = 0; b < C; b += kBlock) {
      block(b);
      const int64_t block_end = std::min(b + kBlock, full);
      for (int64_t c = b; c < block_end; c += kLanes) vector(c, kLanes);
      if (b + kBlock >= C && full < C) vector(full, C - full);
    }
    write_target();
  }
};

// Pass 2 of a row (eps > 0, or per-class coefficients) whose pass 1 left r: the loss, and when kGrad its pass 3
// as a FocalGradient. The coefficients: the class y = r.y taken apart (the target, or a dense row's top class)
// has u_y = a k_y, the others u_c = a W k_c, k_c = 1 (kOneHot) or coef's (kElement, kDense); the vector sums
// below carry k_c, and k_y and W are applied per row (kOneHot: k_y = 1 - eps + w, W = w; kElement: k_y =
// (1 - eps + w) e_y, W = w; kDense: k_y = k_top, W = 1), so that
//   loss = alpha (k_y mod_y l_y + W sum_{c != y} k_c mod_c l_c),
//   Phi = k_y F_y + W sum_{c != y} k_c F_c,  g_j = gscale (p_j Phi - W k_j F_j).
// cache: C + num_blocks(C) floats (pass 1's exp terms and block shifts), then C more for k_c F_c when kGrad.
// Per element p_c = cache_c * block_factor and l_c = log s - (z_c - m) (not lse - z_c: an fp32 lse would carry
// an ulp of |m|, 1e-3 at |z| ~ 1e4). The series comes by value: a local copy, which the stores cannot alias,
// keeps its coefficients in registers across the loop.
// (z is re-read with its offset: l_c of z'; the target's lane, whose margin is left out, is masked out.)
// Zero coefficients (kDense with eps = 0: every class whose target is 0, all but two of a mixup row's): a
// vector whose every k_c is +-0 adds exactly nothing to either sum (k_c mod_c l_c and k_c F_c are +-0, mod_c
// and F_c being finite, and a +0-started lane sum never holds -0) and caches k_c F_c = k_c, so it skips the
// focal terms, unless one of its l_c is not finite: a masked class (l = inf) makes 0 * inf = NaN, as in the
// reference, and a NaN row stays NaN. Measured at (1024, 8142) fp32 on one AVX-512 thread, the L3 cache flushed
// before each call, gamma = 2, forward with gradient: mixup rows 9.8 -> 9.3 ms; rows of soft targets, which
// only pay the test, 9.7 ms either way.
template <typename T, GammaCase kCase, bool kLoss, bool kGrad, bool kOffset, Coef kCoef>
inline FocalGradient<T> softmax_focal_smoothed_pass2(const SoftmaxSums& r, const T* z, const float* offset,
                                                     const Coefficients<T, kCoef>& coef, T* g, int64_t C, float gamma,
                                                     FocalSeries series, double k_y, double W, float alpha,
                                                     float gscale, float* loss, float* cache) {
  const FocalTarget t = focal_target(r, gamma);
  const int64_t y = r.y;
  const float* block_shift = cache + C;
  float* F_cache = cache + C + num_blocks(C);
  const int64_t full = C - C % kLanes;
  const int64_t y_base = y - y % kLanes;
  const Vec zero(0.0f), one(1.0f), vgamma(gamma), vm(r.m), log_s(static_cast<float>(std::log(r.s)));
  const Vec y_lane = Vec::arange(0.0f, 1.0f) == Vec(static_cast<float>(y - y_base));
  const Vec finite(std::numeric_limits<float>::max());
  const bool skip_zeros = kCoef == Coef::kDense && coef.c0 == 0.0f;
  // Sums sum_{c != y} k_c mod_c l_c and sum_{c != y} k_c F_c (the target's l and F zeroed in its lane).
  // q = 1 - p and the loss's sum are explicit fmas: the compiler contracts a product into a sum only where
  // the product has no other use, which differs between the loss-only and the loss + gradient instances,
  // and the loss must not depend on whether the gradient was asked for.
  double sum_ml = 0.0, sum_F = 0.0;
  for (int64_t block = 0; block < C; block += kBlock) {
    const Vec factor(static_cast<float>(block_factor(block_shift[block / kBlock], r)));
    const int64_t block_end = std::min(block + kBlock, full);
    Vec acc_ml(0.0f), acc_F(0.0f), mod, F;
    for (int64_t c = block; c < block_end; c += kLanes) {
      const Vec l = log_s - (load_logits<kOffset>(z, offset, c) - vm);
      Vec k;
      if constexpr (kCoef != Coef::kOneHot) {
        if constexpr (kCoef == Coef::kDense) prefetch_targets(coef.t, c, C);
        k = coef.at(c);
        if (skip_zeros && all_at_most(k.abs(), zero) && all_at_most(l, finite)) {
          if constexpr (kGrad) k.store(F_cache + c);
          continue;
        }
      }
      const Vec e = Vec::loadu(cache + c);
      softmax_focal_terms<kCase>(e * factor, at::vec::fnmadd(e, factor, one), l, vgamma, series, mod, F);
      if constexpr (kCoef != Coef::kOneHot) {
        mod = mod * k;
        F = F * k;
      }
      if constexpr (kGrad) F.store(F_cache + c);
      acc_ml = at::vec::fmadd(mod, c == y_base ? Vec::blendv(l, zero, y_lane) : l, acc_ml);
      acc_F = acc_F + (c == y_base ? Vec::blendv(F, zero, y_lane) : F);
    }
    if (block + kBlock >= C && full < C) {
      const int64_t n = C - full;  // lanes >= n read exp term 0 and z = 0: masked out of the sums
      const Vec e = Vec::loadu(cache + full, n);
      const Vec l = log_s - (load_logits_tail<kOffset>(z, offset, full, n) - vm);
      softmax_focal_terms<kCase>(e * factor, at::vec::fnmadd(e, factor, one), l, vgamma, series, mod, F);
      if constexpr (kCoef != Coef::kOneHot) {
        const Vec k = coef.tail(full, n);
        mod = mod * k;
        F = F * k;
      }
      if constexpr (kGrad) F.store(F_cache + full, n);
      const Vec l_n = Vec::set(zero, l, n);
      F = Vec::set(zero, F, n);
      acc_ml = at::vec::fmadd(mod, full == y_base ? Vec::blendv(l_n, zero, y_lane) : l_n, acc_ml);
      acc_F = acc_F + (full == y_base ? Vec::blendv(F, zero, y_lane) : F);
    }
    if constexpr (kLoss) sum_ml += sum_lanes(acc_ml);
    if constexpr (kGrad) sum_F += sum_lanes(acc_F);
  }
  if constexpr (kLoss) *loss = static_cast<float>(static_cast<double>(alpha) * (k_y * t.mod * t.l + W * sum_ml));
  if constexpr (kGrad) {
    const double gs = gscale;
    const double phi = k_y * t.F + W * sum_F;
    // The class y: gscale (p_y Phi - k_y F_y), whose 1 - p_y factor is taken as q_y:
    //   = gscale (p_y W sum_{c != y} k_c F_c - k_y F_y q_y).
    const double g_y = gs * (t.p * W * sum_F - k_y * t.F * t.q);
    return {g, cache, C, y, r, gs * phi, Vec(static_cast<float>(-gs * W)), g_y};
  } else {
    return {};
  }
}

template <typename T, GammaCase kCase, bool kLoss, bool kGrad, bool kOffset, Coef kCoef>
bool softmax_focal_smoothed_rows(const LossArgs& a, int64_t begin, int64_t end) {
  const int64_t C = a.num_classes;
  const FocalSeries series(a.gamma);
  const float eps = a.label_smoothing;
  const double w = static_cast<double>(eps) / static_cast<double>(C);
  std::unique_ptr<float[]> cache(new float[(kGrad ? 2 * C : C) + num_blocks(C)]);
  FocalGradient<T> pending{};  // the previous row's pass 3, when pending.g is set
  const bool in_range = for_each_softmax_row<T, kLoss, kGrad, kCoef>(a, begin, end, [&](const T* z, const T* t, T* g,
                                                                                         int64_t y, float alpha,
                                                                                         float gscale, float* loss) {
    SoftmaxSums r;
    if (kGrad && pending.g != nullptr) {
      r = softmax_sums<T, true, false, kOffset, kCoef>(a, z, g, y, false, nullptr, cache.get(), pending);
      pending.write_target();
    } else {
      r = softmax_sums<T, true, false, kOffset, kCoef>(a, z, g, y, false, nullptr, cache.get());
    }
    const Coefficients<T, kCoef> coef{t, a.element_weight, 1.0f - eps, static_cast<float>(w)};
    double k_y = 1.0 - eps + w, W = w;
    if constexpr (kCoef == Coef::kElement) k_y *= coef.scalar(r.y);
    if constexpr (kCoef == Coef::kDense) k_y = coef.scalar(r.y), W = 1.0;
    pending = softmax_focal_smoothed_pass2<T, kCase, kLoss, kGrad, kOffset, kCoef>(
        r, z, a.logit_offset, coef, g, C, a.gamma, series, k_y, W, alpha, gscale, loss, cache.get());
  });
  if (kGrad && pending.g != nullptr) pending.write();
  return in_range;
}

// eps = 0, gamma > 0, a class index: the cross entropy's row with the scalars of 13.2 (element weights: e_y
// folded into alpha).
template <typename T, bool kLoss, bool kGrad, bool kOffset>
bool softmax_focal_unsmoothed_rows(const LossArgs& a, int64_t begin, int64_t end) {
  std::unique_ptr<float[]> cache(kGrad ? new float[a.num_classes + num_blocks(a.num_classes)] : nullptr);
  return for_each_softmax_row<T, kLoss, kGrad, Coef::kOneHot>(a, begin, end, [&](const T* z, const T*, T* g,
                                                                                 int64_t y, float alpha, float gscale,
                                                                                 float* loss) {
    softmax_row<T, kLoss, kGrad, kOffset, Coef::kOneHot>(a, z, g, y, false, nullptr, alpha, gscale, loss, cache.get(),
                                                         [&](const SoftmaxSums& r, bool) {
                                                           const FocalTarget t = focal_target(r, a.gamma);
                                                           return SoftmaxRowScalars{t.mod * t.l, t.F, 0.0f,
                                                                                    -t.F * t.q};
                                                         });
  });
}

template <typename T, bool kLoss, bool kGrad, bool kOffset, Coef kCoef>
bool softmax_focal_rows_for_case(const LossArgs& a, int64_t begin, int64_t end) {
  const GammaCase gamma = gamma_case(a.gamma);
  if constexpr (kCoef == Coef::kOneHot) {
    if (gamma != GammaCase::kZero && a.label_smoothing == 0.0f) {
      return softmax_focal_unsmoothed_rows<T, kLoss, kGrad, kOffset>(a, begin, end);
    }
  }
  switch (gamma) {
    case GammaCase::kZero:  // the cross entropy itself
      return softmax_rows<T, kLoss, kGrad, kOffset, kCoef>(a, begin, end);
    case GammaCase::kHalf:
      return softmax_focal_smoothed_rows<T, GammaCase::kHalf, kLoss, kGrad, kOffset, kCoef>(a, begin, end);
    case GammaCase::kOne:
      return softmax_focal_smoothed_rows<T, GammaCase::kOne, kLoss, kGrad, kOffset, kCoef>(a, begin, end);
    case GammaCase::kTwo:
      return softmax_focal_smoothed_rows<T, GammaCase::kTwo, kLoss, kGrad, kOffset, kCoef>(a, begin, end);
    case GammaCase::kGeneral:
      return softmax_focal_smoothed_rows<T, GammaCase::kGeneral, kLoss, kGrad, kOffset, kCoef>(a, begin, end);
  }
  return false;
}

template <typename T, bool kOffset, Coef kCoef>
bool softmax_focal_rows_for_outputs(const LossArgs& a, int64_t begin, int64_t end) {
  if (a.loss != nullptr && a.grad != nullptr) {
    return softmax_focal_rows_for_case<T, true, true, kOffset, kCoef>(a, begin, end);
  }
  if (a.loss != nullptr) return softmax_focal_rows_for_case<T, true, false, kOffset, kCoef>(a, begin, end);
  return softmax_focal_rows_for_case<T, false, true, kOffset, kCoef>(a, begin, end);
}

// Returns fn(T(), std::bool_constant<kOffset>()) for the logits' type T and kOffset = whether a.logit_offset
// is set: the offset's instances are separate, so that the no-offset loops stay as they were.
template <typename Fn>
bool for_dtype_and_offset(const LossArgs& a, Fn fn) {
  const auto with_type = [&](auto type) {
    return a.logit_offset != nullptr ? fn(type, std::true_type()) : fn(type, std::false_type());
  };
  switch (a.logits_dtype) {
    case Dtype::kFloat32: return with_type(float());
    case Dtype::kBFloat16: return with_type(c10::BFloat16());
    case Dtype::kFloat16: return with_type(c10::Half());
  }
  return false;
}

// for_dtype_and_offset with a third argument, std::integral_constant<Coef, softmax_coef(a)>.
template <typename Fn>
bool for_softmax_case(const LossArgs& a, Fn fn) {
  return for_dtype_and_offset(a, [&](auto type, auto offset) {
    switch (softmax_coef(a)) {
      case Coef::kOneHot: return fn(type, offset, std::integral_constant<Coef, Coef::kOneHot>());
      case Coef::kElement: return fn(type, offset, std::integral_constant<Coef, Coef::kElement>());
      case Coef::kDense: return fn(type, offset, std::integral_constant<Coef, Coef::kDense>());
    }
    return false;
  });
}

// ---- entry points of this ISA variant: <family>_rows for every family of common/families.h ----------
// (declared by rows.h's CBKERNELS_DECLARE_ROWS, which ops.cpp indexes by Family) ------------------------

bool sigmoid_focal_rows(const LossArgs& a, int64_t begin, int64_t end) {
  return for_dtype_and_offset(a, [&](auto type, auto offset) {
    return a.dense_target ? focal_rows_for_gamma<decltype(type), true, decltype(offset)::value>(a, begin, end)
                          : focal_rows_for_gamma<decltype(type), false, decltype(offset)::value>(a, begin, end);
  });
}

bool softmax_ce_rows(const LossArgs& a, int64_t begin, int64_t end) {
  return for_softmax_case(a, [&](auto type, auto offset, auto coef) {
    return softmax_rows_for_outputs<decltype(type), decltype(offset)::value, decltype(coef)::value>(a, begin, end);
  });
}

bool softmax_focal_rows(const LossArgs& a, int64_t begin, int64_t end) {
  return for_softmax_case(a, [&](auto type, auto offset, auto coef) {
    return softmax_focal_rows_for_outputs<decltype(type), decltype(offset)::value, decltype(coef)::value>(a, begin,
                                                                                                         end);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cbkernels::cpu
