// The per-element arithmetic of the CUDA kernels: which approximations they use and what each costs in
// accuracy. Per-row quantities (the softmax's log-sum-exp, 1/s) keep the accurate libdevice functions:
// they run once per row, so their cost does not matter; only what runs once per element is approximated.
//
// The decisions, each with its bound (u = 2^-24, the unit roundoff of fp32; ulp bounds are relative to the
// exact result, from the PTX ISA's documented maxima for the .approx instructions):
//   exp(x)      ex2.approx.ftz(x * log2 e), the multiplication folded into the FMA that forms x (one FFMA
//               and one MUFU.EX2). ex2.approx is within 2 ulp; rounding the argument t = x log2 e adds a
//               relative error of ln 2 * |t| * u = |x| u. The elements whose exp matters have |x| below ~100
//               (exp(-100) is lost below a sum of 1 or is subnormal), so at most ~100 ulp there, below the
//               gradient promise of docs/guarantees.md (fp32: 1e-5 = 168 ulp). The libdevice expf is within
//               2 ulp but costs ~9 instructions where this costs 2.
//               ftz: results below 2^-126 flush to 0. They are below every bound relative to the row's
//               largest entry, and the confident-prediction promises stop well above them (softmax margin
//               30: 1 - p_y ~ 1e-13).
//   1/x         rcp.approx.ftz (MUFU.RCP, within 1 ulp), only for x in [2, 6] (no subnormal, no infinity),
//               and in the softmax focal loss for x = q in [2^-12, 1].
//   sqrt(x)     sqrt.approx.ftz (within 1 ulp; sqrt(+0) = +0, NaN stays NaN), x in [0, 1].
//   log2(x)     lg2.approx.ftz (MUFU.LG2; the CUDA programming guide's bound for __log2f: within 2^-22
//               absolute for x in [0.5, 2], else 2 ulp; lg2(+0) = -inf),
//               only in the softmax focal loss's q^gamma = exp2(gamma log2 q), for q = 0 or q in [2^-24, 1]
//               (q = 1 - p in fp32: no subnormal); with ex2's rounding of gamma log2 q, a relative error of
//               order gamma (1 + |log2 q|) 2^-22 in q^gamma.
//   log1p(e)    e in [0, 1]: the odd series of 2 atanh(w), w = e / (2 + e) in [0, 1/3], in FMAs only (below).
// NaN in gives NaN out through each of them, and exp(-inf) = +0.
#pragma once

namespace cbkernels::cuda::device {

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float rcp_approx(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float lg2_approx(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float sqrt_approx(float x) {
  float y;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// log1p(e) = log((1 + w) / (1 - w)) = 2 atanh(w) = 2 sum_k w^(2k+1) / (2k+1), with w = e / (2 + e), so
// e in [0, 1] gives w in [0, 1/3] and t = w^2 in [0, 1/9]. Kept: k = 0..6, evaluated as w * P(t), Horner
// in t. Every term is positive, so the dropped tail relative to the value (>= 2w) is at most
//   sum_{k>=7} t^k / (2k+1) <= t^7 / (15 (1 - t)) <= (1/9)^7 * 9 / (15 * 8) = 1.6e-8 < 0.3 ulp,
// and with t <= 1/9 each Horner step's rounding is damped by t: about 1 ulp in all, plus w's own error. No
// cancellation anywhere, so log1p(e) keeps its relative precision as e -> 0 (where log(1 + e) would lose
// all of it). 8 FMA-pipe instructions and no MUFU, where the libdevice log1pf costs ~22 and a branch.
__device__ __forceinline__ float log1p_atanh_series(float w) {
  const float t = w * w;
  float p = 2.f / 13.f;
  p = fmaf(p, t, 2.f / 11.f);
  p = fmaf(p, t, 2.f / 9.f);
  p = fmaf(p, t, 2.f / 7.f);
  p = fmaf(p, t, 2.f / 5.f);
  p = fmaf(p, t, 2.f / 3.f);
  p = fmaf(p, t, 2.f);
  return w * p;
}

// What the sigmoid family needs of |u| (docs/math.md, section 5), from one exp and one reciprocal:
//   e = exp(-|u|), inv_1pe = 1 / (1 + e), l1pe = log1p(e).
// One reciprocal serves both: r = 1 / ((1 + e)(2 + e)) gives 1 / (1 + e) = (2 + e) r and
// w = e / (2 + e) = e (1 + e) r (the rounding of 1 + e cancels in w: it is a factor above and below).
// Error: e within 2 ulp + |u| u (exp above); inv_1pe within ~3 ulp of 1 / (1 + e); l1pe within ~5 ulp of
// log1p(e). NaN u gives NaN in all three; |u| = inf gives e = 0, inv_1pe = 1, l1pe = 0.
struct SigmoidParts {
  float e, inv_1pe, l1pe;
};

__device__ __forceinline__ SigmoidParts sigmoid_parts(float abs_u) {
  const float e = ex2_approx(-kLog2e * abs_u);
  const float one_pe = 1.f + e, two_pe = 2.f + e;
  const float r = rcp_approx(one_pe * two_pe);
  return {e, two_pe * r, log1p_atanh_series(e * one_pe * r)};
}

}  // namespace cbkernels::cuda::device
