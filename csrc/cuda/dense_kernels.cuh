// Device code of the CUDA backend for dense (N, C) targets (LossArgs::dense_target; docs/op-contract.md): the
// sigmoid family and the softmax families at a target row t_i of the logits' storage type, read at the logits'
// columns (the launcher checks that the two rows share their alignment, so one row split serves both).
// They follow the index-target kernels of kernels.cuh (persistent walk, vector loops, reductions) without a
// target column: every column computes the same form. The sigmoid family's and the cached softmax's kernels take
// the index kernels' flag Extended for the logit offset and element weights (row_io.cuh), the streaming softmax
// reads them at run time; class and sample weights are read at run time (once per row where they can be);
// target_margin never comes with a dense target.
//
// Per row, with the row weight a = sample_weight[i] * (sum_c t_c class_weight[c], or 1 without class weights):
//   sigmoid family: loss = a sum_c e_c l(z_c, t_c), grad_c = coef e_c dl/dz(z_c, t_c) (soft_focal_element);
//   softmax families: u_c = e_c ((1 - eps) t_c + eps / C) (dense_coefficient), p = softmax(z),
//     cross entropy: loss = a sum_c u_c (lse - z_c),   grad_c = coef (U p_c - u_c),   U = sum_c u_c;
//     focal loss:    loss = a sum_c u_c f(p_c),        grad_c = coef (u_c h_c - p_c H), H = sum_c u_c h_c,
//     f(p) = (1 - p)^gamma (-log p), h = p f'(p) (kernels.cuh, focal_terms).
// coef = a * grad_loss[i] (1 in forward). A value outside the family's range reads as NaN (row_io.cuh).
#pragma once

#include <math_constants.h>

#include <cstdint>

#include "block_reduce.cuh"
#include "common/loss_args.h"
#include "device_math.cuh"
#include "kernels.cuh"
#include "row_io.cuh"

