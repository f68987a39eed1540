// The ops of docs/op-contract.md, two per family of common/families.h, over any backend: their schemas
// (define_loss_ops, for csrc/cbkernels.cpp), the hyperparameter and input checks, the output allocation
// and the hand-off to the backend's kernels as one LossArgs. csrc/cpu/ops.cpp and csrc/cuda/bindings.cpp
// each define a Backend and register its ops with register_loss_ops<Backend>. Nothing here names a family:
// everything per family comes from the list in common/families.h.
//
// A Backend is a struct with
//   static constexpr const char* kTag;     appended to the op name in messages ("" or " (CUDA)")
//   static constexpr const char* kDevice;  the device type it computes on, for messages ("CPU", "CUDA")
//   static bool on_device(const at::Tensor& t);   t is on that device type
//   static void check_values(OpName op, Family family, const LossArgs& args);
//       checks that read tensor values on the host; called after the metadata checks and before any
//       output is allocated. The CPU validates class-index targets there; its dense target values (in the
//       family's range, dense_target_in_range) are checked by its kernels, each row just before they compute
//       it (a bad one raises after some rows of the fresh outputs were written, never returned). The CUDA backend checks nothing: a host read would synchronise the device, so its
//       kernels write a NaN row for a bad class index and read an out-of-range dense target value as NaN.
//   class Launch, with
//       Launch(OpName op, const LossArgs& args, const at::Tensor& logits);
//       void operator()(Family family, const LossArgs& args) const;
//     constructed after the checks and before the outputs are allocated (it may still refuse the call,
//     for instance a bad launch configuration) and alive until the kernels are queued (a device guard
//     can be a member); the call runs the family's kernels on args, whose outputs are then filled in.
//
// Every tensor the kernels read through a raw pointer is checked here: layout, device, dtype, shape.
// Nothing here reads a tensor value.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <tuple>
#include <utility>

#include "common/loss_args.h"

namespace cbkernels {

// An op's name in messages: "cbkernels::softmax_ce_forward" followed by the backend's tag. Streamed
// into TORCH_CHECK's message, so naming an op builds no string unless a check fails.
struct OpName {
  const char* op;   // the schema name, "softmax_ce_forward"
  const char* tag;  // Backend::kTag
};

inline std::ostream& operator<<(std::ostream& out, const OpName& name) {
  return out << "cbkernels::" << name.op << name.tag;
}

// The hyperparameters of common/families.h by index: HyperparameterId::gamma, ... (an unscoped enum in a
// struct, so that FamilyInfo below, which derives from it, names them as families.h does).
struct HyperparameterId {
  enum Id : int {
#define CBKERNELS_HYPERPARAMETER_ID(name, in_domain, domain) name,
    CBKERNELS_HYPERPARAMETERS(CBKERNELS_HYPERPARAMETER_ID)
#undef CBKERNELS_HYPERPARAMETER_ID
  };
};

// Per hyperparameter, indexed by HyperparameterId: its schema name and the LossArgs field that holds it.
struct HyperparameterInfo {
  const char* name;
  float LossArgs::*field;
};

inline constexpr HyperparameterInfo kHyperparameterInfo[] = {
#define CBKERNELS_HYPERPARAMETER_INFO(name, in_domain, domain) {#name, &LossArgs::name},
    CBKERNELS_HYPERPARAMETERS(CBKERNELS_HYPERPARAMETER_INFO)
#undef CBKERNELS_HYPERPARAMETER_INFO
};

// The hyperparameter `id` as the kernels take it, refused unless in its domain (common/families.h,
// docs/op-contract.md).
inline float checked_hyperparameter(HyperparameterId::Id id, OpName op, double value) {
  switch (id) {
#define CBKERNELS_CHECK_HYPERPARAMETER(name, in_domain, domain)                    \
  case HyperparameterId::name:                                                     \
    TORCH_CHECK(in_domain, op, ": " #name " must be " domain ", got ", value);    \
    break;
    CBKERNELS_HYPERPARAMETERS(CBKERNELS_CHECK_HYPERPARAMETER)
#undef CBKERNELS_CHECK_HYPERPARAMETER
  }
  return static_cast<float>(value);
}

template <typename... Ids>
constexpr std::array<HyperparameterId::Id, sizeof...(Ids)> hyperparameter_list(Ids... ids) {
  return {ids...};
}

// Per family (common/families.h): the schema names of its two ops and its hyperparameters in schema order.
template <Family F>
struct FamilyInfo;

#define CBKERNELS_FAMILY_INFO(enumerator, name, hyperparameters)                    \
  template <>                                                                       \
  struct FamilyInfo<Family::enumerator> : HyperparameterId {                        \
    static constexpr const char* kForward = #name "_forward";                      \
    static constexpr const char* kBackward = #name "_backward";                    \
    static constexpr const char* kLoss = #name "_loss";                            \
    static constexpr auto kHyperparameters = hyperparameter_list hyperparameters;   \
  };
CBKERNELS_FAMILIES(CBKERNELS_FAMILY_INFO)
#undef CBKERNELS_FAMILY_INFO

// The checked tensors of one call and the LossArgs pointing into them; the tensors keep any contiguous
// copies alive while the kernels run.
struct CheckedInputs {
  at::Tensor logits, target, class_weight, grad_loss, logit_offset, target_margin, sample_weight, element_weight;
  LossArgs args{};
};

// The optional tensors of docs/op-contract.md, the last arguments of every op: the logit adjustments
// (C,), the per-row sample weights (N,) and the per-class element weights (C,), float32 or None.
struct OptionalInputs {
  const std::optional<at::Tensor>& logit_offset;
  const std::optional<at::Tensor>& target_margin;
  const std::optional<at::Tensor>& sample_weight;
  const std::optional<at::Tensor>& element_weight;
};

// Their schema text, appended to every op's arguments (defaults None: calls written before they existed
// keep working).
inline constexpr const char* kOptionalInputArgs =
    ", Tensor? logit_offset=None, Tensor? target_margin=None, Tensor? sample_weight=None, "
    "Tensor? element_weight=None";

// The values a dense target may hold in `family` (docs/op-contract.md): [0, 1] for the sigmoid family (a
// probability per one-vs-all task), >= 0 for the softmax families (a distribution, used as given). NaN is out
// of range. The CPU checks it on the host (cpu/ops.cpp); the GPU kernels read an out-of-range value as NaN.
inline bool dense_target_in_range(Family family, float t) {
  return family == Family::kSigmoidFocal ? (t >= 0.0f && t <= 1.0f) : t >= 0.0f;
}

inline const char* dense_target_range_text(Family family) {
  return family == Family::kSigmoidFocal ? "in [0, 1]" : ">= 0 (and not NaN)";
}

inline Dtype logits_dtype(OpName op, const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  }
}

inline void check_dense(OpName op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense tensor, got layout ", t.layout());
}

// An argument besides the logits: dense and on the logits' device (the same GPU, not only a GPU).
inline void check_beside_logits(OpName op, const char* name, const at::Tensor& t, const at::Tensor& logits) {
  check_dense(op, name, t);
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " must be on the logits' device ", logits.device(),
              ", got ", t.device());
}

