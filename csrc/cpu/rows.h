// Entry points of the per-ISA CPU kernels (loss_kernels*.cpp), declared for ops.cpp, which picks one
// variant per process. Only common/loss_args.h besides: no torch or vector header, so the per-ISA code
// shares no inline function with the generic code through this file.
#pragma once

#include <cstdint>

#include "common/loss_args.h"

namespace cbkernels::cpu {

// Processes rows [begin, end). Targets are already validated: every class index is ignore_index or in [0, C),
// every dense target value in the family's range (ops.cpp: the dense values of rows [begin, end) by
// DenseCheckFn, just before).
using RowsFn = void (*)(const LossArgs&, int64_t begin, int64_t end);

// Whether every value of rows [begin, end) of a dense target (LossArgs::target, of logits_dtype, row stride C)
// is in [0, limit]; NaN is not. ops.cpp's check of the dense target values, vectorised for the running CPU.
using DenseCheckFn = bool (*)(const LossArgs&, float limit, int64_t begin, int64_t end);

// Each ISA variant (namespace DEFAULT, AVX2, AVX512) defines <family>_rows for every family of
// common/families.h (loss_kernels.h: sigmoid_focal_rows, softmax_ce_rows, ...) and dense_target_in_range,
// a DenseCheckFn. CBKERNELS_DECLARE_ROWS(isa) declares them in namespace isa, with isa::kRows, the variant's
// entry points indexed by Family.
#define CBKERNELS_ROWS_DECLARATION(enumerator, name, hyperparameters) \
  void name##_rows(const LossArgs& args, int64_t begin, int64_t end);
#define CBKERNELS_ROWS_ENTRY(enumerator, name, hyperparameters) &name##_rows,

#define CBKERNELS_DECLARE_ROWS(isa)                                                          \
  namespace isa {                                                                            \
  CBKERNELS_FAMILIES(CBKERNELS_ROWS_DECLARATION)                                             \
  bool dense_target_in_range(const LossArgs& args, float limit, int64_t begin, int64_t end); \
  inline constexpr RowsFn kRows[] = {CBKERNELS_FAMILIES(CBKERNELS_ROWS_ENTRY)};              \
  static_assert(sizeof(kRows) / sizeof(kRows[0]) == kNumFamilies);                           \
  }

}  // namespace cbkernels::cpu
