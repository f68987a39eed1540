"""cbkernels/gamma_cases.py mirrors `enum class GammaCase` of csrc/common/gamma_case.h, which the CPU and
CUDA kernels specialise on; the Triton kernels take the Python one. Pure Python: runs without the
extension. The C++ enumerator kZero is the Python member ZERO (the "k" dropped, upper case)."""
import math
import re
from pathlib import Path

import pytest

from cbkernels.gamma_cases import GammaCase, gamma_case

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "common" / "gamma_case.h"


def cpp_enumerators() -> dict:
    """{Python-style name: value} of the enumerators of GammaCase in the C++ header."""
    text = HEADER.read_text()
    body = re.search(r"enum class GammaCase\s*:\s*int\s*\{(.*?)\};", text, re.S)
    assert body, f"no `enum class GammaCase : int {{...}};` in {HEADER}"
    code = re.sub(r"//[^\n]*", "", body.group(1))
    items = [item.strip() for item in code.split(",") if item.strip()]
    enumerators = {}
    for item in items:
        match = re.fullmatch(r"k([A-Z][A-Za-z0-9]*)\s*=\s*(\d+)", item)
        assert match, f"GammaCase enumerator {item!r}: expected kName = <value> (explicit values, kept in step)"
        enumerators[match.group(1).upper()] = int(match.group(2))
    return enumerators


def test_python_enum_mirrors_the_cpp_enum():
    assert cpp_enumerators() == {case.name: case.value for case in GammaCase}


@pytest.mark.parametrize("gamma, case", [
    (0.0, GammaCase.ZERO), (-0.0, GammaCase.ZERO), (0.5, GammaCase.HALF), (1.0, GammaCase.ONE),
    (2.0, GammaCase.TWO), (3.7, GammaCase.GENERAL), (0.25, GammaCase.GENERAL), (1.5, GammaCase.GENERAL),
    (math.inf, GammaCase.GENERAL), (math.nan, GammaCase.GENERAL), (2, GammaCase.TWO),
])
def test_gamma_case(gamma, case):
    assert gamma_case(gamma) is case


def test_gamma_case_compares_in_float32_as_the_kernels():
    # The kernels receive gamma as a float (C++ gamma_case(float)): a double that rounds to 0.5 in float32 is
    # the sqrt(q) case there, so it is here; one float32 ulp away is not.
    assert gamma_case(0.5 + 2.0**-30) is GammaCase.HALF
    assert gamma_case(0.5 + 2.0**-24) is GammaCase.GENERAL
    assert gamma_case(1e-50) is GammaCase.ZERO