// t has shape (length,); length_name is its symbol in docs/op-contract.md ("N" or "C").
inline void check_vector_shape(OpName op, const char* name, const at::Tensor& t, const char* length_name,
                               int64_t length) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == length, op, ": ", name, " must have shape (", length_name, ",) = (",
              length, ",), got ", t.sizes());
}

// class_weight, logit_offset, target_margin (C,), sample_weight and grad_loss (N,): float32 vectors beside the
// logits, read contiguously.
inline at::Tensor checked_float_vector(OpName op, const char* name, const at::Tensor& t, const at::Tensor& logits,
                                       const char* length_name, int64_t length) {
  check_beside_logits(op, name, t, logits);
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  check_vector_shape(op, name, t, length_name, length);
  return t.contiguous();
}

// grad_loss is nullptr for the forward ops.
template <typename Backend>
CheckedInputs check_inputs(OpName op, Family family, const at::Tensor& logits, const at::Tensor& target,
                           const std::optional<at::Tensor>& class_weight, const at::Tensor* grad_loss,
                           int64_t ignore_index, OptionalInputs optional) {
  check_dense(op, "logits", logits);
  TORCH_CHECK(Backend::on_device(logits), op, ": logits must be a ", Backend::kDevice, " tensor, got ",
              logits.device());
  TORCH_CHECK(logits.dim() == 2, op, ": logits must have shape (N, C), got ", logits.sizes());
  const int64_t n = logits.size(0), num_classes = logits.size(1);
  TORCH_CHECK(num_classes >= 1, op, ": logits must have at least one class (C >= 1), got shape ", logits.sizes());
  const Dtype dtype = logits_dtype(op, logits);
  check_beside_logits(op, "target", target, logits);
  // Index targets (N,) int64/int32, or dense targets (N, C) in the logits' dtype (read as the logits are).
  const bool dense_target = target.dim() == 2 && at::isFloatingType(target.scalar_type());
  if (dense_target) {
    TORCH_CHECK(target.sizes() == logits.sizes(), op, ": a dense target must have the logits' shape (N, C) = (", n,
                ", ", num_classes, "), got ", target.sizes());
    TORCH_CHECK(target.scalar_type() == logits.scalar_type(), op,
                ": a dense target must have the logits' dtype ", logits.scalar_type(), ", got ", target.scalar_type());
    TORCH_CHECK(!optional.target_margin.has_value(), op,
                ": target_margin needs class-index targets (it shifts the target class's logit); got a dense target");
  } else {
    TORCH_CHECK(target.dim() == 1, op, ": target must have shape (N,) = (", n, ",) of class indices, or (N, C) = (",
                n, ", ", num_classes, ") of floating-point target values, got ", target.scalar_type(), " of shape ",
                target.sizes());
    check_vector_shape(op, "target", target, "N", n);
    TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt, op,
                ": target must be int64 or int32 class indices, got ", target.scalar_type());
  }

  CheckedInputs in;
  // Column stride 1 is what the vector accesses need; the row stride is honoured as it is. A size-1
  // dimension's stride is meaningless, so only C > 1 needs the check.
  in.logits = (num_classes == 1 || logits.stride(1) == 1) ? logits : logits.contiguous();
  in.target = target.contiguous();
  const auto class_vector = [&](const char* name, const std::optional<at::Tensor>& t) {
    return t.has_value() ? checked_float_vector(op, name, *t, logits, "C", num_classes) : at::Tensor();
  };
  in.class_weight = class_vector("class_weight", class_weight);
  in.logit_offset = class_vector("logit_offset", optional.logit_offset);
  in.target_margin = class_vector("target_margin", optional.target_margin);
  in.element_weight = class_vector("element_weight", optional.element_weight);
  if (optional.sample_weight.has_value()) {
    in.sample_weight = checked_float_vector(op, "sample_weight", *optional.sample_weight, logits, "N", n);
  }
  if (grad_loss != nullptr) {
    in.grad_loss = checked_float_vector(op, "grad_loss", *grad_loss, logits, "N", n);
  }

  LossArgs& a = in.args;
  a.logits = in.logits.data_ptr();
  a.row_stride = in.logits.stride(0);
  a.num_rows = n;
  a.num_classes = num_classes;
  a.logits_dtype = dtype;
  a.target = in.target.data_ptr();
  a.target_is_int64 = in.target.scalar_type() == at::kLong;
  a.dense_target = dense_target;
  const auto pointer = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; };
  a.class_weight = pointer(in.class_weight);
  a.logit_offset = pointer(in.logit_offset);
  a.target_margin = pointer(in.target_margin);
  a.sample_weight = pointer(in.sample_weight);
  a.element_weight = pointer(in.element_weight);
  a.grad_loss = in.grad_loss.defined() ? in.grad_loss.data_ptr<float>() : nullptr;
  a.ignore_index = ignore_index;
  Backend::check_values(op, family, a);
  return in;
}

