// AVX2 + FMA variant of the loss kernels; setup.py adds -mavx2 -mfma -mf16c -DCPU_CAPABILITY=AVX2.
#if !defined(CPU_CAPABILITY_AVX2)
#error "loss_kernels_avx2.cpp must be compiled with the AVX2 flags of setup.py (CPU_CAPABILITY_AVX2)"
#endif
#include "loss_kernels.h"