namespace cbkernels::cuda {
namespace device {

// A target outside its family's range reads as NaN (row_io.cuh: unit_target, nonnegative_target). Where a row sum
// that every output of the row depends on is formed from the targets, a pass checks them once per thread instead
// of once per value: it keeps the least of them from 0 (fminf, and for an upper bound of 1, 1 - the greatest;
// a NaN target drops out of these but carries itself into the sum), and adds row_poison(least) to that sum.
__device__ __forceinline__ float row_poison(float least) { return least >= 0.f ? 0.f : CUDART_NAN_F; }

// ---- sigmoid family -----------------------------------------------------------------------------------------
// One element at a soft target t (the official code's term, docs/math.md section 14):
//   l = mod bce,  bce = t softplus(-z) + (1 - t) softplus(z),  mod = exp(-gamma A),  A = t softplus(z) +
//   (1 - t) softplus(-z) (= t z + softplus(-z));
//   dl/dz = mod (dbce - gamma dA bce),  dbce = sigmoid(z) - t,  dA = sigmoid(z) + t - 1
// (d bce/dz = sigmoid(z) - t, dA/dz = t - sigmoid(-z), d mod/dz = -gamma mod dA). With e = exp(-|z|),
// softplus(+-z) = max(+-z, 0) + log1p(e) and sigmoid(+-z) = 1 / (1 + e) or e / (1 + e) by the sign of z, so
// with the sign's pair of coefficients (k, k') = (1 - t, -t) for z >= 0, (-t, 1 - t) for z < 0:
//   bce = log1p(e) + k z,    A = log1p(e) - k' z,
//   dbce = (k + k' e) / (1 + e),    dA = -(k' + k e) / (1 + e).
// k z and -k' z are (1 - t) |z| or t |z|: bce and A are sums of two non-negative terms, so neither cancels; dbce
// and dA are the differences (1 - t) sigmoid(z) - t sigmoid(-z) and t sigmoid(z) - (1 - t) sigmoid(-z) over
// 1 + e, each formed in one FMA without 1 - sigmoid(z): at t = 0 and t = 1 they are focal_element's forms
// (kernels.cuh). One exp and one reciprocal (sigmoid_parts), plus the exp of mod when Focal (gamma != 0;
// without it mod = 1: no 0 * inf for an infinite A). A NaN z or t gives NaN.
template <bool Focal>
__device__ __forceinline__ void soft_focal_element(float z, float t, float gamma, float& term, float& dz) {
  const SigmoidParts s = sigmoid_parts(fabsf(z));
  const bool nonneg = z >= 0.f;
  const float rest = 1.f - t;
  const float k = nonneg ? rest : -t;
  const float k2 = nonneg ? -t : rest;
  const float bce = fmaf(k, z, s.l1pe);
  const float dbce = s.inv_1pe * fmaf(k2, s.e, k);
  if constexpr (!Focal) {
    term = bce;
    dz = dbce;
  } else {
    const float mod = ex2_approx(-(gamma * kLog2e) * fmaf(-k2, z, s.l1pe));
    const float da = s.inv_1pe * fmaf(k, s.e, k2);  // -dA
    term = mod * bce;
    dz = mod * fmaf(gamma * da, bce, dbce);
  }
}

// Vectors per step of the streaming softmax's pair loops (row_io.cuh: for_each_pair): one of the logits and one
// of the targets, two 16-byte loads in flight, as the index kernels' kStep of one array. (The sigmoid family's
// loops take kStep of each: four loads in flight, which its per-SM blocks need to keep an H200's memory busy;
// the streaming focal loss's passes spill them on sm_80.)
constexpr int kDenseStep = 1;

// The launch bounds. The sigmoid family's and the streaming softmax kernels: blocks of at most kDenseMaxThreads
// threads, two of them resident per SM, i.e. up to 128 registers (at 64, ptxas spilled the sigmoid kernel's
// pair loop); launch.cu runs them with at most that many threads a block. The cached softmax:
// kCachedMaxThreads with kDenseCachedMinBlocks per SM: 3, as the index kernel's, i.e. up to 168 registers,
// for a row whose passes leave their targets' loads to the compiler's schedule; 2 (up to 255) with the optional
// inputs, whose loads beside the held row spilled at 168.
constexpr int kDenseMaxThreads = kMaxThreads / 4;
constexpr int kDenseMinBlocks = 2;
template <bool Extended>
constexpr int kDenseCachedMinBlocks = Extended ? 2 : 3;

// Loss (when a.loss) and gradient (when a.grad) of each row, in one read of the logits and targets, after a
// first read of the targets for the row weight when there are class weights (the gradient needs it before any
// column is written; the second read finds the row in L1/L2). Every column goes through the same form; the
// head and tail through the edge step (row_io.cuh: edge_column, no target vector). Both loops load their next
// step's vectors (and the row weight's class weights) before computing the current ones. Focal: gamma != 0
// (soft_focal_element); Extended: the optional per-class inputs.
template <typename E, int VEC, bool Focal, bool Extended>
__global__ void __launch_bounds__(kDenseMaxThreads, kDenseMinBlocks) sigmoid_dense_kernel(LossArgs a, int tpr) {
  using B = typename E::bits;
  // Per row parity (block_reduce.cuh: no slot array is reused by two reductions in a row): the class-weight
  // sum, the loss.
  __shared__ float slots[2][2][kMaxWarps];
  const Slot at = slot_of(tpr);
  const int c = static_cast<int>(a.num_classes);
  const float gamma = a.gamma;

  int parity = 0;
  for (int64_t first = at.first; first < a.num_rows; first += at.stride, parity ^= 1) {
    const int64_t row = first + at.group;
    Row r = dense_row_of(a, row);
    const int64_t base = r.kind == kNoRow ? 0 : row;
    const B* x = static_cast<const B*>(a.logits) + base * a.row_stride;
    const B* t = target_row<E>(a, base);
    B* g = a.grad != nullptr ? static_cast<B*>(a.grad) + base * a.num_classes : nullptr;
    const Span s = split_row<VEC>(x, r.kind == kCompute ? c : 0);
    const EdgeColumn e = edge_column<VEC>(s, -1, at.tid);

    if (a.class_weight != nullptr) {
      // The row weight multiplies every output of the row: its targets are checked here (row_poison).
      const float te = e.present ? E::load(t[e.col]) : 0.f;
      float sum[1] = {e.present ? te * __ldg(a.class_weight + e.col) : 0.f}, least = te, most = te;
      for_each_vector_with<E, VEC, kStep>(t + s.head, a.class_weight + s.head, s.nvec, at.tid, tpr,
                                          [&](int, const float (&tv)[VEC], const float (&w)[VEC]) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          sum[0] += tv[j] * w[j];
          least = fminf(least, tv[j]);
          most = fmaxf(most, tv[j]);
        }
      });
      sum[0] += row_poison(fminf(least, 1.f - most));
      row_reduce<SumOp>(sum, tpr, at.group, slots[parity][0]);
      dense_row_weight(r, sum[0]);
    }

