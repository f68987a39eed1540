// AVX-512 variant of the loss kernels; setup.py adds -mavx512{f,bw,vl,dq} -mfma -mf16c -DCPU_CAPABILITY=AVX512.
#if !defined(CPU_CAPABILITY_AVX512)
#error "loss_kernels_avx512.cpp must be compiled with the AVX-512 flags of setup.py (CPU_CAPABILITY_AVX512)"
#endif
#include "loss_kernels.h"
