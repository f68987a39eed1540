// The whole eager loss call as one op per family, `<family>_loss` (docs/op-contract.md), with its autograd
// formula in C++: the "mean" folding, the kernel (the family's `<family>_forward` op), the reduction and
// the backward node, in one call from Python. What cbkernels/functional.py does in Python for every
// backend, done here for the C++ ones so that an eager call costs about as much host time as
// F.cross_entropy: a Python-level autograd.Function, the folding's four small ops called from Python and
// a Python backward cost ~50 us a call at small shapes, the kernel itself about 1.
//
// The results are bit-identical to functional.py's path: the same ops in the same order, called through
// the dispatcher (so that CPU, CUDA, fake and traced tensors all reach their own kernels), namely
//   "mean":  d = normalizer if given, else max(1, #{i : target_i != ignore_index}) for index targets and
//            max(1, N) for dense ones; 1/d is folded into one (C,) float32 weight vector, the one every term
//            of a row is multiplied by: e' = element_weight / d when element weights are given, else
//            e' = ones(C) / d for dense targets without class weights (their row weight is then 1), else
//            w' = (class_weight or ones(C)) / d (cbkernels/_reduction.py's mean_weights);
//            rows, grad = <family>_forward(logits, target, w', ..., logit_offset, target_margin, sample_weight, e');
//            loss = rows.sum()
//   "sum":   the same with w' = class_weight, e' = element_weight;  "none": loss = rows.
// and for the backward, the upstream gradient g (0-d for "sum"/"mean", (N,) for "none") in float32:
//   fused:     the forward's gradient buffer scaled in place by g per row (scale_rows_unless_one_, which
//              skips rows whose factor is exactly 1: loss.backward() costs no pass at all);
//   recompute: <family>_backward(logits, target, w', g expanded to (N,), ..., logit_offset, target_margin,
//              sample_weight, e').
// Device-agnostic: registered once for the Autograd key and for CompositeExplicitAutograd (calls without
// autograd, e.g. under torch.inference_mode()).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/all.h>
#include <ATen/ops/bitwise_or.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/eq.h>
#include <ATen/ops/ge.h>
#include <ATen/ops/logical_and.h>
#include <ATen/ops/lt.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/sum.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "common/loss_ops.h"

namespace cbkernels {

enum class Reduction { kNone, kSum, kMean };

inline Reduction parse_reduction(const char* op, std::string_view reduction) {
  if (reduction == "mean") return Reduction::kMean;
  if (reduction == "sum") return Reduction::kSum;
  TORCH_CHECK_VALUE(reduction == "none", "cbkernels::", op, ": reduction must be one of ('none', 'mean', 'sum'), got '",
                    reduction, "'");
  return Reduction::kNone;
}

// An eager tensor of this process, not a tracer's (FakeTensor, FunctionalTensor, ...): only such a buffer
// is scaled in place, and only such a gradient refuses create_graph (a traced backward runs with grad mode
// on and sees tensor subclasses; torch.compile raises its own error for double backward).
inline bool is_plain(const at::Tensor& t) {
  return !t.unsafeGetTensorImpl()->is_python_dispatch() && !at::functionalization::impl::isFunctionalTensor(t);
}

// The schema-order name of an op of the cbkernels library, e.g. "cbkernels::softmax_ce_forward".
inline c10::OperatorHandle find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow((std::string("cbkernels::") + name).c_str(), "");
}

// grad[i, :] *= grad_loss[i] (or grad_loss's single value for every row), rows whose factor is exactly 1
// untouched: the op each backend registers (cpu/ops.cpp, cuda/bindings.cpp).
inline void scale_rows_unless_one_(const at::Tensor& grad, const at::Tensor& grad_loss) {
  static const auto op = find_op("scale_rows_unless_one_").typed<void(const at::Tensor&, const at::Tensor&)>();
  op.call(grad, grad_loss);
}

// Every element of a contiguous float32 CPU tensor is exactly 1 (NaN is not).
inline bool all_ones(const at::Tensor& factors) {
  const float* f = factors.const_data_ptr<float>();
  return std::all_of(f, f + factors.numel(), [](float v) { return v == 1.0f; });
}