    float acc = 0.f;
    if (e.present) {
      float term, dz;
      soft_focal_element<Focal>(load_logit<E, Extended>(a, x, e.col), unit_target(E::load(t[e.col])), gamma, term,
                                dz);
      const float w = weight_at<Extended>(a, e.col);
      acc += w * term;
      if (g != nullptr) g[e.col] = E::store(r.coef * (w * dz));
    }
    for_each_pair<E, VEC, kStep>(x + s.head, t + s.head, s.nvec, at.tid, tpr,
                                 [&](int col, const float (&z)[VEC], const float (&tv)[VEC]) {
      float out[VEC], w[VEC];
      weights_at<Extended>(a, s.head + col, w);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float term, dz;
        soft_focal_element<Focal>(z[j], unit_target(tv[j]), gamma, term, dz);
        acc += w[j] * term;
        out[j] = r.coef * (w[j] * dz);
      }
      if (g != nullptr) store_word<E, VEC>(g + s.head + col, out);
    }, offset_at<Extended>(a), s.head);

    if (a.loss != nullptr) {
      float total[1] = {acc};
      row_reduce<SumOp>(total, tpr, at.group, slots[parity][1]);
      if (at.tid == 0 && r.kind == kCompute) a.loss[row] = r.alpha * total[0];
    }
  }
}

// ---- softmax families ----------------------------------------------------------------------------------------
// u_c = e_c ((1 - eps) t_c + eps / C): the class's coefficient, the row weight apart (a t < 0 or NaN makes the row
// NaN through row_poison).
struct DenseCoef {
  float keep, spread;  // 1 - eps, eps / C
};

__device__ __forceinline__ DenseCoef dense_coef(const LossArgs& a) {
  return {1.f - a.label_smoothing, a.label_smoothing / static_cast<float>(a.num_classes)};
}

__device__ __forceinline__ float dense_coefficient(const DenseCoef& d, float t, float e) {
  return e * fmaf(d.keep, t, d.spread);
}

// The class weights of columns col .. col + VEC, or 0 without them: one address, then loads at fixed offsets.
template <int VEC>
__device__ __forceinline__ void class_weights_at(const float* cw, int col, float (&w)[VEC]) {
  const float* const p = cw != nullptr ? cw + col : nullptr;
#pragma unroll
  for (int j = 0; j < VEC; ++j) w[j] = p != nullptr ? __ldg(p + j) : 0.f;
}

