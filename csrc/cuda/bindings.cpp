// CUDA implementations of the four cbkernels ops (docs/op-contract.md): check the tensors, pick the
// launch configuration, allocate the outputs and call the launchers of launch.cu on the current stream.
// Nothing here reads a tensor value on the host, so the ops never synchronise and can be captured in
// CUDA graphs. Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS), so
// the file also syntax-checks against a CPU-only torch plus the CUDA toolkit headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "launch.h"

namespace cbkernels_cuda {
namespace {

Dtype dtype_of(const at::Tensor& logits, const char* op) {
  switch (logits.scalar_type()) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  }
}

// The call's tensors after the checks, in the layout the kernels read: logits with column stride 1
// (any row stride), everything else contiguous.
struct Inputs {
  at::Tensor logits, target, class_weight, grad_loss;
  Dtype dtype;
};

Inputs check_inputs(const char* op, const at::Tensor& logits, const at::Tensor& target,
                    const std::optional<at::Tensor>& class_weight, const std::optional<at::Tensor>& grad_loss) {
  TORCH_CHECK(logits.is_cuda() && logits.layout() == at::kStrided, op,
              ": logits must be a strided CUDA tensor, got ", logits.device(), " ", logits.layout());
  TORCH_CHECK(logits.dim() == 2, op, ": logits must have shape (N, C), got ", logits.sizes());
  const int64_t n = logits.size(0), c = logits.size(1);
  TORCH_CHECK(c >= 1, op, ": logits must have at least one class (C >= 1), got shape ", logits.sizes());
  Inputs in;
  in.dtype = dtype_of(logits, op);
  // A row stride is honoured as it is; a column stride other than 1 costs one documented copy.
  in.logits = (c > 1 && logits.stride(1) != 1) ? logits.contiguous() : logits;

  TORCH_CHECK(target.device() == logits.device(), op, ": target must be on the logits' device ", logits.device(),
              ", got ", target.device());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == n, op, ": target must have shape (N,) = (", n, ",), got ",
              target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt, op,
              ": target must be int64 or int32, got ", target.scalar_type());
  in.target = target.contiguous();

  if (class_weight.has_value()) {
    const at::Tensor& w = *class_weight;
    TORCH_CHECK(w.device() == logits.device(), op, ": class_weight must be on the logits' device ", logits.device(),
                ", got ", w.device());
    TORCH_CHECK(w.scalar_type() == at::kFloat, op, ": class_weight must be float32, got ", w.scalar_type());
    TORCH_CHECK(w.dim() == 1 && w.size(0) == c, op, ": class_weight must have shape (C,) = (", c, ",), got ",
                w.sizes());
    in.class_weight = w.contiguous();
  }
  if (grad_loss.has_value()) {
    const at::Tensor& gl = *grad_loss;
    TORCH_CHECK(gl.device() == logits.device(), op, ": grad_loss must be on the logits' device ", logits.device(),
                ", got ", gl.device());
    TORCH_CHECK(gl.scalar_type() == at::kFloat, op, ": grad_loss must be float32, got ", gl.scalar_type());
    TORCH_CHECK(gl.dim() == 1 && gl.size(0) == n, op, ": grad_loss must have shape (N,) = (", n, ",), got ",
                gl.sizes());
    in.grad_loss = gl.contiguous();
  }
  return in;
}

// CBKERNELS_CUDA_CONFIG="threads=512,rows=1,vec=16,cache=1" overrides fields of the default launch
// configuration (launch.cu default_config) for every call; bench/sweep_cuda.py sets it per trial. Read
// per call: a getenv and a short parse, no device work.
LaunchConfig launch_config(const char* op, int64_t n, int64_t c, Dtype dtype) {
  LaunchConfig config = default_config(c, dtype);
  const char* env = std::getenv("CBKERNELS_CUDA_CONFIG");
  if (env != nullptr && *env != '\0') {
    const std::string spec(env);
    size_t start = 0;
    while (start <= spec.size()) {
      size_t end = spec.find(',', start);
      if (end == std::string::npos) end = spec.size();
      const std::string item = spec.substr(start, end - start);
      start = end + 1;
      if (item.empty()) continue;
      const size_t eq = item.find('=');
      TORCH_CHECK(eq != std::string::npos, op, ": CBKERNELS_CUDA_CONFIG items are key=value, got '", item,
                  "' in '", spec, "'");
      const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
      char* rest = nullptr;
      const long v = std::strtol(value.c_str(), &rest, 10);
      TORCH_CHECK(!value.empty() && rest != nullptr && *rest == '\0', op, ": CBKERNELS_CUDA_CONFIG value of ", key,
                  " must be an integer, got '", value, "'");
      if (key == "threads") {
        config.threads = static_cast<int>(v);
      } else if (key == "rows") {
        config.rows_per_block = static_cast<int>(v);
      } else if (key == "vec") {
        config.vec_bytes = static_cast<int>(v);
      } else if (key == "cache") {
        config.cache_rows = v != 0;
      } else {
        TORCH_CHECK(false, op, ": CBKERNELS_CUDA_CONFIG keys are threads, rows, vec, cache; got '", key, "'");
      }
    }
  }
  const char* error = config_error(config, n);
  TORCH_CHECK(error == nullptr, op, ": bad CUDA launch configuration (threads=", config.threads,
              ", rows=", config.rows_per_block, ", vec=", config.vec_bytes, "): ", error);
  return config;
}