// The checks of scale_rows_unless_one_ that every backend shares (the kernels read both through raw pointers).
template <typename Backend>
void check_scale_rows_args(const at::Tensor& grad, const at::Tensor& grad_loss) {
  const OpName op{"scale_rows_unless_one_", Backend::kTag};
  check_dense(op, "grad", grad);
  TORCH_CHECK(Backend::on_device(grad), op, ": grad must be a ", Backend::kDevice, " tensor, got ", grad.device());
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous(), op, ": grad must be a contiguous (N, C) tensor, got shape ",
              grad.sizes(), " and strides ", grad.strides());
  logits_dtype(op, grad);
  check_beside_logits(op, "grad_loss", grad_loss, grad);
  TORCH_CHECK(grad_loss.scalar_type() == at::kFloat && grad_loss.is_contiguous(), op,
              ": grad_loss must be a contiguous float32 tensor, got ", grad_loss.scalar_type());
  TORCH_CHECK(grad_loss.numel() == 1 || (grad_loss.dim() == 1 && grad_loss.size(0) == grad.size(0)), op,
              ": grad_loss must have shape (N,) = (", grad.size(0), ",) or one element, got ", grad_loss.sizes());
}

// out = grad scaled by row as torch.mul(grad, grad_loss[:, None], out=out) computes it: the product in
// float32 (a float32 factor with at least one dimension takes part in type promotion, unlike a 0-d one,
// which half-precision grads would round first), rounded once to out's dtype. out may be grad.
inline void mul_rows_out(at::Tensor& out, const at::Tensor& grad, const at::Tensor& grad_loss) {
  // (Shapes by dim(), not numel(): a traced backward's sizes are symbolic.)
  const at::Tensor factor = grad_loss.dim() == 0 ? grad_loss.reshape({1, 1}) : grad_loss.unsqueeze(1);
  at::mul_out(out, grad, factor);
}

// "mean": the class weights (ones when None) divided by the normalizer, or without one by the number of rows
// whose target is not ignore_index (dense targets: all N rows), at least 1, as float32 (C,): folded into the kernel's weights, the summed
// rows are the mean (docs/math.md, section 4). In ATen ops, as cbkernels/_reduction.py's mean_class_weight:
//   (class_weight or ones(C)) / (normalizer or (target != ignore_index).sum().clamp_min(1))
// For eager CPU tensors the same values come from one host loop instead of five small ops: the count is
// exact and ATen divides float32 by the count's float32 conversion with one IEEE division per element,
// which is what w[c] / float(count) is (no fast-math in this file's flags).
inline at::Tensor mean_class_weight(const at::Tensor& logits, const at::Tensor& target,
                                    const std::optional<at::Tensor>& class_weight, int64_t ignore_index,
                                    std::optional<double> normalizer) {
  if (target.dim() == 2) {  // dense targets: no row is ignored, the divisor is max(1, N)
    const at::Tensor base = class_weight.has_value()
                                ? *class_weight
                                : at::ones_symint({logits.sym_size(1)}, target.options().dtype(at::kFloat));
    if (normalizer.has_value()) return at::div(base, *normalizer);
    const c10::SymInt n = logits.sym_size(0);
    return at::div(base, c10::Scalar(n < 1 ? c10::SymInt(1) : n));
  }
  // (Sizes are read only once the tensors are known to be eager ones: a tracer's may be symbolic.)
  const bool host = !normalizer.has_value() && is_plain(logits) && logits.dim() == 2 && target.is_cpu() && is_plain(target) &&
                    target.dim() == 1 && target.is_contiguous() &&
                    (target.scalar_type() == at::kLong || target.scalar_type() == at::kInt);
  if (host && (!class_weight.has_value() ||
               (class_weight->is_cpu() && is_plain(*class_weight) && class_weight->dim() == 1 &&
                class_weight->size(0) == logits.size(1) && class_weight->scalar_type() == at::kFloat &&
                class_weight->is_contiguous()))) {
    const int64_t n = target.size(0), num_classes = logits.size(1);
    int64_t count = 0;
    if (target.scalar_type() == at::kLong) {
      const int64_t* y = target.const_data_ptr<int64_t>();
      for (int64_t i = 0; i < n; ++i) count += y[i] != ignore_index;
    } else {
      const int32_t* y = target.const_data_ptr<int32_t>();
      for (int64_t i = 0; i < n; ++i) count += y[i] != ignore_index;
    }
    const float divisor = static_cast<float>(std::max<int64_t>(count, 1));
    at::Tensor weight = at::empty({num_classes}, target.options().dtype(at::kFloat));
    float* out = weight.mutable_data_ptr<float>();
    const float* w = class_weight.has_value() ? class_weight->const_data_ptr<float>() : nullptr;
    for (int64_t c = 0; c < num_classes; ++c) out[c] = (w != nullptr ? w[c] : 1.0f) / divisor;
    return weight;
  }
  const at::Tensor base = class_weight.has_value()
                              ? *class_weight
                              : at::ones_symint({logits.sym_size(1)}, target.options().dtype(at::kFloat));
  if (normalizer.has_value()) return at::div(base, *normalizer);
  const at::Tensor count = at::ne(target, ignore_index).sum().clamp_min(1);
  return at::div(base, count);
}