// The cross entropy from the row's sums, each relative to the shift m (the row max, lse_shift):
// s = sum_c exp(z_c - m), U = sum_c u_c, D = sum_c u_c (z_c - m) <= 0, so that lse - z_c = log s - (z_c - m):
//   loss / a = sum_c u_c (lse - z_c) = U log s - D   (two non-negative terms; |z| ~ 1e4 keeps its digits, where
//   U lse - sum_c u_c z_c would cancel), grad_c = coef (U p_c - u_c) = fma(exp(z_c - m), coef U / s, -coef u_c).
// A masked class (z_c = -inf) with u_c > 0 makes the loss inf, with u_c = 0 NaN (0 * inf), as the reference's
// sum of u_c (-log p_c). C == 1: s = 1, D = 0, so loss 0 (times U: NaN stays NaN) and gradient U - u = 0.
//
// The focal loss needs the stable forms of the softmax focal loss with smoothing (kernels.cuh, section 13) with
// no target column: the top columns (z_c = m) take the target's place. Every other column has p_c < 1/2
// (p_c < p_top and p_c + p_top <= 1) and goes through focal_terms. Besides u f and u h over them, the row needs
// their exps s_rest, the top columns' count n (add_top_split) and their coefficient sum U_top. Then each top
// column has exp(z - m) = 1, s = s_rest + n and 1 - p = (s_rest + n - 1) / s without the cancellation of
// 1 - 1/s: focal_target's scalars with sr = s_rest + n - 1, e_y = 1, d = 0 (top_class).
//   loss / a = sum_rest u f + U_top mod l,   H = sum_rest u h - U_top F   (h_top = -F),
//   grad_c = fma(exp(z_c - m), -coef H / s, coef u_c h_c) off the top, and at a top column
//   coef (u_c h_top - p H) = -coef (F (u_c q - p (U_top - u_c)) + p sum_rest u h),  q = 1 - p,
//   where U_top - u_c is exactly 0 for a single top column (the other threads add 0 to its u_c).
// Every column computes focal_terms' form, and a top column's terms (d = 0: finite, as p = 1 / s <= 1) are
// selected away; a NaN d goes with the columns below the max, where its terms carry it.
struct TopClass {
  FocalTarget ft;  // the top columns' mod, l and F = -h
  float p, q;      // their p and 1 - p
};

__device__ __forceinline__ TopClass top_class(float s_rest, float n_top, float gamma, int c) {
  const SoftmaxRow t{0.f, s_rest + (n_top - 1.f), 1.f, 0.f, 0.f, 0.f};  // m = z_y = 0: d = 0
  const float s = t.sr + 1.f;
  return {focal_target(t, gamma, c), 1.f / s, t.sr / s};
}

// A column's share of (s_rest, n): e = exp(d) below the max, a count of 1 at it.
__device__ __forceinline__ void add_top_split(float d, float e, float& s_rest, float& n_top) {
  if (d >= 0.f) {
    n_top += 1.f;
  } else {
    s_rest += e;
  }
}

// A column's share of the focal loss's row sums, the first kFocalTerms of `sums`: u f and u h below the max, u at
// it (U_top). Returns exp(d).
constexpr int kFocalTerms = 3;

template <GammaCase G, int K>
__device__ __forceinline__ float dense_focal_terms(float d, float u, const SmoothRow& sm, float (&sums)[K]) {
  static_assert(K >= kFocalTerms, "sum u f, sum u h, U_top");
  const FocalTerms f = focal_terms<G>(d, sm);
  const bool top = d >= 0.f;
  const float w = top ? 0.f : u;
  sums[0] += w * f.term;
  sums[1] += w * f.h;
  if (top) sums[2] += u;
  return f.e;
}

// The focal loss's gradient constants, from the reduced sums: off the top, fma(exp(d), scale, coef u h); at a top
// column the form above, as u top_u + ((U_top - u) top_shared + top_rest).
struct DenseFocalGrad {
  float scale, coef;                  // -coef H / s; coef
  float top_u, top_shared, top_rest;  // -coef F q; coef F p; -coef p sum_rest u h
  float u_top;
  SmoothRow row;
};

template <GammaCase G>
__device__ __forceinline__ float dense_focal_grad(float d, float u, const DenseFocalGrad& q) {
  const FocalTerms f = focal_terms<G>(d, q.row);
  const float rest = fmaf(f.e, q.scale, q.coef * u * f.h);
  const float top = fmaf(u, q.top_u, fmaf(q.u_top - u, q.top_shared, q.top_rest));
  return d >= 0.f ? top : rest;
}

