"""The one switch between GPU instructions and what Triton's CPU interpreter can run.

Triton lowers most element math to the instruction wanted on sm_90 by itself (checked in the PTX):
tl.exp2 is `ex2.approx.ftz.f32` (one MUFU.EX2, so exp(x) is exp2(x * log2 e) with the constant folded
into an FMA), tl.sqrt is `sqrt.approx.ftz.f32`. A division, though, is `div.full.f32` (a range-scaled
reciprocal, about 8 instructions). The sigmoid family needs reciprocals of values in [2, 6] only, where
`rcp.approx.ftz.f32` (one MUFU.RCP, at most 1 ulp from the exact reciprocal) is as accurate as the
division and needs no range scaling. That instruction is inline PTX, which the interpreter cannot run:
under TRITON_INTERPRET=1 the same reciprocal is a division (same math, correctly rounded).

PTX is read once, when this module is imported: Triton reads TRITON_INTERPRET once too, at its import.
"""
import os

import triton
import triton.language as tl

PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)


@triton.jit
def rcp(x):
    """1 / x for normal fp32 x (the callers' x lie in [2^-12, 6], far from rcp.approx's subnormal flush): one
    MUFU.RCP on the GPU, within 1 ulp."""
    if PTX:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def two_atanh(s):
    """2 atanh(s) for s in [0, 1/3]: log1p(x) when s = x / (2 + x), x in [0, 1] (docs/math.md, section 8):
    the series 2 (s + s^3/3 + s^5/5 + ...), its first eight terms, relative remainder below 1.6e-9."""
    s2 = s * s
    c = s2 * (2.0 / 15.0) + (2.0 / 13.0)
    c = c * s2 + (2.0 / 11.0)
    c = c * s2 + (2.0 / 9.0)
    c = c * s2 + (2.0 / 7.0)
    c = c * s2 + (2.0 / 5.0)
    c = c * s2 + (2.0 / 3.0)
    c = c * s2 + 2.0
    return s * c