template <Family F, typename = std::make_index_sequence<FamilyInfo<F>::kHyperparameters.size()>>
struct LossFunction;

template <Family F, std::size_t... I>
struct LossFunction<F, std::index_sequence<I...>> : torch::autograd::Function<LossFunction<F, std::index_sequence<I...>>> {
  using Hyperparameters = std::array<double, sizeof...(I)>;
  // Forward inputs: logits, target, class_weight, the hyperparameters, ignore_index, reduction, fused,
  // logit_offset, target_margin, sample_weight, element_weight, normalizer.
  static constexpr std::size_t kNumInputs = 3 + sizeof...(I) + 8;
  static constexpr const char* kName = FamilyInfo<F>::kLoss;

  struct Forward {
    // class_weight, element_weight: the weights the kernel ran with ("mean" folded into one of them)
    at::Tensor loss, grad, class_weight, element_weight;
  };

  // Everything an eager call does but the backward; shared by the two kernels below.
  static Forward run(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& class_weight,
                     const Hyperparameters& hyperparameters, int64_t ignore_index, Reduction reduction, bool with_grad,
                     OptionalInputs optional, std::optional<double> normalizer) {
    using Opt = const std::optional<at::Tensor>&;
    using Sig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, Opt, HyperparameterArg<I>...,
                                                   int64_t, bool, Opt, Opt, Opt, Opt);
    static const auto forward = find_op(FamilyInfo<F>::kForward).template typed<Sig>();
    // Checked before the folding, which would otherwise turn an integer class_weight into float32; the
    // devices first: a tensor on another device (meta included) would take the dispatch of every op below.
    TORCH_CHECK_VALUE(target.device() == logits.device(), "cbkernels::", kName, ": target is on ", target.device(),
                      " but logits are on ", logits.device());
    TORCH_CHECK_VALUE(!target.requires_grad(), "cbkernels::", kName,
                      ": target must not require grad: the losses give a gradient for the logits only");
    const std::pair<const char*, Opt> vectors[] = {
        {"class_weight", class_weight},
        {"logit_offset", optional.logit_offset},
        {"target_margin", optional.target_margin},
        {"sample_weight", optional.sample_weight},
        {"element_weight", optional.element_weight}};
    for (const auto& [name, t] : vectors) {
      if (!t.has_value()) continue;
      TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, "cbkernels::", kName, ": ", name, " must be float32, got ",
                       t->scalar_type());
      TORCH_CHECK_VALUE(!t->requires_grad(), "cbkernels::", kName, ": ", name,
                        " must not require grad: the losses give a gradient for the logits only");
      TORCH_CHECK_VALUE(t->device() == logits.device(), "cbkernels::", kName, ": ", name, " is on ", t->device(),
                        " but logits are on ", logits.device());
    }
    if (normalizer.has_value()) {
      TORCH_CHECK_VALUE(reduction == Reduction::kMean, "cbkernels::", kName,
                        ": normalizer applies to reduction='mean' only (it is the mean's divisor)");
      TORCH_CHECK_VALUE(std::isfinite(*normalizer) && *normalizer > 0, "cbkernels::", kName,
                        ": normalizer must be a finite number > 0, got ", *normalizer);
    }
    std::optional<at::Tensor> weight = class_weight, element_weight = optional.element_weight;
    if (reduction == Reduction::kMean) {
      TORCH_CHECK(logits.dim() == 2, "cbkernels::", kName, ": logits must have shape (N, C), got ", logits.sizes());
      // 1/d goes into the vector that multiplies every term of every row (cbkernels/_reduction.py, mean_weights).
      if (element_weight.has_value() || (target.dim() == 2 && !class_weight.has_value())) {
        element_weight = mean_class_weight(logits, target, element_weight, ignore_index, normalizer);
      } else {
        weight = mean_class_weight(logits, target, class_weight, ignore_index, normalizer);
      }
    }
    if (!logits.is_cpu() && target.dim() == 1) {
      // The CPU ops check the targets on the host; elsewhere that would be a device sync, so the kernels
      // write NaN for a bad target and this device-side assert raises (as F.cross_entropy's does).
      const at::Tensor ok = at::bitwise_or(at::logical_and(at::ge(target, 0), at::lt(target, logits.sym_size(1))),
                                           at::eq(target, ignore_index));
      at::_assert_async(at::all(ok), "target holds a class index outside [0, C) that is not ignore_index");
    }
    auto [rows, grad] = forward.call(logits, target, weight, hyperparameters[I]..., ignore_index, with_grad,
                                     optional.logit_offset, optional.target_margin, optional.sample_weight,
                                     element_weight);
    at::Tensor loss = reduction == Reduction::kNone ? rows : rows.sum();
    return {std::move(loss), std::move(grad), weight.value_or(at::Tensor()), element_weight.value_or(at::Tensor())};
  }

  // CompositeExplicitAutograd: a call without autograd (no input tracked, or inference mode).
  static at::Tensor without_autograd(const at::Tensor& logits, const at::Tensor& target,
                                     const std::optional<at::Tensor>& class_weight, HyperparameterArg<I>... hyperparameters,
                                     int64_t ignore_index, c10::string_view reduction, bool /*fused*/,
                                     const std::optional<at::Tensor>& logit_offset,
                                     const std::optional<at::Tensor>& target_margin,
                                     const std::optional<at::Tensor>& sample_weight,
                                     const std::optional<at::Tensor>& element_weight, std::optional<double> normalizer) {
    return run(logits, target, class_weight, {hyperparameters...}, ignore_index,
               parse_reduction(kName, std::string_view(reduction.data(), reduction.size())), false,
               {logit_offset, target_margin, sample_weight, element_weight}, normalizer)
        .loss;
  }

  // The Autograd kernel.
  static at::Tensor with_autograd(const at::Tensor& logits, const at::Tensor& target,
                                  const std::optional<at::Tensor>& class_weight, HyperparameterArg<I>... hyperparameters,
                                  int64_t ignore_index, c10::string_view reduction, bool fused,
                                  const std::optional<at::Tensor>& logit_offset,
                                  const std::optional<at::Tensor>& target_margin,
                                  const std::optional<at::Tensor>& sample_weight,
                                  const std::optional<at::Tensor>& element_weight, std::optional<double> normalizer) {
    // Read before apply(), which runs forward with grad mode off.
    const bool with_grad = fused && c10::GradMode::is_enabled() && logits.requires_grad();
    return LossFunction::apply(logits, target, class_weight, hyperparameters..., ignore_index, reduction, with_grad,
                               logit_offset, target_margin, sample_weight, element_weight, normalizer);
  }

  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                            const std::optional<at::Tensor>& class_weight, HyperparameterArg<I>... hyperparameters,
                            int64_t ignore_index, c10::string_view reduction, bool with_grad,
                            const std::optional<at::Tensor>& logit_offset,
                            const std::optional<at::Tensor>& target_margin,
                            const std::optional<at::Tensor>& sample_weight,
                            const std::optional<at::Tensor>& element_weight, std::optional<double> normalizer) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Hyperparameters values{hyperparameters...};
    const Reduction reduce = parse_reduction(kName, std::string_view(reduction.data(), reduction.size()));
    Forward out = run(logits, target, class_weight, values, ignore_index, reduce, with_grad,
                      {logit_offset, target_margin, sample_weight, element_weight}, normalizer);
    if (with_grad) {
      // Not save_for_backward: the buffer is no input or output, and the backward scales it in place (then
      // replaces it by None: a second backward finds it consumed). One entry: the map's growth is measurable.
      ctx->saved_data["grad"] = out.grad;
    } else {
      ctx->save_for_backward({logits, target, out.class_weight, logit_offset.value_or(at::Tensor()),
                              target_margin.value_or(at::Tensor()), sample_weight.value_or(at::Tensor()),
                              out.element_weight});
      ctx->saved_data["ignore_index"] = ignore_index;
      ctx->saved_data["hyperparameters"] = std::vector<double>(values.begin(), values.end());
    }
    return out.loss;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    torch::autograd::variable_list grads(kNumInputs);
    const at::Tensor& grad_output = grad_outputs[0];
    if (!grad_output.defined()) return grads;
    TORCH_CHECK(!(c10::GradMode::is_enabled() && is_plain(grad_output)),
                "cbkernels: backward with create_graph=True (second-order gradients: input-gradient penalties, "
                "double backprop) is not supported by the kernel backends, whose gradient is not itself "
                "differentiable; use backend='reference' for such objectives");
    const at::Tensor grad_loss = grad_output.to(at::kFloat).contiguous();
    const auto fused = ctx->saved_data.find("grad");
    if (fused != ctx->saved_data.end()) {
      TORCH_CHECK(!fused->second.isNone(),
                  "cbkernels: backward ran a second time through one forward (backward(retain_graph=True) "
                  "called twice) with the 'fused' backward strategy, whose first backward scales the "
                  "forward's gradient buffer in place and hands it on; set CBKERNELS_BACKWARD=recompute "
                  "for graphs that are backpropagated more than once");
      at::Tensor grad = fused->second.toTensor();
      if (is_plain(grad)) {
        fused->second = c10::IValue();
        // Factors on the CPU are read here, syncing with nothing: all exactly 1 (loss.backward() of a "sum"
        // or "mean") means the buffer already is the gradient, and backward touches no N x C tensor. On a
        // device the op's kernel decides that per row instead.
        if (!(grad_loss.is_cpu() && all_ones(grad_loss))) scale_rows_unless_one_(grad, grad_loss);
      } else {
        // A traced backward wants a functional graph (see cbkernels/_ops.py): out of place, same rounding.
        at::Tensor scaled = at::empty_like(grad);
        mul_rows_out(scaled, grad, grad_loss);
        grad = scaled;
      }
      grads[0] = grad;
      return grads;
    }
    using Opt = const std::optional<at::Tensor>&;
    using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, Opt, const at::Tensor&, HyperparameterArg<I>...,
                           int64_t, Opt, Opt, Opt, Opt);
    static const auto backward_op = find_op(FamilyInfo<F>::kBackward).template typed<Sig>();
    const torch::autograd::variable_list saved = ctx->get_saved_variables();
    const at::Tensor& logits = saved[0];
    const auto optional = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
    const std::vector<double> values = ctx->saved_data["hyperparameters"].toDoubleVector();
    const at::Tensor per_row =
        grad_loss.dim() == 0 ? grad_loss.expand_symint({logits.sym_size(0)}).contiguous() : grad_loss;
    grads[0] = backward_op.call(logits, saved[1], optional(saved[2]), per_row, values[I]...,
                                ctx->saved_data["ignore_index"].toInt(), optional(saved[3]), optional(saved[4]),
                                optional(saved[5]), optional(saved[6]));
    return grads;
  }
};