// The row's loss / a (focal) and gradient constants from the terms' sums (dense_focal_terms).
template <int K>
__device__ __forceinline__ float dense_focal_loss(const float (&sums)[K], const TopClass& top) {
  return sums[0] + sums[2] * (top.ft.mod * top.ft.l);
}

template <int K>
__device__ __forceinline__ DenseFocalGrad dense_focal_row_grad(const float (&sums)[K], const TopClass& top,
                                                               const SmoothRow& sm, float coef) {
  const float big_h = sums[1] - sums[2] * top.ft.f, cf = coef * top.ft.f;
  return {-coef * big_h * sm.inv_s, coef, -cf * top.q, cf * top.p, -coef * top.p * sums[1], sums[2], sm};
}

// Rows of any length. Pass 1 reads the logits and targets into a per-thread online max and sum (as the index
// kernel's; the cross entropy's D moves with the shift: D + U (old shift - new shift)), U, D and the class-weight
// sum. The cross entropy then writes its gradient in a second pass; the focal loss makes one for its terms
// and then the gradient's. Focal: the focal loss (gamma > 0), else the cross entropy.
template <typename E, int VEC, bool Focal>
__global__ void __launch_bounds__(kDenseMaxThreads, kDenseMinBlocks)
    softmax_dense_stream_kernel(LossArgs a, int tpr) {
  using B = typename E::bits;
  __shared__ float max_slots[kMaxWarps];
  __shared__ float sum_slots[4 * kMaxWarps];
  __shared__ float term_slots[(kFocalTerms + 2) * kMaxWarps];  // Focal: the third reduction of a row
  const Slot at = slot_of(tpr);
  const int c = static_cast<int>(a.num_classes);
  const DenseCoef dc = dense_coef(a);
  const float* const cw = a.class_weight;

  for (int64_t first = at.first; first < a.num_rows; first += at.stride) {
    const int64_t row = first + at.group;
    Row r = dense_row_of(a, row);
    const int64_t base = r.kind == kNoRow ? 0 : row;
    const B* x = static_cast<const B*>(a.logits) + base * a.row_stride;
    const B* t = target_row<E>(a, base);
    const Span s = split_row<VEC>(x, r.kind == kCompute ? c : 0);
    const EdgeColumn e = edge_column<VEC>(s, -1, at.tid);
    // Every pass calls f(col, z, t) for this thread's columns: its edge column, then its body vectors.
    auto each_column = [&](auto&& f) {
      if (e.present) f(e.col, load_logit<E, true>(a, x, e.col), E::load(t[e.col]));
      for_each_pair<E, VEC, kDenseStep>(x + s.head, t + s.head, s.nvec, at.tid, tpr,
                                        [&](int col, const float (&z)[VEC], const float (&tv)[VEC]) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) f(s.head + col + j, z[j], tv[j]);
      }, a.logit_offset, s.head);
    };

    // Pass 1. When an element raises the running max m, the sum is rescaled by exp(m_old - m_new) and D, relative
    // to lse_shift(m), by U (lse_shift(m_old) - m_new); an element at most m adds exp(z - shift) and
    // u (z - shift). (Element by element: the pair loop's vectors would need their max first.)
    float m = -CUDART_INF_F, sum = 0.f, u_sum = 0.f, d_sum = 0.f, cw_sum = 0.f, least = 0.f;
    each_column([&](int col, float z, float tv) {
      if (z > m) {
        sum *= exp_shifted(m, z);  // m = -inf: sum is still 0, and 0 * exp(-inf) = 0
        if constexpr (!Focal) d_sum += u_sum * (lse_shift(m) - z);
        m = z;
      }
      const float shift = lse_shift(m);
      sum += exp_shifted(z, shift);
      least = fminf(least, tv);
      if (cw != nullptr) cw_sum += tv * __ldg(cw + col);
      if constexpr (!Focal) {
        const float u = dense_coefficient(dc, tv, weight_at<true>(a, col));
        u_sum += u;
        d_sum += u * (z - shift);
      }
    });

    // The row max, then each thread's sums moved to it once.
    float mx[1] = {m};
    row_reduce<MaxOp>(mx, tpr, at.group, max_slots);
    const float shift = lse_shift(mx[0]);
    float sums[4] = {sum * exp_shifted(m, shift) + row_poison(least), u_sum, d_sum + u_sum * (lse_shift(m) - shift),
                     cw_sum};
    row_reduce<SumOp>(sums, tpr, at.group, sum_slots);
    if (cw != nullptr) dense_row_weight(r, sums[3]);
    B* g = a.grad != nullptr ? static_cast<B*>(a.grad) + base * a.num_classes : nullptr;

    if constexpr (!Focal) {
      if (at.tid == 0 && r.kind == kCompute && a.loss != nullptr)
        a.loss[row] = r.alpha * (sums[1] * logf(sums[0]) - sums[2]);
      if (g == nullptr) continue;
      const float scale = r.coef * sums[1] / sums[0], neg = -r.coef;
      auto grad_of = [&](int col, float z, float tv) {
        return fmaf(exp_shifted(z, shift), scale, neg * dense_coefficient(dc, tv, weight_at<true>(a, col)));
      };
      if (e.present) g[e.col] = E::store(grad_of(e.col, load_logit<E, true>(a, x, e.col), E::load(t[e.col])));
      for_each_pair<E, VEC, kDenseStep>(x + s.head, t + s.head, s.nvec, at.tid, tpr,
                                        [&](int col, const float (&z)[VEC], const float (&tv)[VEC]) {
        float out[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] = grad_of(s.head + col + j, z[j], tv[j]);
        store_word<E, VEC>(g + s.head + col, out);
      }, a.logit_offset, s.head);
    } else {
      const SmoothRow sm{logf(sums[0]), 1.f / sums[0], a.gamma};
      float terms[kFocalTerms + 2] = {0.f, 0.f, 0.f, 0.f, 0.f};  // dense_focal_terms', then s_rest and n
      each_column([&](int col, float z, float tv) {
        const float d = z - shift;
        const float u = dense_coefficient(dc, tv, weight_at<true>(a, col));
        add_top_split(d, dense_focal_terms<GammaCase::kGeneral>(d, u, sm, terms), terms[kFocalTerms],
                      terms[kFocalTerms + 1]);
      });
      row_reduce<SumOp>(terms, tpr, at.group, term_slots);
      const TopClass top = top_class(terms[kFocalTerms], terms[kFocalTerms + 1], a.gamma, c);
      if (at.tid == 0 && r.kind == kCompute && a.loss != nullptr) a.loss[row] = r.alpha * dense_focal_loss(terms, top);
      if (g == nullptr) continue;
      const DenseFocalGrad q = dense_focal_row_grad(terms, top, sm, r.coef);
      auto grad_of = [&](int col, float z, float tv) {
        return dense_focal_grad<GammaCase::kGeneral>(z - shift, dense_coefficient(dc, tv, weight_at<true>(a, col)), q);
      };
      if (e.present) g[e.col] = E::store(grad_of(e.col, load_logit<E, true>(a, x, e.col), E::load(t[e.col])));
      for_each_pair<E, VEC, kDenseStep>(x + s.head, t + s.head, s.nvec, at.tid, tpr,
                                        [&](int col, const float (&z)[VEC], const float (&tv)[VEC]) {
        float out[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] = grad_of(s.head + col + j, z[j], tv[j]);
        store_word<E, VEC>(g + s.head + col, out);
      }, a.logit_offset, s.head);
    }
  }
}

