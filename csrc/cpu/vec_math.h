// exp, log1p and log over Vectorized<float>, inlined, for the argument ranges the loss kernels use.
//
// Why not Vectorized's own exp() / log1p(): those call Sleef's u10 functions through the PLT, one call
// per vector, with full-range argument handling. Profiled in the softmax backward at (1024, 8142) fp32
// on one AVX-512 thread, Sleef's expf16 alone took 5 ms of the 10.8 ms (torch.exp of the same tensor,
// through MKL, takes 3.2 ms in all). The loss kernels need exp only for x <= 0, log1p and log only on
// [0, 1], where a short inline polynomial does. Accuracy, measured against double on every 5th float of
// [-110, 0] (exp), every 7th of [2^-30, 1] (log1p) and every 3rd of [2^-30, 1] (log), AVX-512 build: exp
// 1.01 ulp, log1p 1.95 ulp, log 1.85 ulp (Sleef u10: 1 ulp each); tests/test_cpu_math_accuracy.py checks the
// losses and gradients built on them.
// The kernels are bound by vector-port arithmetic (about 70 operations per vector for focal), so each
// operation saved here shows: the forms below were chosen by measurement, see each function.
//
// Included by loss_kernels.h; everything lives in namespace CPU_CAPABILITY, so each ISA variant gets its
// own copy. Always inlined: a call would spill the loop's constants, and a caller that needs only part of
// a result (the gradient of sigmoid CE does not use log1p) relies on inlining to drop the rest.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>

#include <limits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace cbkernels::cpu {
namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
using IntVec = at::vec::Vectorized<int32_t>;