// One double argument of an op per hyperparameter of its family.
template <std::size_t>
using HyperparameterArg = double;

// The ops of family F on Backend, with the signatures of their schemas (define_family_ops below).
template <typename Backend, Family F,
          typename = std::make_index_sequence<FamilyInfo<F>::kHyperparameters.size()>>
struct LossOps;

template <typename Backend, Family F, std::size_t... I>
struct LossOps<Backend, F, std::index_sequence<I...>> {

  static std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& logits, const at::Tensor& target,
                                                    const std::optional<at::Tensor>& class_weight,
                                                    HyperparameterArg<I>... hyperparameters, int64_t ignore_index,
                                                    bool with_grad, const std::optional<at::Tensor>& logit_offset,
                                                    const std::optional<at::Tensor>& target_margin,
                                                    const std::optional<at::Tensor>& sample_weight,
                                                    const std::optional<at::Tensor>& element_weight) {
    const OpName op{FamilyInfo<F>::kForward, Backend::kTag};
    CheckedInputs in = checked(op, logits, target, class_weight, nullptr, ignore_index,
                               {logit_offset, target_margin, sample_weight, element_weight}, hyperparameters...);
    const typename Backend::Launch launch(op, in.args, in.logits);
    const int64_t n = in.args.num_rows;
    at::Tensor loss = at::empty({n}, logits.options().dtype(at::kFloat));
    at::Tensor grad = with_grad ? at::empty({n, in.args.num_classes}, logits.options())
                                : at::empty({0}, logits.options());
    in.args.loss = loss.data_ptr<float>();
    in.args.grad = with_grad ? grad.data_ptr() : nullptr;
    launch(F, in.args);
    return {loss, grad};
  }

  static at::Tensor backward(const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& class_weight, const at::Tensor& grad_loss,
                             HyperparameterArg<I>... hyperparameters, int64_t ignore_index,
                             const std::optional<at::Tensor>& logit_offset,
                             const std::optional<at::Tensor>& target_margin,
                             const std::optional<at::Tensor>& sample_weight,
                             const std::optional<at::Tensor>& element_weight) {
    const OpName op{FamilyInfo<F>::kBackward, Backend::kTag};
    CheckedInputs in = checked(op, logits, target, class_weight, &grad_loss, ignore_index,
                               {logit_offset, target_margin, sample_weight, element_weight}, hyperparameters...);
    const typename Backend::Launch launch(op, in.args, in.logits);
    at::Tensor grad = at::empty({in.args.num_rows, in.args.num_classes}, logits.options());
    in.args.loss = nullptr;
    in.args.grad = grad.data_ptr();
    launch(F, in.args);
    return grad;
  }

 private:
  // The hyperparameters are checked first, in schema order: a bad value is refused whatever the tensors are.
  static CheckedInputs checked(OpName op, const at::Tensor& logits, const at::Tensor& target,
                               const std::optional<at::Tensor>& class_weight, const at::Tensor* grad_loss,
                               int64_t ignore_index, OptionalInputs optional,
                               HyperparameterArg<I>... hyperparameters) {
    // (maybe_unused: a family without hyperparameters reads neither.)
    [[maybe_unused]] constexpr auto& ids = FamilyInfo<F>::kHyperparameters;
    [[maybe_unused]] const std::array<float, sizeof...(I)> values{
        checked_hyperparameter(ids[I], op, hyperparameters)...};
    CheckedInputs in = check_inputs<Backend>(op, F, logits, target, class_weight, grad_loss, ignore_index, optional);
    ((in.args.*kHyperparameterInfo[ids[I]].field = values[I]), ...);
    return in;
  }
};