// Rows of at most kCachedElemsPerThread * tpr columns, gradient always written (launch.cu: cached_softmax), the
// logits held in registers as the index kernel's (kernels.cuh: softmax_cached_kernel; every body vector is
// held, the head and tail go to the edge step); the targets and weights are read again in each pass that
// needs them (from L1/L2). G: gamma's case, the cross entropy at kZero (which keeps exp(z - m) where z was),
// else the focal loss (which keeps z). Extended: the optional per-class inputs (row_io.cuh).
template <typename E, int VEC, GammaCase G, bool Extended>
__global__ void __launch_bounds__(kCachedMaxThreads, kDenseCachedMinBlocks<Extended>)
    softmax_dense_cached_kernel(LossArgs a, int tpr) {
  static_assert(VEC * sizeof(typename E::bits) == kCachedVecBytes, "the cached softmax uses 16-byte vectors");
  constexpr int KV = kCachedElemsPerThread / VEC;
  using B = typename E::bits;
  __shared__ float max_slots[kMaxWarps];
  __shared__ float sum_slots[4 * kMaxWarps];
  __shared__ float term_slots[(kFocalTerms + 1) * kMaxWarps];  // focal: the third reduction of a row
  const Slot at = slot_of(tpr);
  const int c = static_cast<int>(a.num_classes);
  const DenseCoef dc = dense_coef(a);
  const float* const cw = a.class_weight;
  if (at.first >= a.num_rows) return;  // block-uniform

  for (int64_t first = at.first; first < a.num_rows; first += at.stride) {
    const int64_t row = first + at.group;
    Row r = dense_row_of(a, row);
    const int64_t base = r.kind == kNoRow ? 0 : row;
    // The next row's logits and targets into L2.
    if (row + at.stride < a.num_rows) {
      const int64_t bytes = a.num_classes * static_cast<int64_t>(sizeof(B));
      prefetch_row_l2(logits_row<E>(a, row + at.stride), bytes, at.tid, tpr);
      prefetch_row_l2(target_row<E>(a, row + at.stride), bytes, at.tid, tpr);
    }
    const B* x = static_cast<const B*>(a.logits) + base * a.row_stride;
    const B* t = target_row<E>(a, base);
    const Span s = split_row<VEC>(x, r.kind == kCompute ? c : 0);
    const EdgeColumn e = edge_column<VEC>(s, -1, at.tid);
    const float* const offset = offset_at<Extended>(a);
    float ze = e.present ? load_logit<E, Extended>(a, x, e.col) : -CUDART_INF_F;
    float z[KV][VEC];
#pragma unroll
    for (int k = 0; k < KV; ++k) {
      const int v = at.tid + k * tpr;
      if (v < s.nvec) {
        unpack(load_word<E, VEC>(x + s.head + v * VEC), z[k]);
        if (offset != nullptr) add_offset(offset + s.head + v * VEC, z[k]);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) z[k][j] = -CUDART_INF_F;
      }
    }
    // A pass over this thread's held columns (the edge column, then its body vectors): f(z, t, e, w) with z by
    // reference (its register) and the column's target, element weight and class weight (0 without) read again.
    auto each_column = [&](auto&& f) {
      if (e.present) {
        float cwe[1];
        class_weights_at(cw, e.col, cwe);
        f(ze, E::load(t[e.col]), weight_at<Extended>(a, e.col), cwe[0]);
      }
#pragma unroll
      for (int k = 0; k < KV; ++k) {
        const int v = at.tid + k * tpr;
        if (v >= s.nvec) continue;
        float tv[VEC], w[VEC], cwv[VEC];
        unpack(load_word<E, VEC>(t + s.head + v * VEC), tv);
        weights_at<Extended>(a, s.head + v * VEC, w);
        class_weights_at(cw, s.head + v * VEC, cwv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) f(z[k][j], tv[j], w[j], cwv[j]);
      }
    };
    // The gradient from the held columns, grad_of(z, t, e), one vector store per body vector.
    B* const g = static_cast<B*>(a.grad) + base * a.num_classes;
    auto write_grad = [&](auto&& grad_of) {
      if (e.present) g[e.col] = E::store(grad_of(ze, E::load(t[e.col]), weight_at<Extended>(a, e.col)));
#pragma unroll
      for (int k = 0; k < KV; ++k) {
        const int v = at.tid + k * tpr;
        if (v >= s.nvec) continue;
        float tv[VEC], w[VEC], out[VEC];
        unpack(load_word<E, VEC>(t + s.head + v * VEC), tv);
        weights_at<Extended>(a, s.head + v * VEC, w);
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] = grad_of(z[k][j], tv[j], w[j]);
        store_word<E, VEC>(g + s.head + v * VEC, out);
      }
    };

    float m = ze;
