// Entry points of the per-ISA CPU kernels (loss_kernels*.cpp), declared for ops.cpp, which picks one
// variant per process. Only common/loss_args.h besides: no torch or vector header, so the per-ISA code
// shares no inline function with the generic code through this file.
#pragma once

#include <cstdint>

#include "common/loss_args.h"

namespace cbkernels::cpu {

// Processes rows [begin, end). Class-index targets are already validated (every one is ignore_index or in
// [0, C): ops.cpp). Dense target values are checked here, each row's just before the row is computed: at the
// first row holding a value outside the family's range (common/loss_ops.h: dense_target_in_range; NaN is out)
// the function returns false, the rest of its rows unwritten; true otherwise.
using RowsFn = bool (*)(const LossArgs&, int64_t begin, int64_t end);

// Each ISA variant (namespace DEFAULT, AVX2, AVX512) defines <family>_rows for every family of
// common/families.h (loss_kernels.h: sigmoid_focal_rows, softmax_ce_rows, ...), a RowsFn.
// CBKERNELS_DECLARE_ROWS(isa) declares them in namespace isa, with isa::kRows, the variant's entry points
// indexed by Family.
#define CBKERNELS_ROWS_DECLARATION(enumerator, name, hyperparameters) \
  bool name##_rows(const LossArgs& args, int64_t begin, int64_t end);
#define CBKERNELS_ROWS_ENTRY(enumerator, name, hyperparameters) &name##_rows,

#define CBKERNELS_DECLARE_ROWS(isa)                                             \
  namespace isa {                                                               \
  CBKERNELS_FAMILIES(CBKERNELS_ROWS_DECLARATION)                                \
  inline constexpr RowsFn kRows[] = {CBKERNELS_FAMILIES(CBKERNELS_ROWS_ENTRY)}; \
  static_assert(sizeof(kRows) / sizeof(kRows[0]) == kNumFamilies);              \
  }

}  // namespace cbkernels::cpu
