// CPU implementations of the four cbkernels ops (docs/op-contract.md): argument checks, the target check,
// output allocation, the choice of ISA variant and the parallel loop over rows. The arithmetic lives in
// loss_kernels.h, compiled once per instruction set.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "loss_args.h"

// ATen's OpenMP build defines at::parallel_for in a header whose parallel region exists only under
// _OPENMP; compiled without -fopenmp, every kernel here would run on one thread without a word.
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#error "torch uses OpenMP for at::parallel_for: compile csrc/cpu with -fopenmp (setup.py adds it)"
#endif

namespace cbkernels::cpu {

CBKERNELS_DECLARE_ROWS(DEFAULT)
CBKERNELS_DECLARE_ROWS(AVX2)
CBKERNELS_DECLARE_ROWS(AVX512)

namespace {

struct Variant {
  RowsFn sigmoid_focal;
  RowsFn softmax_ce;
};

// The instruction set ATen itself runs with: its CPU detection, lowered by ATEN_CPU_CAPABILITY=avx2|default
// when set (the tests use that to exercise every variant). at::native::get_cpu_capability() is not
// exported from libtorch; at::get_cpu_capability() is its exported string form ("AVX512", "AVX2", or
// "DEFAULT" / "NO AVX" depending on the torch version). Decided once per process.
const Variant& variant() {
  static const Variant chosen = [] {
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return Variant{AVX512::sigmoid_focal_rows, AVX512::softmax_ce_rows};
    if (capability == "AVX2") return Variant{AVX2::sigmoid_focal_rows, AVX2::softmax_ce_rows};
    return Variant{DEFAULT::sigmoid_focal_rows, DEFAULT::softmax_ce_rows};
  }();
  return chosen;
}

// Checked inputs of one call; the Tensor members keep any contiguous copies alive while the kernel runs.
struct Inputs {
  at::Tensor logits, target, class_weight, grad_loss;
  LossArgs args{};
};

LogitsType logits_type(const char* op, const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat: return LogitsType::kFloat;
    case at::kBFloat16: return LogitsType::kBFloat16;
    case at::kHalf: return LogitsType::kHalf;
    default:
      TORCH_CHECK(false, op, ": logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  }
}

// Every target is ignore_index or in [0, C); otherwise an error naming the first bad row, raised before
// any output is allocated or written. One sequential read of N integers: negligible next to N * C.
template <typename Index>
void check_target_values(const char* op, const Index* target, int64_t n, int64_t num_classes, int64_t ignore_index) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t y = static_cast<int64_t>(target[i]);
    TORCH_CHECK(y == ignore_index || (y >= 0 && y < num_classes), op, ": target[", i, "] = ", y,
                " is not a class index in [0, ", num_classes, ") and not ignore_index (", ignore_index, ")");
  }
}

Inputs check_inputs(const char* op, const at::Tensor& logits, const at::Tensor& target,
                    const std::optional<at::Tensor>& class_weight, const at::Tensor* grad_loss,
                    int64_t ignore_index) {
  TORCH_CHECK(logits.device().is_cpu() && logits.layout() == at::kStrided, op,
              ": logits must be a dense CPU tensor, got ", logits.device(), " ", logits.layout());
  TORCH_CHECK(logits.dim() == 2, op, ": logits must have shape (N, C), got ", logits.sizes());
  const int64_t n = logits.size(0), num_classes = logits.size(1);
  TORCH_CHECK(num_classes >= 1, op, ": logits must have at least one class (C >= 1), got shape ", logits.sizes());
  const LogitsType type = logits_type(op, logits);
  TORCH_CHECK(target.device().is_cpu(), op, ": target must be a CPU tensor, got ", target.device());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == n, op, ": target must have shape (N,) = (", n,
              ",), got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt, op,
              ": target must be int64 or int32, got ", target.scalar_type());

  Inputs in;
  // Column stride 1 is what the vector loads need; the row stride is honoured as it is. A size-1
  // dimension's stride is meaningless, so only C > 1 needs the check.
  in.logits = (num_classes == 1 || logits.stride(1) == 1) ? logits : logits.contiguous();
  in.target = target.contiguous();
  if (class_weight.has_value()) {
    const at::Tensor& w = *class_weight;
    TORCH_CHECK(w.device().is_cpu(), op, ": class_weight must be a CPU tensor, got ", w.device());
    TORCH_CHECK(w.scalar_type() == at::kFloat, op, ": class_weight must be float32, got ", w.scalar_type());
    TORCH_CHECK(w.dim() == 1 && w.size(0) == num_classes, op, ": class_weight must have shape (C,) = (",
                num_classes, ",), got ", w.sizes());
    in.class_weight = w.contiguous();
  }
  if (grad_loss != nullptr) {
    TORCH_CHECK(grad_loss->device().is_cpu(), op, ": grad_loss must be a CPU tensor, got ", grad_loss->device());
    TORCH_CHECK(grad_loss->scalar_type() == at::kFloat, op, ": grad_loss must be float32, got ",
                grad_loss->scalar_type());
    TORCH_CHECK(grad_loss->dim() == 1 && grad_loss->size(0) == n, op, ": grad_loss must have shape (N,) = (", n,
                ",), got ", grad_loss->sizes());
    in.grad_loss = grad_loss->contiguous();
  }

