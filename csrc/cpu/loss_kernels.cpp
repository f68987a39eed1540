// Generic (no vector extension assumed) variant of the loss kernels; setup.py compiles this file with the
// compiler's baseline flags. Vectorized<float> then falls back to ATen's portable implementation.
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif
#include "loss_kernels.h"