// The schemas of the two ops of family F, from its hyperparameters; for the sigmoid family
//   sigmoid_focal_forward(Tensor logits, Tensor target, Tensor? class_weight, float gamma, int ignore_index,
//                         bool with_grad, Tensor? logit_offset=None, Tensor? target_margin=None,
//                         Tensor? sample_weight=None, Tensor? element_weight=None) -> (Tensor, Tensor)
//   sigmoid_focal_backward(Tensor logits, Tensor target, Tensor? class_weight, Tensor grad_loss, float gamma,
//                          int ignore_index, Tensor? logit_offset=None, Tensor? target_margin=None,
//                          Tensor? sample_weight=None, Tensor? element_weight=None) -> Tensor
template <Family F>
void define_family_ops(torch::Library& m) {
  std::string floats;  // "float gamma, "
  for (const HyperparameterId::Id id : FamilyInfo<F>::kHyperparameters) {
    floats += std::string("float ") + kHyperparameterInfo[id].name + ", ";
  }
  const std::string forward = std::string(FamilyInfo<F>::kForward) +
                              "(Tensor logits, Tensor target, Tensor? class_weight, " + floats +
                              "int ignore_index, bool with_grad" + kOptionalInputArgs + ") -> (Tensor, Tensor)";
  const std::string backward = std::string(FamilyInfo<F>::kBackward) +
                               "(Tensor logits, Tensor target, Tensor? class_weight, Tensor grad_loss, " + floats +
                               "int ignore_index" + kOptionalInputArgs + ") -> Tensor";
  m.def(forward.c_str());
  m.def(backward.c_str());
}

// Defines the ops of every family, in the TORCH_LIBRARY(cbkernels, m) block of csrc/cbkernels.cpp.
inline void define_loss_ops(torch::Library& m) {
#define CBKERNELS_DEFINE_FAMILY_OPS(enumerator, name, hyperparameters) define_family_ops<Family::enumerator>(m);
  CBKERNELS_FAMILIES(CBKERNELS_DEFINE_FAMILY_OPS)
#undef CBKERNELS_DEFINE_FAMILY_OPS
}

// Registers the ops of family F on Backend.
template <typename Backend, Family F>
void register_family_ops(torch::Library& m) {
  m.impl(FamilyInfo<F>::kForward, &LossOps<Backend, F>::forward);
  m.impl(FamilyInfo<F>::kBackward, &LossOps<Backend, F>::backward);
}

// Registers the ops of every family on Backend, in a TORCH_LIBRARY_IMPL(cbkernels, <dispatch key>, m) block.
template <typename Backend>
void register_loss_ops(torch::Library& m) {
#define CBKERNELS_REGISTER_FAMILY_OPS(enumerator, name, hyperparameters) \
  register_family_ops<Backend, Family::enumerator>(m);
  CBKERNELS_FAMILIES(CBKERNELS_REGISTER_FAMILY_OPS)
#undef CBKERNELS_REGISTER_FAMILY_OPS
}

}  // namespace cbkernels
