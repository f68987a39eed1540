// Entry points of the per-ISA CPU kernels (loss_kernels*.cpp), declared for ops.cpp, which picks one
// variant per process. Only common/loss_args.h besides: no torch or vector header, so the per-ISA code
// shares no inline function with the generic code through this file.
#pragma once

#include <cstdint>

#include "common/loss_args.h"

namespace cbkernels::cpu {

// Processes rows [begin, end). Targets are already validated: every one is ignore_index or in [0, C).
using RowsFn = void (*)(const LossArgs&, int64_t begin, int64_t end);

// Each ISA variant (namespace DEFAULT, AVX2, AVX512) defines these two.
#define CBKERNELS_DECLARE_ROWS(isa)                                             \
  namespace isa {                                                               \
  void sigmoid_focal_rows(const LossArgs& args, int64_t begin, int64_t end);    \
  void softmax_ce_rows(const LossArgs& args, int64_t begin, int64_t end);       \
  }

}  // namespace cbkernels::cpu