#pragma unroll
    for (int k = 0; k < KV; ++k)
#pragma unroll
      for (int j = 0; j < VEC; ++j) m = fmaxf(m, z[k][j]);
    float mx[1] = {m};
    row_reduce<MaxOp>(mx, tpr, at.group, max_slots);
    const float shift = lse_shift(mx[0]);
    float least = 0.f;  // row_poison

    if constexpr (G == GammaCase::kZero) {
      float sums[4] = {0.f, 0.f, 0.f, 0.f};  // s, U, D, sum_c t_c class_weight[c]
      each_column([&](float& zz, float tv, float w, float cwc) {
        const float d = zz - shift;
        const float u = dense_coefficient(dc, tv, w);
        zz = ex2_approx(d * kLog2e);  // exp(z - m) = exp_shifted(z, shift), kept for the gradient
        sums[0] += zz;
        sums[1] += u;
        sums[2] += u * d;
        sums[3] += tv * cwc;
        least = fminf(least, tv);
      });
      sums[1] += row_poison(least);
      row_reduce<SumOp>(sums, tpr, at.group, sum_slots);
      if (cw != nullptr) dense_row_weight(r, sums[3]);
      if (r.kind != kCompute) continue;
      const float scale = r.coef * sums[1] / sums[0], neg = -r.coef;
      write_grad([&](float ez, float tv, float w) { return fmaf(ez, scale, neg * dense_coefficient(dc, tv, w)); });
      if (at.tid == 0 && a.loss != nullptr) a.loss[row] = r.alpha * (sums[1] * logf(sums[0]) - sums[2]);
    } else {
      // The exps, split at the max (add_top_split): s_rest and n. An absent edge or body slot (-inf) adds 0.
      float split[2] = {0.f, 0.f};
      add_top_split(ze - shift, exp_shifted(ze, shift), split[0], split[1]);
#pragma unroll
      for (int k = 0; k < KV; ++k)
#pragma unroll
        for (int j = 0; j < VEC; ++j) add_top_split(z[k][j] - shift, exp_shifted(z[k][j], shift), split[0], split[1]);
      row_reduce<SumOp>(split, tpr, at.group, sum_slots);
      const float s_all = split[0] + split[1];
      const SmoothRow sm{logf(s_all), 1.f / s_all, a.gamma};
      // Each pass computes its terms from z again (opaque: kernels.cuh), rather than keeping them live. The
      // terms' pass also sums the class weights.
      const float shift2 = opaque(shift);
      float terms[kFocalTerms + 1] = {0.f, 0.f, 0.f, 0.f};  // dense_focal_terms', sum_c t_c class_weight[c]
      each_column([&](float& zz, float tv, float w, float cwc) {
        dense_focal_terms<G>(zz - shift2, dense_coefficient(dc, tv, w), sm, terms);
        terms[kFocalTerms] += tv * cwc;
        least = fminf(least, tv);
      });
      const float poison = row_poison(least);
      terms[0] += poison;
      terms[1] += poison;
      row_reduce<SumOp>(terms, tpr, at.group, term_slots);
      if (cw != nullptr) dense_row_weight(r, terms[kFocalTerms]);
      const TopClass top = top_class(split[0], split[1], a.gamma, c);
      if (at.tid == 0 && r.kind == kCompute && a.loss != nullptr) a.loss[row] = r.alpha * dense_focal_loss(terms, top);
      if (r.kind != kCompute) continue;
      const DenseFocalGrad q = dense_focal_row_grad(terms, top, sm, r.coef);
      const float shift3 = opaque(shift);
      write_grad([&](float zz, float tv, float w) {
        return dense_focal_grad<G>(zz - shift3, dense_coefficient(dc, tv, w), q);
      });
    }
  }
}

}  // namespace device
}  // namespace cbkernels::cuda
