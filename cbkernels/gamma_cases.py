"""The gamma values for which the focal kernels specialise the modulator (1 - p)^gamma = q^gamma.

Python mirror of `enum class GammaCase` in csrc/common/gamma_case.h, which the CPU and CUDA kernels use;
the Triton kernels (cbkernels/triton/kernels.py) take the case as a constexpr. tests/test_gamma_cases.py
checks that the names (C++ kZero is ZERO here) and values agree.
"""
from __future__ import annotations

import ctypes
from enum import IntEnum


class GammaCase(IntEnum):
    ZERO = 0     # sigmoid cross entropy: no modulator
    HALF = 1     # sqrt(q)
    ONE = 2      # q
    TWO = 3      # q * q
    GENERAL = 4  # exp(-gamma * softplus(u))


def gamma_case(gamma: float) -> GammaCase:
    """The case of `gamma`, compared as the kernels receive it: a float32 (C++ gamma_case(float)), so a
    value that rounds to 0.5 in float32 takes the sqrt(q) path there and here alike."""
    as_float32 = ctypes.c_float(gamma).value  # round to nearest even; out of range gives +-inf, NaN stays NaN
    if as_float32 == 0.0:
        return GammaCase.ZERO
    if as_float32 == 0.5:
        return GammaCase.HALF
    if as_float32 == 1.0:
        return GammaCase.ONE
    if as_float32 == 2.0:
        return GammaCase.TWO
    return GammaCase.GENERAL