RowArgs row_args(const Inputs& in, float* loss, at::Tensor* grad, int64_t ignore_index) {
  RowArgs a;
  a.logits = in.logits.data_ptr();
  a.row_stride = in.logits.stride(0);
  a.target = in.target.data_ptr();
  a.target_int64 = in.target.scalar_type() == at::kLong;
  a.class_weight = in.class_weight.defined() ? in.class_weight.data_ptr<float>() : nullptr;
  a.grad_scale = in.grad_loss.defined() ? in.grad_loss.data_ptr<float>() : nullptr;
  a.loss = loss;
  a.grad = grad != nullptr ? grad->data_ptr() : nullptr;
  a.n = in.logits.size(0);
  a.c = in.logits.size(1);
  a.ignore_index = ignore_index;
  return a;
}

using Launcher = cudaError_t (*)(const RowArgs&, Dtype, float, const LaunchConfig&, cudaStream_t);

std::tuple<at::Tensor, at::Tensor> forward(const char* op, Launcher launch, const at::Tensor& logits,
                                           const at::Tensor& target, const std::optional<at::Tensor>& class_weight,
                                           float param, int64_t ignore_index, bool with_grad) {
  const Inputs in = check_inputs(op, logits, target, class_weight, std::nullopt);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = in.logits.size(0), c = in.logits.size(1);
  const LaunchConfig config = launch_config(op, n, c, in.dtype);
  at::Tensor loss = at::empty({n}, logits.options().dtype(at::kFloat));
  at::Tensor grad = with_grad ? at::empty({n, c}, logits.options()) : at::empty({0}, logits.options());
  if (n > 0) {
    const RowArgs args = row_args(in, loss.data_ptr<float>(), with_grad ? &grad : nullptr, ignore_index);
    C10_CUDA_CHECK(launch(args, in.dtype, param, config, c10::cuda::getCurrentCUDAStream(logits.get_device())));
  }
  return {loss, grad};
}

at::Tensor backward(const char* op, Launcher launch, const at::Tensor& logits, const at::Tensor& target,
                    const std::optional<at::Tensor>& class_weight, const at::Tensor& grad_loss, float param,
                    int64_t ignore_index) {
  const Inputs in = check_inputs(op, logits, target, class_weight, grad_loss);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = in.logits.size(0), c = in.logits.size(1);
  const LaunchConfig config = launch_config(op, n, c, in.dtype);
  at::Tensor grad = at::empty({n, c}, logits.options());
  if (n > 0) {
    const RowArgs args = row_args(in, nullptr, &grad, ignore_index);
    C10_CUDA_CHECK(launch(args, in.dtype, param, config, c10::cuda::getCurrentCUDAStream(logits.get_device())));
  }
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
  constexpr const char* op = "cbkernels::sigmoid_focal_forward (CUDA)";
  return forward(op, &sigmoid_focal, logits, target, class_weight, checked_gamma(op, gamma), ignore_index,
                 with_grad);
}

at::Tensor sigmoid_focal_backward(const at::Tensor& logits, const at::Tensor& target,
                                  const std::optional<at::Tensor>& class_weight, const at::Tensor& grad_loss,
                                  double gamma, int64_t ignore_index) {
  constexpr const char* op = "cbkernels::sigmoid_focal_backward (CUDA)";
  return backward(op, &sigmoid_focal, logits, target, class_weight, grad_loss, checked_gamma(op, gamma),
                  ignore_index);
}

std::tuple<at::Tensor, at::Tensor> softmax_ce_forward(const at::Tensor& logits, const at::Tensor& target,
                                                      const std::optional<at::Tensor>& class_weight,
                                                      double label_smoothing, int64_t ignore_index, bool with_grad) {
  constexpr const char* op = "cbkernels::softmax_ce_forward (CUDA)";
  return forward(op, &softmax_ce, logits, target, class_weight, checked_smoothing(op, label_smoothing),
                 ignore_index, with_grad);
}

at::Tensor softmax_ce_backward(const at::Tensor& logits, const at::Tensor& target,
                               const std::optional<at::Tensor>& class_weight, const at::Tensor& grad_loss,
                               double label_smoothing, int64_t ignore_index) {
  constexpr const char* op = "cbkernels::softmax_ce_backward (CUDA)";
  return backward(op, &softmax_ce, logits, target, class_weight, grad_loss, checked_smoothing(op, label_smoothing),
                  ignore_index);
}

}  // namespace
}  // namespace cbkernels_cuda

TORCH_LIBRARY_IMPL(cbkernels, CUDA, m) {
  m.impl("sigmoid_focal_forward", &cbkernels_cuda::sigmoid_focal_forward);
  m.impl("sigmoid_focal_backward", &cbkernels_cuda::sigmoid_focal_backward);
  m.impl("softmax_ce_forward", &cbkernels_cuda::softmax_ce_forward);
  m.impl("softmax_ce_backward", &cbkernels_cuda::softmax_ce_backward);
}
