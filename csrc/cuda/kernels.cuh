// Device code of the CUDA backend: the sigmoid-family and softmax kernels of docs/op-contract.md (the
// softmax kernels compute the cross entropy and the softmax focal loss: their template argument L).
// No torch header: launch.cu instantiates these on raw pointers, so nvcc compiles them anywhere.
//
// Every kernel walks rows with a bounded, persistent grid (row_io.cuh: Slot), a few blocks per SM, so the
// launch cost does not grow with N and a block's next row starts while the memory system is still busy
// with its last one. Memory and arithmetic overlap in two ways: the column loops load the next step's
// 16-byte vectors before they compute the current ones (row_io.cuh: for_each_vector), and a block asks L2
// for its next row before it reduces and writes the current one (row_io.cuh: prefetch_row_l2; those
// requests stay in flight across the row's barriers). Per row: one reduction for the sigmoid family's
// loss, two (max, then the sums) for the softmax, three for the softmax focal loss with label smoothing;
// no barrier inside a column loop.
//
// The per-element loops treat every column as a non-target column; the target column is handled once per
// row by the thread that holds it (a branch on the vector index, not a select on every element).
// Arithmetic is fp32 whatever the storage type, each result is rounded once when stored, approximations
// as device_math.cuh decides them. These kernels take class-index targets; dense (N, C) targets run the
// kernels of dense_kernels.cuh, built on the helpers here.
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

// The optional per-class inputs (kernels' flag Extended, row_io.cuh: offset_at, weights_at) load VEC values
// with each vector; ptxas spills those of two 8-element vectors at the 64-register bound: one 8-element
// vector a step there.
constexpr int adjusted_step(int vec, int step) { return vec == 8 ? 1 : step; }

#ifdef __CUDA_ARCH__
template <int VEC>
constexpr int kStreamStep = stream_step(VEC, __CUDA_ARCH__);
template <bool Extended, int VEC, int Step>
constexpr int kLoopStep = Extended ? adjusted_step(VEC, Step) : Step;
#else
template <int VEC>
constexpr int kStreamStep = stream_step(VEC, 0);  // the host pass compiles no kernel body
template <bool Extended, int VEC, int Step>
constexpr int kLoopStep = Step;
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

// The sigmoid family's work on part of a computed row: the sum of the terms (before the row weight alpha)
// of the columns this thread takes, and (Write) their gradient, coef * dloss/dz, into g. sigmoid_body: the
// row's body vectors [lo, hi) (row_io.cuh Span) but target_v, the target's; sigmoid_edge: its edge columns
// (head, tail, target_v's: row_io.cuh edge_column). The whole row in sigmoid_focal_kernel; a chunk in split_kernels.cuh. The
// body loop skips the vector holding the target column, so it computes every element as a non-target
// column; the edge step takes one column per thread. Extended: the optional per-class inputs (the offset on
// every load, the margin on the target's edge column, the element weight e_c multiplying each column's term
// and its derivative).
template <typename E, int VEC, GammaCase G, bool Write, bool Extended>
__device__ __forceinline__ float sigmoid_body(const LossArgs& a, const Row& r, const typename E::bits* x,
                                              typename E::bits* g, const Span& s, int lo, int hi, int target_v,
                                              int tid, int tpr) {
  using B = typename E::bits;
  const float gamma = a.gamma;
  const int col0 = s.head + lo * VEC;  // the first column of vector lo
  B* const g_body = Write ? g + col0 : nullptr;
  float acc = 0.f;
  for_each_vector<E, VEC, kLoopStep<Extended, VEC, kStep>>(x + col0, hi - lo, target_v - lo, tid, tpr, [&](int col, const float (&z)[VEC]) {
    float out[VEC], w[VEC];
    weights_at<Extended>(a, col0 + col, w);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float term, dz;
      focal_element<G, false>(z[j], gamma, term, dz);
      acc += w[j] * term;
      out[j] = r.coef * (w[j] * dz);
    }
    if (Write) store_word<E, VEC>(g_body + col, out);
  }, offset_at<Extended>(a), col0);
  return acc;
}

template <typename E, int VEC, GammaCase G, bool Write, bool Extended>
__device__ __forceinline__ float sigmoid_edge(const LossArgs& a, const Row& r, const typename E::bits* x,
                                              typename E::bits* g, const Span& s, int target_v, int tid) {
  const EdgeColumn e = edge_column<VEC>(s, target_v, tid);
  if (!e.present) return 0.f;
  float term, dz;
  const bool is_y = e.col == r.y;
  focal_at<G>(load_logit<E, Extended>(a, x, e.col) - (is_y ? margin_of<Extended>(a, r.y) : 0.f), is_y, a.gamma, term, dz);
  const float w = weight_at<Extended>(a, e.col);
  if (Write) g[e.col] = E::store(r.coef * (w * dz));
  return w * term;
}