  const bool is_int64 = in.target.scalar_type() == at::kLong;
  if (is_int64) {
    check_target_values(op, in.target.data_ptr<int64_t>(), n, num_classes, ignore_index);
  } else {
    check_target_values(op, in.target.data_ptr<int32_t>(), n, num_classes, ignore_index);
  }

  LossArgs& a = in.args;
  a.logits = in.logits.data_ptr();
  a.row_stride = in.logits.stride(0);
  a.num_rows = n;
  a.num_classes = num_classes;
  a.logits_type = type;
  a.target = in.target.data_ptr();
  a.target_is_int64 = is_int64;
  a.class_weight = in.class_weight.defined() ? in.class_weight.data_ptr<float>() : nullptr;
  a.grad_loss = in.grad_loss.defined() ? in.grad_loss.data_ptr<float>() : nullptr;
  a.ignore_index = ignore_index;
  return in;
}

void run_rows(RowsFn rows, const LossArgs& args) {
  if (args.num_rows == 0) return;
  // Rows are independent; a task gets at least ~32K elements so that short rows are not split too finely.
  const int64_t grain = std::max<int64_t>(1, 32768 / args.num_classes);
  at::parallel_for(0, args.num_rows, grain, [&](int64_t begin, int64_t end) { rows(args, begin, end); });
}

std::tuple<at::Tensor, at::Tensor> forward(const char* op, RowsFn rows, const at::Tensor& logits,
                                           const at::Tensor& target, const std::optional<at::Tensor>& class_weight,
                                           float param, int64_t ignore_index, bool with_grad) {
  Inputs in = check_inputs(op, logits, target, class_weight, nullptr, ignore_index);
  const int64_t n = in.args.num_rows;
  at::Tensor loss = at::empty({n}, logits.options().dtype(at::kFloat));
  at::Tensor grad = with_grad ? at::empty({n, in.args.num_classes}, logits.options())
                              : at::empty({0}, logits.options());
  in.args.param = param;
  in.args.loss = loss.data_ptr<float>();
  in.args.grad = with_grad ? grad.data_ptr() : nullptr;
  run_rows(rows, in.args);
  return {loss, grad};
}

at::Tensor backward(const char* op, RowsFn rows, const at::Tensor& logits, const at::Tensor& target,
                    const std::optional<at::Tensor>& class_weight, const at::Tensor& grad_loss, float param,
                    int64_t ignore_index) {
  Inputs in = check_inputs(op, logits, target, class_weight, &grad_loss, ignore_index);
  at::Tensor grad = at::empty({in.args.num_rows, in.args.num_classes}, logits.options());
  in.args.param = param;
  in.args.loss = nullptr;
  in.args.grad = grad.data_ptr();
  run_rows(rows, in.args);
  return grad;
}

float checked_gamma(const char* op, double gamma) {
  TORCH_CHECK(std::isfinite(gamma) && gamma >= 0.0, op, ": gamma must be a finite number >= 0, got ", gamma);
  return static_cast<float>(gamma);
}

float checked_smoothing(const char* op, double label_smoothing) {
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
  return static_cast<float>(label_smoothing);
}

std::tuple<at::Tensor, at::Tensor> sigmoid_focal_forward(const at::Tensor& logits, const at::Tensor& target,
                                                         const std::optional<at::Tensor>& class_weight,
                                                         double gamma, int64_t ignore_index, bool with_grad) {
  constexpr const char* op = "cbkernels::sigmoid_focal_forward";
  return forward(op, variant().sigmoid_focal, logits, target, class_weight, checked_gamma(op, gamma), ignore_index,
                 with_grad);
}

at::Tensor sigmoid_focal_backward(const at::Tensor& logits, const at::Tensor& target,
                                  const std::optional<at::Tensor>& class_weight, const at::Tensor& grad_loss,
                                  double gamma, int64_t ignore_index) {
  constexpr const char* op = "cbkernels::sigmoid_focal_backward";
  return backward(op, variant().sigmoid_focal, logits, target, class_weight, grad_loss, checked_gamma(op, gamma),
                  ignore_index);
}

std::tuple<at::Tensor, at::Tensor> softmax_ce_forward(const at::Tensor& logits, const at::Tensor& target,
                                                      const std::optional<at::Tensor>& class_weight,
                                                      double label_smoothing, int64_t ignore_index, bool with_grad) {
  constexpr const char* op = "cbkernels::softmax_ce_forward";
  return forward(op, variant().softmax_ce, logits, target, class_weight, checked_smoothing(op, label_smoothing),
                 ignore_index, with_grad);
}

at::Tensor softmax_ce_backward(const at::Tensor& logits, const at::Tensor& target,
                               const std::optional<at::Tensor>& class_weight, const at::Tensor& grad_loss,
                               double label_smoothing, int64_t ignore_index) {
  constexpr const char* op = "cbkernels::softmax_ce_backward";
  return backward(op, variant().softmax_ce, logits, target, class_weight, grad_loss,
                  checked_smoothing(op, label_smoothing), ignore_index);
}

}  // namespace
}  // namespace cbkernels::cpu

TORCH_LIBRARY_IMPL(cbkernels, CPU, m) {
  m.impl("sigmoid_focal_forward", &cbkernels::cpu::sigmoid_focal_forward);
  m.impl("sigmoid_focal_backward", &cbkernels::cpu::sigmoid_focal_backward);
  m.impl("softmax_ce_forward", &cbkernels::cpu::softmax_ce_forward);
  m.impl("softmax_ce_backward", &cbkernels::cpu::softmax_ce_backward);
}
