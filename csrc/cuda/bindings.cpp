// The CUDA backend of the four cbkernels ops (docs/op-contract.md): the Backend of common/loss_ops.h,
// which does the checks and allocation. Here: the launch configuration, the device guard and the call of
// launch.cu's launcher on the current stream. Nothing here or there reads a tensor value on the host, so
// the ops never synchronise and can be captured in CUDA graphs. Only c10/cuda headers are used (not
// ATen/cuda/CUDAContext.h, which pulls in cuBLAS), so the file also syntax-checks against a CPU-only
// torch plus the CUDA toolkit headers (tools/check_cuda_compile.sh).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "common/loss_function.h"
#include "common/loss_ops.h"
#include "launch.h"

namespace cbkernels::cuda {
namespace {

// CBKERNELS_CUDA_CONFIG="threads=512,rows=1,vec=16,cache=1,ctas=2" overrides fields of the default launch
// configuration (launch.cu default_config) for every call; bench/sweep_cuda.py sets it per trial. Read
// per call: a getenv and a short parse, no device work.
LaunchConfig launch_config(OpName op, const LossArgs& args) {
  LaunchConfig config = default_config(args.num_classes, args.logits_dtype);
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
      } else if (key == "ctas") {
        config.ctas_per_sm = static_cast<int>(v);
      } else {
        TORCH_CHECK(false, op, ": CBKERNELS_CUDA_CONFIG keys are threads, rows, vec, cache, ctas; got '", key, "'");
      }
    }
  }
  const char* error = config_error(config, args.num_classes);
  TORCH_CHECK(error == nullptr, op, ": bad CUDA launch configuration (threads=", config.threads,
              ", rows=", config.rows_per_block, ", vec=", config.vec_bytes, ", ctas=", config.ctas_per_sm, "): ", error);
  return config;
}

struct CudaBackend {
  static constexpr const char* kTag = " (CUDA)";
  static constexpr const char* kDevice = "CUDA";

  static bool on_device(const at::Tensor& t) { return t.is_cuda(); }

  // No host-side value check: reading the targets would synchronise the device. A target that is neither
  // ignore_index nor in [0, C) is never used as an index; the kernels write that row's loss and gradient
  // as NaN (kernels.cuh row_state), and functional.py asserts on the device. A dense target value outside
  // the family's range reads as NaN in the kernels (row_io.cuh: unit_target, nonnegative_target).
  static void check_values(OpName, Family, const LossArgs&) {}

  // The fused backward's scaling, in place and in one pass (launch.cu): row i of grad times grad_loss[i], or
  // every row times grad_loss's one value when it has one element (the upstream gradient of a "sum" or
  // "mean" loss); rows whose factor is exactly 1 are not touched. The factors stay on the device (no sync).
  // grad: (N, C) contiguous CUDA float32/float16/bfloat16; grad_loss: float32 contiguous, N or 1 elements,
  // on grad's device. Runs on the current stream of grad's device.
  static void scale_rows_unless_one(const at::Tensor& grad, const at::Tensor& grad_loss) {
    check_scale_rows_args<CudaBackend>(grad, grad_loss);
    const c10::cuda::CUDAGuard guard(grad.device());
    C10_CUDA_CHECK(launch_scale_rows_unless_one(grad.data_ptr(), logits_dtype({"scale_rows_unless_one_", kTag}, grad),
                                                grad.size(0), grad.size(1), grad_loss.data_ptr<float>(),
                                                grad_loss.numel() == 1,
                                                c10::cuda::getCurrentCUDAStream(grad.get_device())));
  }

  class Launch {
   public:
    Launch(OpName op, const LossArgs& args, const at::Tensor& logits)
        : guard_(logits.device()), device_(logits.get_device()), config_(launch_config(op, args)) {}

    // A call that splits its rows (launch.h workspace_bytes) gets its scratch from the caching allocator on
    // the logits' device: no synchronisation, and capturable in a CUDA graph. The tensor is freed when this
    // returns, after the kernels that use it were queued on the current stream, the stream it was allocated
    // for: the allocator hands the memory out again only to work queued after them.
    void operator()(Family family, const LossArgs& args) const {
      if (args.num_rows == 0) return;
      size_t bytes = 0;
      C10_CUDA_CHECK(workspace_bytes(family, args, config_, &bytes));
      at::Tensor workspace;
      if (bytes > 0)
        workspace = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device_));
      C10_CUDA_CHECK(launch_loss(family, args, config_, bytes > 0 ? workspace.data_ptr() : nullptr,
                                 c10::cuda::getCurrentCUDAStream(device_)));
    }

   private:
    const c10::cuda::CUDAGuard guard_;  // the logits' device is current until the kernels are queued
    const c10::DeviceIndex device_;
    const LaunchConfig config_;
  };
};

}  // namespace
}  // namespace cbkernels::cuda

TORCH_LIBRARY_IMPL(cbkernels, CUDA, m) {
  cbkernels::register_loss_ops<cbkernels::cuda::CudaBackend>(m);
  m.impl("scale_rows_unless_one_", &cbkernels::cuda::CudaBackend::scale_rows_unless_one);
}

// Sparse tensors dispatch to these keys rather than to CUDA. The same ops registered there answer such an
// argument with the checks' "<argument> must be a dense tensor" instead of the dispatcher's
// "Could not run 'cbkernels::...' with arguments from the 'SparseCUDA' backend".
TORCH_LIBRARY_IMPL(cbkernels, SparseCUDA, m) { cbkernels::register_loss_ops<cbkernels::cuda::CudaBackend>(m); }
TORCH_LIBRARY_IMPL(cbkernels, SparseCsrCUDA, m) { cbkernels::register_loss_ops<cbkernels::cuda::CudaBackend>(m); }