// Loss (when a.loss) and gradient (Write: into a.grad) of each row, in one read (sigmoid_body, sigmoid_edge).
template <typename E, int VEC, GammaCase G, bool Write, bool Extended>
__global__ void __launch_bounds__(kMaxThreads) sigmoid_focal_kernel(LossArgs a, int tpr) {
  using B = typename E::bits;
  __shared__ float slots[2][kMaxWarps];  // alternate rows: one reduction per row (block_reduce.cuh)
  const Slot at = slot_of(tpr);
  const int c = static_cast<int>(a.num_classes);

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
      acc = sigmoid_body<E, VEC, G, Write, Extended>(a, r, x, g, s, 0, s.nvec, target_v, at.tid, tpr);
      acc += sigmoid_edge<E, VEC, G, Write, Extended>(a, r, x, g, s, target_v, at.tid);
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
  float m, sr, ey, sz;  // max; sum of exp(z - shift) off the target; exp(z_y - shift); sum of z (e_c z_c)
  float zy;             // z_y on every thread of the row (the focal loss's third sum instead of sz)
  float se;             // sum of the element weights (the smoothed cross entropy with them, below)
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

// ---- element weights with class-index targets (the kernels' flag Extended) ---------------------------------
// Every class's term carries its element weight e_c: loss / alpha = sum_c e_c q'_c l_c, q'_c = (1 - eps)[c == y]
// + eps / C. With eps == 0 that is e_y l_y: e_y joins the row's weight once (target_weight) and the row
// computes as without element weights. With eps > 0 (TargetWeight::smoothed) every column's term carries its
// weight; with w = eps / C, S_e = sum_c e_c (SoftmaxRow::se) and sz = sum_c e_c z_c:
//   cross entropy: sum_c e_c q'_c (lse - z_c) = (1 - eps) e_y (lse - z_y) + w (S_e lse - sz)
//                  = P (lse - z_y) + w (S_e z_y - sz),   P = sum_c e_c q'_c = (1 - eps) e_y + w S_e
//     (the unweighted form with C -> S_e and sum z -> sum e z);
//     grad_c = coef (P p_c - w e_c) off the target (softmax_grad's offset times e_c), and at it
//     coef (P p_y - ((1 - eps) + w) e_y) = coef (w (S_e p_y - e_y) - (1 - eps) e_y sr / s)  (p_y - 1 = -sr / s).
//   focal loss: the target's share w_y = 1 - eps + w becomes w_y e_y, and each other class's terms (the row's
//     sums of mod_c l_c and h_c, the gradient's h_j) carry e_c (focal_smooth_loss, focal_smooth_grad).
struct TargetWeight {
  bool smoothed;  // eps > 0 and element weights: every column's term carries its weight
  float e_y;      // the target's element weight in the smoothed forms; 1 otherwise
};

// The row's TargetWeight; with eps == 0 and element weights, e_y multiplied into the row's alpha and coef.
template <bool Extended>
__device__ __forceinline__ TargetWeight target_weight(const LossArgs& a, float eps, Row& r) {
  if (!Extended || a.element_weight == nullptr || r.kind != kCompute) return {false, 1.f};
  const float e_y = __ldg(a.element_weight + r.y);
  if (eps != 0.f) return {true, e_y};
  r.alpha *= e_y;
  r.coef *= e_y;
  return {false, 1.f};
}

__device__ __forceinline__ float weighted_smooth_loss(const SoftmaxRow& t, float z_y, float eps, int c, float e_y) {
  const float w = eps / static_cast<float>(c);
  return fmaf(1.f - eps, e_y, w * t.se) * softmax_row_loss(t, z_y, 0.f, c) + w * (t.se * z_y - t.sz);
}

__device__ __forceinline__ SoftmaxGrad weighted_smooth_grad(const SoftmaxRow& t, float coef, float eps, int c,
                                                            float e_y) {
  const float inv_s = 1.f / (t.sr + t.ey);
  const float w = eps / static_cast<float>(c), keep = (1.f - eps) * e_y;
  return {coef * fmaf(w, t.se, keep) * inv_s, -coef * w,
          coef * (w * (t.se * (t.ey * inv_s) - e_y) - keep * (t.sr * inv_s))};
}

// ---- softmax focal loss (docs/math.md, section 13) -------------------------------------------------------
// gamma > 0 (gamma 0 is the cross entropy, whose kernels launch.cu runs for it). Per row, with p = softmax(z),
// q_c = 1 - p_c, l_c = -log p_c, mod_c = q_c^gamma, h_c = -mod_c (1 + gamma p_c l_c / q_c), w = eps / C:
//   loss = alpha ((1 - eps) mod_y l_y + w sum_c mod_c l_c)
//   grad_j = coef (w h_j - p_j G), plus coef (1 - eps) h_y at j = y;   G = (1 - eps) h_y + w sum_c h_c.
// Without smoothing only the target's terms are left: loss alpha mod_y l_y and the cross entropy's gradient
// (eps = 0) times the row factor F = -h_y, so the kernels run the cross entropy's passes with those two
// scalars changed. With smoothing every class counts: after the log-sum-exp, a pass over the row sums mod_c l_c
// and h_c over the classes other than the target, and the gradient, which needs G first, is one more. The
// target's own terms always come from focal_target's exact scalars, never from the per-element form.

// The target's scalars from the row's sums (13.2), with x = sr / e_y the other classes' mass relative to
// the target's:
//   l_y = lse - z_y = log1p(x)                  the cross entropy's row loss, in its stable form above;
//   mod_y = q_y^gamma,  q_y = 1 - p_y = sr / s  section 7's split; exp2(gamma log2 q_y), 0 at q_y = 0;
//   F = -h_y = mod_y (1 + gamma log1p(x) / x),  log1p(x) / x = l_y e_y / sr, at its limits 1 for sr = 0
//       (C == 1, or a confident row whose sr flushed to 0) and 0 for e_y = 0 (z_y = -inf, where l_y is inf;
//       or exp(z_y - m) flushed to 0, where log1p(x) / x < 2^-119).
// No 1 - p_y is formed, so a confident row keeps its loss (~ x^(1 + gamma)) and gradient to fp32's relative
// precision. NaN in the row makes s, hence all three, NaN. Once per row on every thread (F scales each
// one's gradient), with the accurate functions: mod_y's relative error is a few ulp times |log2 mod_y|
// (1e-6 at mod_y = 1e-6), where powf's would be 1 ulp, but powf spills the streaming kernel's registers.
struct FocalTarget {
  float mod, l, f;  // mod_y, l_y, F
};

__device__ __forceinline__ FocalTarget focal_target(const SoftmaxRow& t, float gamma, int c) {
  const float l = softmax_row_loss(t, t.zy, 0.f, c);
  const float mod = exp2f(gamma * log2f(t.sr / (t.sr + t.ey)));
  const float l_over_x = t.ey == 0.f ? 0.f : (t.sr == 0.f ? 1.f : l * t.ey / t.sr);
  return {mod, l, mod * fmaf(gamma, l_over_x, 1.f)};
}

// Without smoothing: the cross entropy's gradient at eps = 0 times F, coef F p_c off the target and
// -coef F q_y at it (softmax_grad's forms, without its eps / C).
__device__ __forceinline__ SoftmaxGrad focal_grad(const SoftmaxRow& t, const FocalTarget& ft, float coef) {
  const float scale = coef * ft.f, inv_s = 1.f / (t.sr + t.ey);
  return {scale * inv_s, 0.f, -scale * (t.sr * inv_s)};
}

// What the smoothed passes need of the row: log s, 1/s (s = sr + e_y) and gamma.
struct SmoothRow {
  float log_s, inv_s, gamma;
};

__device__ __forceinline__ SmoothRow smooth_row(const SoftmaxRow& t, float gamma) {
  const float s = t.sr + t.ey;
  return {logf(s), 1.f / s, gamma};
}

// One class other than the target in a smoothed row (13.3), from u = z - shift (shift = m, lse_shift):
//   e = exp(u), p = e / s, l = log s - u (= lse - z without an fp32 lse's ulp of |m|), q = 1 - p,
//   mod = q^gamma (G: gamma's case), term = mod l, h = -mod (1 + gamma p l / q).
// gamma 1 and 2 need no l / q: h = -(q + p l) and -q (q + 2 p l). Otherwise l / q, which tends to 1 as
// q -> 0 (l = -log(1 - q) = q + q^2/2 + ...), is taken as 1 + q/2 below q = 2^-12: the next term, q^2/3
// < 2^-25, is below fp32's rounding, where the division would amplify what l and q lost to their
// subtractions. Those happen only for a class other than the target with p > 1/2 (a confidently wrong
// row), in a term that w scales down. q is clamped at 0, as p may round above 1 (sqrt and log2 need it).
// A masked class (z = -inf): e = p = 0 and l = inf, so term = inf (the loss is inf, as the smoothed cross
// entropy's) and p l, whose limit is 0, is formed with l capped at the largest float: h = -1. The caps
// drop no NaN: a NaN u or s makes e, p and l NaN, and p carries it to h, l to term.
struct FocalTerms {
  float e, term, h;
};

template <GammaCase G>
__device__ __forceinline__ FocalTerms focal_terms(float u, const SmoothRow& r) {
  static_assert(G != GammaCase::kZero, "gamma 0 is the cross entropy");
  const float e = ex2_approx(u * kLog2e);
  const float p = e * r.inv_s;
  const float l = r.log_s - u;
  const float q = fmaxf(1.f - p, 0.f);
  const float pl = p * fminf(l, CUDART_MAX_NORMAL_F);
  float mod, h;
  if constexpr (G == GammaCase::kOne) {
    mod = q;
    h = -(q + pl);
  } else if constexpr (G == GammaCase::kTwo) {
    mod = q * q;
    h = -q * fmaf(2.f, pl, q);
  } else {
    const float pl_over_q = q < 0x1p-12f ? p * fmaf(0.5f, q, 1.f) : pl * rcp_approx(q);
    float g;
    if constexpr (G == GammaCase::kHalf) {
      mod = sqrt_approx(q);
      g = 0.5f;
    } else {
      mod = ex2_approx(r.gamma * lg2_approx(q));
      g = r.gamma;
    }
    h = -mod * fmaf(g, pl_over_q, 1.f);
  }
  return {e, mod * l, h};
}

// The smoothed row's loss and gradient from focal_target's scalars and the other classes' sums
// ml_rest = sum_{c != y} mod_c l_c and h_rest = sum_{c != y} h_c, with w_y = 1 - eps + w (q'_y) and h_y = -F:
//   loss / alpha = w_y mod_y l_y + w ml_rest,
//   G = w h_rest - w_y F,   grad_j = coef (w h_j - p_j G) = fma(e_j, -coef G / s, coef w h_j),
//   grad_y = coef (w_y h_y - p_y G) = -coef (w_y F q_y + w p_y h_rest), where 1 - p_y is taken as q_y = sr / s.
// With element weights (e_y: TargetWeight), w_y is w_y e_y and the sums and h_j carry e_c (see above).
__device__ __forceinline__ float focal_smooth_loss(const FocalTarget& ft, float ml_rest, float eps, int c, float e_y) {
  const float w = eps / static_cast<float>(c);
  return ((1.f - eps) + w) * e_y * (ft.mod * ft.l) + w * ml_rest;
}

template <GammaCase G>
struct FocalSmoothGrad {
  float scale, hscale, target;  // grad_j = fma(e_j, scale, hscale h_j) off the target
  SmoothRow row;
};

template <GammaCase G>
__device__ __forceinline__ FocalSmoothGrad<G> focal_smooth_grad(const SoftmaxRow& t, const FocalTarget& ft,
                                                                const SmoothRow& row, float h_rest, float coef,
                                                                float eps, int c, float e_y) {
  const float w = eps / static_cast<float>(c), w_y = ((1.f - eps) + w) * e_y;
  const float big_g = w * h_rest - w_y * ft.f;
  const float target = -coef * (w_y * ft.f * (t.sr * row.inv_s) + w * (t.ey * row.inv_s) * h_rest);
  return {-coef * big_g * row.inv_s, coef * w, target, row};
}

// ---- the losses of the softmax kernels (their template argument L) ---------------------------------------
//   SoftmaxCe<Smooth>      the cross entropy. Smooth false: eps == 0 (neither the sum of z nor eps is read);
//                          true: any eps, read at run time (the streaming kernel always takes this form).
//   SoftmaxFocal           the focal loss without smoothing: the cross entropy's passes, focal_target's scalars.
//   SoftmaxFocalSmooth<G>  the focal loss with smoothing: two more passes over the row (focal_terms, G).
// kSumZ: the third row sum is the sum of z; kFocal: it is z_y (third_sum); kTerms: the smoothed passes.
template <bool Smooth>
struct SoftmaxCe {
  static constexpr bool kSumZ = Smooth, kFocal = false, kTerms = false;
  using Grad = SoftmaxGrad;
};
struct SoftmaxFocal {
  static constexpr bool kSumZ = false, kFocal = true, kTerms = false;
  using Grad = SoftmaxGrad;
};
template <GammaCase G>
struct SoftmaxFocalSmooth {
  static constexpr bool kSumZ = false, kFocal = true, kTerms = true;
  static constexpr GammaCase kGamma = G;
  using Grad = FocalSmoothGrad<G>;
};

// The third sum of a row, after sr and e_y: the sum of z (the cross entropy; 0 unless kSumZ), or for the
// focal loss z_y itself, which only the thread holding the target adds (the others add 0, exactly): every
// thread of the row gets it for focal_target.
template <typename L>
__device__ __forceinline__ float third_sum(float sz, bool holds_y, float z_y) {
  return L::kFocal ? (holds_y ? z_y : 0.f) : sz;
}

// The row's state from its max and sums: sr, e_y, the third sum (third_sum), and with element weights
// (Extended, the smoothed cross entropy) a fourth, their sum S_e.
template <typename L, int K>
__device__ __forceinline__ SoftmaxRow softmax_row(float m, const float (&sums)[K]) {
  static_assert(K == 3 || K == 4, "sr, e_y, the third sum and optionally S_e");
  float se = 0.f;
  if constexpr (K == 4) se = sums[3];
  return {m, sums[0], sums[1], L::kFocal ? 0.f : sums[2], L::kFocal ? sums[2] : 0.f, se};
}

// The row's loss / alpha (z_y: the target's logit, on the thread that holds it; ml_rest: the smoothed
// focal loss's sum; tw: the element weights' share) and gradient constants (h_rest: its other sum; sm: its row).
template <typename L>
__device__ __forceinline__ float row_value(const SoftmaxRow& t, float z_y, const FocalTarget& ft, float ml_rest,
                                           float eps, int c, const TargetWeight& tw) {
  if constexpr (L::kTerms) {
    return focal_smooth_loss(ft, ml_rest, eps, c, tw.e_y);
  } else if constexpr (L::kFocal) {
    return ft.mod * ft.l;
  } else {
    return tw.smoothed ? weighted_smooth_loss(t, z_y, eps, c, tw.e_y) : softmax_row_loss(t, z_y, eps, c);
  }
}

template <typename L>
__device__ __forceinline__ typename L::Grad row_grad(const SoftmaxRow& t, const FocalTarget& ft, const SmoothRow& sm,
                                                     float h_rest, float coef, float eps, int c,
                                                     const TargetWeight& tw) {
  if constexpr (L::kTerms) {
    return focal_smooth_grad<L::kGamma>(t, ft, sm, h_rest, coef, eps, c, tw.e_y);
  } else if constexpr (L::kFocal) {
    return focal_grad(t, ft, coef);
  } else {
    return tw.smoothed ? weighted_smooth_grad(t, coef, eps, c, tw.e_y) : softmax_grad(t, coef, eps, c);
  }
}

// A column's gradient (the target's is written over it) from its logit z, or in the cached kernel from
// what its register holds: exp(z - shift), or z itself for the smoothed focal loss, whose passes need z.
// w: the column's element weight (row_io.cuh weight_at; 1 without them), on the terms of eps / C.
__device__ __forceinline__ float column_grad(float z, float shift, const SoftmaxGrad& q, float w) {
  return fmaf(exp_shifted(z, shift), q.scale, q.offset * w);
}

template <GammaCase G>
__device__ __forceinline__ float column_grad(float z, float shift, const FocalSmoothGrad<G>& q, float w) {
  const FocalTerms f = focal_terms<G>(z - shift, q.row);
  return fmaf(f.e, q.scale, (q.hscale * w) * f.h);
}

__device__ __forceinline__ float held_grad(float e, float, const SoftmaxGrad& q, float w) {
  return fmaf(e, q.scale, q.offset * w);
}

template <GammaCase G>
__device__ __forceinline__ float held_grad(float z, float shift, const FocalSmoothGrad<G>& q, float w) {
  return column_grad(z, shift, q, w);
}

// v, as a value the compiler cannot prove equal to v: what a pass computes from it is computed again
// rather than kept live, one register per element, from an earlier pass that computed the same (the cached
// kernel's smoothed focal passes: each element's exp and terms kept from one pass to the next spilled).
// Costs no instruction.
__device__ __forceinline__ float opaque(float v) {
  asm volatile("" : "+f"(v));
  return v;
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

// The streaming kernel's launch bound: kMaxThreads (64 registers a thread), but for the smoothed focal
// loss, whose extra passes keep more of the row's state live than 64 registers hold, and for the smoothed
// cross entropy with the optional inputs (Extended: element weights beside the row's sums spilled on sm_80),
// half of it with one block resident per SM, i.e. up to 128 registers (with no minimum asked, ptxas kept to
// 64 and spilled). launch.cu runs such a kernel with at most kStreamMaxThreads threads a block. 0: no minimum.
template <typename L, bool Extended>
constexpr bool kStreamWide = L::kTerms || (Extended && L::kSumZ);
template <typename L, bool Extended>
constexpr int kStreamMaxThreads = kStreamWide<L, Extended> ? kMaxThreads / 2 : kMaxThreads;
template <typename L, bool Extended>
constexpr int kStreamMinBlocks = kStreamWide<L, Extended> ? 1 : 0;

// Rows of any length: pass 1 reads the row into a per-thread online (max, sum), pass 2 (Write) reads it
// again to write the gradient (the launcher bounds the grid so that the rows in flight fit in L2 when
// it can, where the second read is served). The smoothed focal loss (L::kTerms) reads it once more in
// between for its sums, and writes no gradient without them.
// Extended: as the sigmoid kernel's (the margin where pass 1 meets the target; element weights: TargetWeight,
// read per column only by the losses whose other columns have terms, kWeighted).
template <typename E, int VEC, typename L, bool Write, bool Extended>
__global__ void __launch_bounds__(kStreamMaxThreads<L, Extended>, kStreamMinBlocks<L, Extended>)
    softmax_stream_kernel(LossArgs a, int tpr) {
  using B = typename E::bits;
  constexpr bool kWeighted = Extended && (L::kSumZ || L::kTerms);
  constexpr int kSums = Extended && L::kSumZ ? 4 : 3;  // sr, e_y, the third sum (, S_e)
  __shared__ float max_slots[kMaxWarps];
  __shared__ float sum_slots[kSums * kMaxWarps];
  __shared__ float term_slots[2 * kMaxWarps];  // L::kTerms: the third reduction of a row
  const Slot at = slot_of(tpr);
  const int c = static_cast<int>(a.num_classes);
  const float eps = L::kSumZ || L::kTerms ? a.label_smoothing : 0.f;
  const float gamma = a.gamma;

  for (int64_t first = at.first; first < a.num_rows; first += at.stride) {
    const int64_t row = first + at.group;
    Row r = row_state(a, row);
    const TargetWeight tw = target_weight<Extended>(a, eps, r);
    const int64_t base = r.kind == kNoRow ? 0 : row;
    const B* x = static_cast<const B*>(a.logits) + base * a.row_stride;
    const Span s = split_row<VEC>(x, r.kind == kCompute ? c : 0);
    const TargetPlace ty = target_place(s, r.y, VEC, at.tid, tpr);
    const int target_col = s.vector_of(r.y, VEC) * VEC;  // the target's vector (< 0: not in the body)

    // Pass 1. The running max m moves rarely: when a vector raises it, sr is rescaled once.
    float m = -CUDART_INF_F, sr = 0.f, sz = 0.f, se = 0.f, z_y = -CUDART_INF_F;
    auto add = [&](float z, bool target, float w) {
      if constexpr (L::kSumZ) {
        sz += w * z;
        if constexpr (kSums == 4) se += w;
      }
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
    // The target's logit less its margin, before the max sees it (an element of the target's vector, or
    // a head or tail element).
    auto scalar = [&](float z, bool target, int col) {
      if (target) z -= margin_of<Extended>(a, r.y);
      raise_max(z);
      add(z, target, weight_at<kWeighted && L::kSumZ>(a, col));
    };
    const float* const offset = offset_at<Extended>(a);
    constexpr int kSteps = kLoopStep<Extended, VEC, kStreamStep<VEC>>;
    if (at.tid < s.head) scalar(load_logit<E, Extended>(a, x, at.tid), at.tid == r.y, at.tid);
    if (at.tid < s.len - s.tail_start) {
      const int col = s.tail_start + at.tid;
      scalar(load_logit<E, Extended>(a, x, col), col == r.y, col);
    }
    for_each_vector<E, VEC, kSteps>(x + s.head, s.nvec, -1, at.tid, tpr, [&](int col, const float (&z)[VEC]) {
      // The vector's max first; with Extended, not that of the target's vector, whose margin may raise the max:
      // it goes element by element (scalar).
      if (!Extended || col != target_col) {
        float cm = z[0];
#pragma unroll
        for (int j = 1; j < VEC; ++j) cm = fmaxf(cm, z[j]);
        raise_max(cm);
      }
      if (col != target_col) {
        const float shift = lse_shift(m);
        float w[VEC];
        weights_at<kWeighted && L::kSumZ>(a, s.head + col, w);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if constexpr (L::kSumZ) {
            sz += w[j] * z[j];
            if constexpr (kSums == 4) se += w[j];
          }
          sr += exp_shifted(z[j], shift);
        }
      } else if constexpr (Extended) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) scalar(z[j], s.head + col + j == r.y, s.head + col + j);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) add(z[j], s.head + col + j == r.y, 1.f);
      }
    }, offset, s.head);

    // Max first, then every thread rescales its own sum to the row max once: one exp per thread.
    float mx[1] = {m};
    row_reduce<MaxOp>(mx, tpr, at.group, max_slots);
    const float shift = lse_shift(mx[0]);
    float sums[kSums] = {sr * exp_shifted(m, shift), ty.mine ? exp_shifted(z_y, shift) : 0.f,
                         third_sum<L>(sz, ty.mine, z_y)};
    if constexpr (kSums == 4) sums[3] = se;
    // (sr * exp(m - shift): a thread without columns has m = -inf and sr = 0: 0 * 0.)
    row_reduce<SumOp>(sums, tpr, at.group, sum_slots);
    const SoftmaxRow t = softmax_row<L>(mx[0], sums);

    // The smoothed focal loss's pass over the row: the sums of mod l and h (with element weights, e_c mod l
    // and e_c h) over the other columns.
    SmoothRow sm{};
    float rest[2] = {0.f, 0.f};
    if constexpr (L::kTerms) {
      sm = smooth_row(t, gamma);
      auto add_terms = [&](float z, float w) {
        const FocalTerms f = focal_terms<L::kGamma>(z - shift, sm);
        rest[0] += w * f.term;
        rest[1] += w * f.h;
      };
      if (at.tid < s.head && !ty.head)
        add_terms(load_logit<E, Extended>(a, x, at.tid), weight_at<kWeighted>(a, at.tid));
      if (at.tid < s.len - s.tail_start && !ty.tail) {
        const int col = s.tail_start + at.tid;
        add_terms(load_logit<E, Extended>(a, x, col), weight_at<kWeighted>(a, col));
      }
      for_each_vector<E, VEC, kSteps>(x + s.head, s.nvec, -1, at.tid, tpr, [&](int col, const float (&z)[VEC]) {
        float w[VEC];
        weights_at<kWeighted>(a, s.head + col, w);
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          if (col != target_col || s.head + col + j != r.y) add_terms(z[j], w[j]);
      }, offset, s.head);
      row_reduce<SumOp>(rest, tpr, at.group, term_slots);
    }
    FocalTarget ft{};
    if constexpr (L::kFocal) ft = focal_target(t, gamma, c);

    if (ty.mine && a.loss != nullptr) a.loss[row] = r.alpha * row_value<L>(t, z_y, ft, rest[0], eps, c, tw);
    if (r.kind != kCompute && r.kind != kNoRow && at.tid == 0 && a.loss != nullptr) a.loss[row] = row_loss(r, 0.f);
    if (!Write) continue;
    B* g = static_cast<B*>(a.grad) + base * a.num_classes;
    if (r.kind == kCompute) {
      const typename L::Grad q = row_grad<L>(t, ft, sm, rest[1], r.coef, eps, c, tw);
      auto grad_at = [&](int col, float z) { return column_grad(z, shift, q, weight_at<kWeighted>(a, col)); };
      if (at.tid < s.head) g[at.tid] = E::store(grad_at(at.tid, load_logit<E, Extended>(a, x, at.tid)));
      if (at.tid < s.len - s.tail_start) {
        const int col = s.tail_start + at.tid;
        g[col] = E::store(grad_at(col, load_logit<E, Extended>(a, x, col)));
      }
      for_each_vector<E, VEC, kSteps>(x + s.head, s.nvec, -1, at.tid, tpr, [&](int col, const float (&z)[VEC]) {
        float out[VEC], w[VEC];
        weights_at<kWeighted>(a, s.head + col, w);
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] = column_grad(z[j], shift, q, w[j]);
        store_word<E, VEC>(g + s.head + col, out);
      }, offset, s.head);
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
// vectors. L: the loss (SoftmaxCe<Smooth>: eps != 0, the only case that needs the sum of z). The smoothed
// focal loss keeps z in the registers instead (its passes need z - shift: exp is taken again in each) and
// makes its sums pass and its gradient from them.
//
// The target column without a per-element test: the body vectors are loaded except the one holding the
// target (and past the body's end), whose slots hold -inf (they leave the max alone and add exp(-inf) = 0
// to the sums); that vector, the head and the tail go to the edge step (row_io.cuh: edge_column), one
// column per thread, which alone tells the target from the rest. So sr, the sum off the target, is formed
// by adding, never by subtracting e_y (see above for why).
// Extended: the logit adjustments as the streaming kernel's; element weights only where they fold into the
// row's weight (eps == 0, target_weight): with the row held, the registers left do not hold a vector's
// weights (ptxas spilled them), so launch.cu runs the smoothed losses with element weights streamed.
template <typename E, int VEC, typename L, bool Extended>
__global__ void __launch_bounds__(kCachedMaxThreads, kCachedMinBlocks) softmax_cached_kernel(LossArgs a, int tpr) {
  static_assert(VEC * sizeof(typename E::bits) == kCachedVecBytes, "the cached softmax uses 16-byte vectors");
  constexpr int KV = kCachedElemsPerThread / VEC;
  using B = typename E::bits;
  __shared__ float max_slots[kMaxWarps];
  __shared__ float sum_slots[3 * kMaxWarps];
  __shared__ float term_slots[2 * kMaxWarps];  // L::kTerms: the third reduction of a row
  const Slot at = slot_of(tpr);
  const int c = static_cast<int>(a.num_classes);
  const float eps = L::kSumZ || L::kTerms ? a.label_smoothing : 0.f;
  const float gamma = a.gamma;
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
    Row r = row_of(a, row, in);
    const TargetWeight tw = target_weight<Extended>(a, eps, r);
    const B* x = logits_row<E>(a, row);
    const Span s = split_row<VEC>(x, row < a.num_rows ? c : 0);
    const int target_v = s.vector_of(r.kind == kCompute ? r.y : -1, VEC);
    const EdgeColumn e = edge_column<VEC>(s, target_v, at.tid);
    const bool is_y = e.present && e.col == r.y;
    // All of this thread's loads of the row before any use; the offset where the logits are loaded, the
    // margin on the target's edge column.
    const float ze = e.present ? load_logit<E, Extended>(a, x, e.col) - (is_y ? margin_of<Extended>(a, r.y) : 0.f) : -CUDART_INF_F;
    const float* const offset = offset_at<Extended>(a);
    float z[KV][VEC];
#pragma unroll
    for (int k = 0; k < KV; ++k) {
      const int v = at.tid + k * tpr;
      if (v < s.nvec && v != target_v) {
        unpack(load_word<E, VEC>(x + s.head + v * VEC), z[k]);
        if (offset != nullptr) add_offset(offset + s.head + v * VEC, z[k]);
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
    if constexpr (L::kSumZ) {
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
        const float ez = exp_shifted(z[k][j], shift);
        if constexpr (!L::kTerms) z[k][j] = ez;
        sr += ez;
      }
    float sums[3] = {sr, is_y ? ee : 0.f, third_sum<L>(sz, is_y, ze)};
    row_reduce<SumOp>(sums, tpr, at.group, sum_slots);
    const SoftmaxRow t = softmax_row<L>(mx[0], sums);

    // The smoothed focal loss's sums of mod l and h over the columns other than the target, from z (a
    // left-out vector's -inf slots and a missing or target edge column are selected away).
    SmoothRow sm{};
    float rest[2] = {0.f, 0.f};
    if constexpr (L::kTerms) {
      sm = smooth_row(t, gamma);
      const float shift2 = opaque(shift);
      const FocalTerms fe = focal_terms<L::kGamma>(ze - shift2, sm);
      const bool other = e.present && !is_y;
      rest[0] = other ? fe.term : 0.f;
      rest[1] = other ? fe.h : 0.f;
#pragma unroll
      for (int k = 0; k < KV; ++k) {
        float part[2] = {0.f, 0.f};
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const FocalTerms f = focal_terms<L::kGamma>(z[k][j] - shift2, sm);
          part[0] += f.term;
          part[1] += f.h;
        }
        const int v = at.tid + k * tpr;
        rest[0] += v < s.nvec && v != target_v ? part[0] : 0.f;
        rest[1] += v < s.nvec && v != target_v ? part[1] : 0.f;
      }
      row_reduce<SumOp>(rest, tpr, at.group, term_slots);
    }
    FocalTarget ft{};
    if constexpr (L::kFocal) ft = focal_target(t, gamma, c);

    // The cross entropy's loss after the gradient, when the row's registers are free for its log and exp;
    // the focal loss's before it, from scalars at hand, which then need not stay live through it.
    auto write_loss = [&] {
      if (a.loss == nullptr) return;
      if (is_y) a.loss[row] = r.alpha * row_value<L>(t, ze, ft, rest[0], eps, c, tw);
      if (r.kind != kCompute && r.kind != kNoRow && at.tid == 0) a.loss[row] = row_loss(r, 0.f);
    };
    if constexpr (L::kFocal) write_loss();
    B* g = static_cast<B*>(a.grad) + (r.kind == kNoRow ? 0 : row) * a.num_classes;
    if (r.kind == kCompute) {
      const typename L::Grad q = row_grad<L>(t, ft, sm, rest[1], r.coef, eps, c, tw);
      const float shift3 = L::kTerms ? opaque(shift) : shift;
#pragma unroll
      for (int k = 0; k < KV; ++k) {
        const int v = at.tid + k * tpr;
        if (v < s.nvec && v != target_v) {
          float out[VEC];
#pragma unroll
          for (int j = 0; j < VEC; ++j) out[j] = held_grad(z[k][j], shift3, q, 1.f);
          store_word<E, VEC>(g + s.head + v * VEC, out);
        }
      }
      if (e.present) g[e.col] = E::store(is_y ? q.target : held_grad(L::kTerms ? ze : ee, shift3, q, 1.f));
    } else if (r.kind != kNoRow) {
      fill_row<E>(g, c, r.kind == kIgnored ? 0.f : CUDART_NAN_F, at.tid, tpr);
    }
    if constexpr (!L::kFocal) write_loss();
  }
}

}  // namespace device
}  // namespace cbkernels::cuda