// The schemas of the `<family>_loss` ops and of scale_rows_unless_one_, for the TORCH_LIBRARY block.
//   softmax_ce_loss(Tensor logits, Tensor target, Tensor? class_weight, float label_smoothing, int ignore_index,
//                   str reduction, bool fused, Tensor? logit_offset=None, Tensor? target_margin=None,
//                   Tensor? sample_weight=None, Tensor? element_weight=None, float? normalizer=None) -> Tensor
template <Family F>
void define_loss_function(torch::Library& m) {
  std::string floats;
  for (const HyperparameterId::Id id : FamilyInfo<F>::kHyperparameters) {
    floats += std::string("float ") + kHyperparameterInfo[id].name + ", ";
  }
  m.def((std::string(FamilyInfo<F>::kLoss) + "(Tensor logits, Tensor target, Tensor? class_weight, " + floats +
         "int ignore_index, str reduction, bool fused" + kOptionalInputArgs + ", float? normalizer=None) -> Tensor")
            .c_str());
}

inline void define_loss_functions(torch::Library& m) {
#define CBKERNELS_DEFINE_LOSS_FUNCTION(enumerator, name, hyperparameters) \
  define_loss_function<Family::enumerator>(m);
  CBKERNELS_FAMILIES(CBKERNELS_DEFINE_LOSS_FUNCTION)
#undef CBKERNELS_DEFINE_LOSS_FUNCTION
  m.def("scale_rows_unless_one_(Tensor(a!) grad, Tensor grad_loss) -> ()");
}

// In TORCH_LIBRARY_IMPL(cbkernels, Autograd, m) with `with_autograd`, and in
// TORCH_LIBRARY_IMPL(cbkernels, CompositeExplicitAutograd, m) with `without_autograd`.
inline void register_loss_functions(torch::Library& m, bool autograd) {
#define CBKERNELS_REGISTER_LOSS_FUNCTION(enumerator, name, hyperparameters)                             \
  if (autograd) {                                                                                       \
    m.impl(FamilyInfo<Family::enumerator>::kLoss, &LossFunction<Family::enumerator>::with_autograd);    \
  } else {                                                                                              \
    m.impl(FamilyInfo<Family::enumerator>::kLoss, &LossFunction<Family::enumerator>::without_autograd); \
  }
  CBKERNELS_FAMILIES(CBKERNELS_REGISTER_LOSS_FUNCTION)
#undef CBKERNELS_REGISTER_LOSS_FUNCTION
}

}  // namespace cbkernels
