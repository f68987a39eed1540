// exp and log1p over Vectorized<float>, inlined, for the argument ranges the loss kernels use.
//
// Why not Vectorized's own exp() / log1p(): those call Sleef's u10 functions through the PLT, one call
// per vector, with full-range argument handling. Profiled in the softmax backward at (1024, 8142) fp32
// on one AVX-512 thread, Sleef's expf16 alone took 5 ms of the 10.8 ms (torch.exp of the same tensor,
// through MKL, takes 3.2 ms in all). The loss kernels need exp only for x <= 0 and log1p only on [0, 1],
// so a short inline polynomial after a Cody-Waite reduction does, with the same fp32 accuracy class
// (a couple of ulp; tests/test_vec_math.py measures the error against float64 over the whole range).
//
// Included by loss_kernels.h; everything lives in namespace CPU_CAPABILITY, so each ISA variant gets its
// own copy. Always inlined: a call would spill the loop's constants, and a caller that needs only part of
// a result (the gradient of sigmoid CE does not use log1p) relies on inlining to drop the rest.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>

namespace cbkernels::cpu {
namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
using IntVec = at::vec::Vectorized<int32_t>;

// exp(x) for x <= 0; NaN gives NaN, -inf gives 0. (Also right for 0 < x <= 88; callers never pass x > 0.)
//   x = n ln2 + r, n = round(x / ln2), |r| <= ln2 / 2, so exp(x) = 2^n exp(r).
//   r = (x - n C1) - n C2 with ln2 = C1 + C2, C1 = 0.693359375 (9 significant bits, so n C1 is exact for
//   |n| < 2^15) and C2 = -2.12194440e-4: r carries no cancellation error (Cody & Waite's reduction).
//   exp(r) = 1 + r + r^2 P(r), P of degree 5 with the minimax coefficients of Moshier's Cephes expf
//   (relative error below 2^-23 on |r| <= ln2/2).
//   2^n as two factors 2^a 2^b, a = floor(n / 2), b = n - a, each a normal float for n in [-150, 128]: a
//   result in the subnormal range is then rounded once, by the last multiplication (gradual underflow).
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
  const IntVec ni = at::vec::convert_to_int_of_same_size(n);  // n is integer-valued: the conversion is exact
  const IntVec a = ni >> IntVec(1);                            // arithmetic shift: floor(n / 2)
  const IntVec bias(127);
  const Vec two_a = at::vec::cast<float>((a + bias) << IntVec(23));
  const Vec two_b = at::vec::cast<float>(((ni - a) + bias) << IntVec(23));
  return (exp_r * two_a) * two_b;
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

// log(1 + e) for e in [0, 1], given inv_w = 1 / fl(1 + e) (the caller has it already: it is the sigmoid).
// NaN gives NaN.
//   w = fl(1 + e) in [1, 2] loses the low bits of a small e; c = e - (w - 1) is that rounding error,
//   exactly (Fast2Sum, as 1 >= e), and log(1 + e) = log(w + c) = log(w) + c / w to within (c/w)^2 / 2.
//   log(w): w = 2^k m with k = 1 and m = w / 2 when w >= sqrt(2), else k = 0 and m = w; f = m - 1 is exact
//   (Sterbenz) and lies in [-0.293, 0.415]. log(1 + f) = f - f^2/2 + f^3 Q(f), Q of degree 8 with the
//   minimax coefficients of Moshier's Cephes logf; k ln2 is added as k C1 + k C2 (see exp above).
C10_ALWAYS_INLINE Vec log1p_unit(const Vec& e, const Vec& inv_w) {
  const Vec one(1.0f);
  const Vec w = one + e;
  const Vec c = e - (w - one);
  // halve = all-ones where w >= sqrt(2), as the sign of sqrt(2) - w (w is never -0 or NaN-signed here
  // unless e is NaN, and then every branch gives NaN).
  const Vec halve = sign_mask(Vec(1.41421356237309505f) - w);
  const Vec k = halve & one;
  const Vec f = select(halve, w * Vec(0.5f), w) - one;
  Vec q(7.0376836292e-2f);
  q = at::vec::fmadd(q, f, Vec(-1.1514610310e-1f));
  q = at::vec::fmadd(q, f, Vec(1.1676998740e-1f));
  q = at::vec::fmadd(q, f, Vec(-1.2420140846e-1f));
  q = at::vec::fmadd(q, f, Vec(1.4249322787e-1f));
  q = at::vec::fmadd(q, f, Vec(-1.6668057665e-1f));
  q = at::vec::fmadd(q, f, Vec(2.0000714765e-1f));
  q = at::vec::fmadd(q, f, Vec(-2.4999993993e-1f));
  q = at::vec::fmadd(q, f, Vec(3.3333331174e-1f));
  const Vec f2 = f * f;
  Vec y = at::vec::fmadd(q * f, f2, at::vec::fmadd(k, Vec(-2.12194440e-4f), c * inv_w));
  y = at::vec::fmadd(f2, Vec(-0.5f), y);
  return at::vec::fmadd(k, Vec(0.693359375f), f + y);
}

}  // namespace CPU_CAPABILITY
}  // namespace cbkernels::cpu
