// The arguments of one loss kernel call as plain pointers and sizes: what the op wrappers
// (csrc/common/loss_ops.h: checks, allocation) hand to a backend's kernels (csrc/cpu/loss_kernels.h,
// csrc/cuda/launch.cu). No torch header, so that nvcc compiles the CUDA kernels against it with a
// CPU-only torch, and so that the per-ISA CPU code shares no inline function with the generic code
// through it. Plain data: the CUDA kernels take it by value as a kernel parameter.
#pragma once

#include <cstdint>

#include "common/families.h"

namespace cbkernels {

// The loss families of docs/op-contract.md (common/families.h), in that list's order; each has a forward
// and a backward op.
enum class Family {
#define CBKERNELS_FAMILY_ENUMERATOR(enumerator, name, hyperparameters) enumerator,
  CBKERNELS_FAMILIES(CBKERNELS_FAMILY_ENUMERATOR)
#undef CBKERNELS_FAMILY_ENUMERATOR
};

inline constexpr int kNumFamilies = 0
#define CBKERNELS_COUNT_FAMILY(enumerator, name, hyperparameters) +1
    CBKERNELS_FAMILIES(CBKERNELS_COUNT_FAMILY)
#undef CBKERNELS_COUNT_FAMILY
    ;

// Storage type of the logits and of the gradient; the arithmetic is fp32 whatever it is.
enum class Dtype { kFloat32, kFloat16, kBFloat16 };

struct LossArgs {
  const void* logits;         // (num_rows, num_classes) of logits_dtype, column stride 1, row stride row_stride
  int64_t row_stride;         // >= 0, in elements
  int64_t num_rows;
  int64_t num_classes;        // >= 1
  Dtype logits_dtype;
  // Index targets (dense_target false): (num_rows,) contiguous, int64 when target_is_int64 else int32.
  // Dense targets (dense_target true): (num_rows, num_classes) contiguous of logits_dtype, row i's target
  // distribution t_i (sigmoid family: each t_ic in [0, 1]; softmax families: t_ic >= 0, used as given). No row
  // is ignored and target_margin is nullptr (the op wrappers refuse a margin with dense targets).
  const void* target;
  bool target_is_int64;
  bool dense_target;
  // Row weighting: row i's weight is a_i = sample_weight[i] * (class_weight[y_i], or sum_c t_ic class_weight[c]
  // for dense targets; 1 when class_weight is nullptr).
  const float* class_weight;  // (num_classes,) contiguous, or nullptr
  // Element weighting: every per-class term l_ic of row i is multiplied by element_weight[c], so that
  // loss_i = a_i * sum_c element_weight[c] * l_ic (docs/op-contract.md, docs/math.md section 14).
  const float* element_weight;  // (num_classes,) contiguous, or nullptr (1)
  // The logit adjustments (docs/op-contract.md): the kernels compute the loss and its gradient at the
  // adjusted logits z'_ic = z_ic + logit_offset[c] - [c == y_i] target_margin[y_i], each term only when
  // its pointer is set. The gradient with respect to z is the one at z' (dz'/dz is the identity).
  const float* logit_offset;   // (num_classes,) contiguous, or nullptr (no offset)
  const float* target_margin;  // (num_classes,) contiguous, or nullptr (no margin)
  // Per-row sample weights: row i's loss and gradient are multiplied by sample_weight[i] (with alpha_y, so
  // the kernels read alpha_i = class_weight[y_i] * sample_weight[i] once per row; a_i above).
  const float* sample_weight;  // (num_rows,) contiguous, or nullptr (1)
  const float* grad_loss;     // (num_rows,) contiguous upstream gradient of the backward ops, or nullptr (1)
  int64_t ignore_index;
  // The families' hyperparameters (common/families.h: gamma, label_smoothing, ...), each a float named as in
  // the op schemas; a family reads its own and ignores the others.
#define CBKERNELS_HYPERPARAMETER_FIELD(name, in_domain, domain) float name;
  CBKERNELS_HYPERPARAMETERS(CBKERNELS_HYPERPARAMETER_FIELD)
#undef CBKERNELS_HYPERPARAMETER_FIELD
  float* loss;                // (num_rows,), or nullptr (the backward ops write no loss)
  void* grad;                 // (num_rows, num_classes) contiguous of logits_dtype, or nullptr (loss only)
};

}  // namespace cbkernels
