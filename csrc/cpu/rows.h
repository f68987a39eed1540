// The arguments of one loss kernel call, as plain pointers and sizes: the interface between the generic
// translation unit (ops.cpp: checks, allocation, threading, ISA choice) and the per-ISA kernel bodies
// (loss_kernels*.cpp). No torch or vector headers here, so the per-ISA code shares no inline functions
// with the generic code through this file.
#pragma once

#include <cstdint>

namespace cbkernels::cpu {

enum class LogitsType { kFloat, kBFloat16, kHalf };

struct LossArgs {
  const void* logits;          // (N, C), column stride 1, row stride `row_stride` elements
  int64_t row_stride;
  int64_t num_rows;
  int64_t num_classes;
  LogitsType logits_type;
  const void* target;          // (N,) contiguous, int64 or int32
  bool target_is_int64;
  const float* class_weight;   // (C,) or nullptr (alpha_y = 1)
  const float* grad_loss;      // (N,) upstream gradient for the backward ops; nullptr in the forward ops
  int64_t ignore_index;
  float param;                 // gamma (sigmoid family) or label smoothing (softmax)
  float* loss;                 // (N,) or nullptr (backward: no loss)
  void* grad;                  // (N, C) contiguous in the logits' type, or nullptr (no gradient)
};

// Processes rows [begin, end). Targets are already validated: every one is ignore_index or in [0, C).
using RowsFn = void (*)(const LossArgs&, int64_t begin, int64_t end);

// Each ISA variant (namespace DEFAULT, AVX2, AVX512) defines these two.
#define CBKERNELS_DECLARE_ROWS(isa)                                             \
  namespace isa {                                                               \
  void sigmoid_focal_rows(const LossArgs& args, int64_t begin, int64_t end);    \
  void softmax_ce_rows(const LossArgs& args, int64_t begin, int64_t end);       \
  }

}  // namespace cbkernels::cpu