// exp(x) for x <= 0; NaN gives NaN, -inf gives 0. (Also right for 0 < x < 72; callers never pass x > 0.)
//   x = n ln2 + r, n = round(x / ln2), |r| <= ln2 / 2, so exp(x) = 2^n exp(r).
//   r = (x - n C1) - n C2 with ln2 = C1 + C2, C1 = 0.693359375 (9 significant bits, so n C1 is exact for
//   |n| < 2^15) and C2 = -2.12194440e-4: r carries no cancellation error (Cody & Waite's reduction).
//   exp(r) = 1 + r + r^2 P(r), P of degree 5 with the minimax coefficients of Moshier's Cephes expf
//   (relative error below 2^-23 on |r| <= ln2/2).
//   2^n is built as 2^(n+24) times the constant 2^-24: 2^(n+24) is a normal float for n in [-150, 103],
//   so a result in the subnormal range is rounded once, by the last multiplication (gradual underflow).
//   (AVX-512: vscalefps, which rounds once as well.)
//   Below x = -104, exp(x) < 2^-150 rounds to 0; the clamp keeps n in range. clamp_min is maxps(min, x),
//   which returns x when x is NaN, so NaN passes through the clamp and the polynomial unchanged.
//   (Not Vec::blendv(x, min, x < min): on AVX-512 ATen's comparison and blend round-trip through mask
//   registers, which measured 3.7x slower for this function on the development machine.)
C10_ALWAYS_INLINE Vec exp_nonpositive(Vec x) {
  x = at::vec::clamp_min(x, Vec(-104.0f));
  const Vec n = (x * Vec(1.44269504088896341f)).round();
  const Vec r = at::vec::fmadd(n, Vec(2.12194440e-4f), at::vec::fmadd(n, Vec(-0.693359375f), x));
  Vec p(1.9875691500e-4f);
  p = at::vec::fmadd(p, r, Vec(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, Vec(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, Vec(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, Vec(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, Vec(5.0000001201e-1f));
  const Vec exp_r = at::vec::fmadd(p, r * r, r) + Vec(1.0f);
#if defined(CPU_CAPABILITY_AVX512)
  // vscalefps computes exp_r * 2^n with one rounding, subnormal results included: the same value as the
  // generic form below, in one instruction instead of five (measured 6-18% off every loss kernel's row
  // time at (16, 8142) and (1024, 8142) fp32 on one AVX-512 thread).
  return Vec(_mm512_scalef_ps(exp_r, n));
#else
  const IntVec ni = at::vec::convert_to_int_of_same_size(n);  // n is integer-valued: the conversion is exact
  const Vec two_n_plus_24 = at::vec::cast<float>((ni + IntVec(127 + 24)) << IntVec(23));
  return (exp_r * two_n_plus_24) * Vec(5.9604644775390625e-8f);  // * 2^-24
#endif
}

// select(mask, a, b) = mask ? a : b per lane, for a mask of all-ones / all-zeros lanes, in three bitwise
// operations (no mask registers; see exp_nonpositive).
C10_ALWAYS_INLINE Vec select(const Vec& mask, const Vec& a, const Vec& b) {
  return b ^ (mask & (a ^ b));
}

// All-ones lanes where x's sign bit is set (x < 0, -0.0, or a NaN with the bit set), zeros elsewhere.
C10_ALWAYS_INLINE Vec sign_mask(const Vec& x) {
  return at::vec::cast<float>(at::vec::cast<int32_t>(x) >> IntVec(31));
}

// log(1 + e) for e in [0, 1]; NaN gives NaN.
//   log(1 + e) = 2 atanh(t) with t = e / (2 + e) in [0, 1/3]:
//   2 atanh(t) = 2t + t^3 (2/3 + 2/5 t^2 + ... + 2/15 t^12), the series cut after t^15, whose remainder is
//   below 2 t^17 / 17 < 1.4e-9 relative at t = 1/3. 2t is exact and the series part is at most 2.6% of the
//   result, so the error is essentially that of t (the rounding of 2 + e and of the division): 1.95 ulp.
//   One division and ten FMA-port operations, against about twenty-five for the range-split Cephes logf
//   form (0.8 ulp): measured at (16, 8142) fp32 on one AVX-512 thread, the sigmoid loss + gradient row
//   took 0.98 ns per element with this form and 1.16 with Cephes'; the division unit is otherwise idle.
//   For tiny e, 2 + e rounds to 2 and t = e / 2 exactly: log1p keeps its relative precision.
C10_ALWAYS_INLINE Vec log1p_unit(const Vec& e) {
  const Vec t = e / (Vec(2.0f) + e);
  const Vec t2 = t * t;
  Vec p(2.0f / 15.0f);
  p = at::vec::fmadd(p, t2, Vec(2.0f / 13.0f));
  p = at::vec::fmadd(p, t2, Vec(2.0f / 11.0f));
  p = at::vec::fmadd(p, t2, Vec(2.0f / 9.0f));
  p = at::vec::fmadd(p, t2, Vec(2.0f / 7.0f));
  p = at::vec::fmadd(p, t2, Vec(2.0f / 5.0f));
  p = at::vec::fmadd(p, t2, Vec(2.0f / 3.0f));
  return at::vec::fmadd(t * t2, p, t + t);
}

// Whether every lane of x is <= bound (a NaN lane is not). One compare into a mask and its test: ATen's
// comparison operators build a vector of all-ones lanes instead (through mask registers on AVX-512).
C10_ALWAYS_INLINE bool all_at_most(const Vec& x, const Vec& bound) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cmp_ps_mask(x, bound, _CMP_NLE_UQ) == 0;  // no lane above bound or NaN
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_movemask_ps(_mm256_cmp_ps(x, bound, _CMP_LE_OQ)) == 0xFF;
#else
  for (int64_t i = 0; i < Vec::size(); ++i) {
    if (!(x[i] <= bound[i])) return false;
  }
  return true;
#endif
}

// log(q) for q in [0, 1]; q below the normal range (0 in particular) gives -inf, NaN gives NaN.
//   q = 2^k f with f in [3/4, 3/2): k = floor(log2(q / (3/4))) is the difference of the bits of q and of 3/4,
//   shifted down by the 23 significand bits (a significand of q below 3/4's borrows one from the exponent);
//   f is q with k subtracted from its exponent field (exact).
//   log q = k ln2 + 2 atanh(t), t = (f - 1) / (f + 1) in [-1/7, 1/5]; f - 1 is exact, so t carries the
//   roundings of f + 1 and of the division only. 2 atanh(t) = 2t + t^3 (2/3 + 2/5 t^2 + 2/7 t^4 + 2/9 t^6),
//   the series cut after t^9, whose remainder is below t^10 / 11 < 1e-8 relative at t = 1/5. k ln2 is
//   added with ln2 split as in exp_nonpositive (k C1 exact). 1.85 ulp at most (see the top of this file),
//   near q = 3/4 from below, where k ln2 and log f partly cancel.
//   For q = 0 (and subnormals) the bit manipulation gives a finite number: the sign of q - FLT_MIN selects
//   -inf there; adding q - q (0, or NaN) passes a NaN, which the integer steps would have lost.
C10_ALWAYS_INLINE Vec log_unit(const Vec& q) {
  const IntVec bits = at::vec::cast<int32_t>(q);
  const IntVec k = (bits - IntVec(0x3f400000)) >> IntVec(23);  // 0x3f400000: the bits of 3/4
  const Vec f = at::vec::cast<float>(bits - (k << IntVec(23)));
  const Vec one(1.0f);
  const Vec t = (f - one) / (f + one);
  const Vec t2 = t * t;
  Vec p(2.0f / 9.0f);
  p = at::vec::fmadd(p, t2, Vec(2.0f / 7.0f));
  p = at::vec::fmadd(p, t2, Vec(2.0f / 5.0f));
  p = at::vec::fmadd(p, t2, Vec(2.0f / 3.0f));
  const Vec log_f = at::vec::fmadd(t * t2, p, t + t);
  const Vec kf = at::vec::convert_to_fp_of_same_size<float>(k);
  const Vec log_q = at::vec::fmadd(kf, Vec(0.693359375f), at::vec::fmadd(kf, Vec(-2.12194440e-4f), log_f));
  const Vec below_normal = sign_mask(q - Vec(std::numeric_limits<float>::min()));
  return select(below_normal, Vec(-std::numeric_limits<float>::infinity()), log_q) + (q - q);
}

}  // namespace CPU_CAPABILITY
}  // namespace cbkernels::cpu
