// The values of gamma for which the kernels specialise the focal modulator (1 - p)^gamma = q^gamma at
// compile time: 1, sqrt(q), q and q * q cost no exp, where the general case needs exp(-gamma softplus(u)).
// Shared by the CPU kernels (csrc/cpu/loss_kernels.h) and the CUDA kernels (csrc/cuda/kernels.cuh), so no
// torch header. cbkernels/gamma_cases.py mirrors the enum for the Triton kernels, and
// tests/test_gamma_cases.py parses the enumerators below: keep each on its own line with an explicit value.
#pragma once

namespace cbkernels {

enum class GammaCase : int {
  kZero = 0,     // sigmoid cross entropy: no modulator
  kHalf = 1,     // sqrt(q)
  kOne = 2,      // q
  kTwo = 3,      // q * q
  kGeneral = 4,  // exp(-gamma * softplus(u))
};

// Compared as the kernels receive gamma, a float: a double that rounds to 0.5f takes the sqrt(q) path.
constexpr GammaCase gamma_case(float gamma) {
  if (gamma == 0.0f) return GammaCase::kZero;
  if (gamma == 0.5f) return GammaCase::kHalf;
  if (gamma == 1.0f) return GammaCase::kOne;
  if (gamma == 2.0f) return GammaCase::kTwo;
  return GammaCase::kGeneral;
}

}  // namespace cbkernels
