// The CPU backend of the cbkernels ops (docs/op-contract.md): the Backend of common/loss_ops.h, which
// does the checks and allocation. Here: the host-side target check, the choice of ISA variant and the
// parallel loop over rows. The arithmetic lives in loss_kernels.h, compiled once per instruction set.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>

#include "common/loss_function.h"
#include "common/loss_ops.h"
#include "rows.h"

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

// The kernels of the instruction set ATen itself runs with: its CPU detection, lowered by
// ATEN_CPU_CAPABILITY=avx2|default when set (the tests use that to exercise every variant).
// at::native::get_cpu_capability() is not exported from libtorch; at::get_cpu_capability() is its exported
// string form ("AVX512", "AVX2", or "DEFAULT" / "NO AVX" depending on the torch version). Decided once per
// process. The variant's entry points, indexed by Family.
const RowsFn* variant_rows() {
  static const RowsFn* const chosen = [] {
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return AVX512::kRows;
    if (capability == "AVX2") return AVX2::kRows;
    return DEFAULT::kRows;
  }();
  return chosen;
}

// Rows per parallel task: at least ~32K elements, so that short rows are not split too finely.
int64_t row_grain(int64_t num_classes) { return std::max<int64_t>(1, 32768 / num_classes); }

// Every target is ignore_index or in [0, C); otherwise an error naming the first bad row, raised before
// any output is allocated or written. One sequential read of N integers: negligible next to N * C.
template <typename Index>
void check_target_values(OpName op, const Index* target, int64_t n, int64_t num_classes, int64_t ignore_index) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t y = static_cast<int64_t>(target[i]);
    TORCH_CHECK(y == ignore_index || (y >= 0 && y < num_classes), op, ": target[", i, "] = ", y,
                " is not a class index in [0, ", num_classes, ") and not ignore_index (", ignore_index, ")");
  }
}

// Dense target values outside the family's range (common/loss_ops.h, dense_target_in_range): an error naming
// the first bad element. The CPU's price for an error rather than a NaN (the GPU kernels read a bad value as
// NaN instead, without a host sync) is one vectorised sweep of each row's targets by the kernels, just before
// they compute the row (loss_kernels.h: for_each_dense_row). Called once a sweep found a bad value, so it
// always raises.
template <typename T>
void name_bad_dense_target(OpName op, Family family, const T* target, int64_t n, int64_t num_classes) {
  for (int64_t k = 0; k < n * num_classes; ++k) {
    const float t = static_cast<float>(target[k]);
    TORCH_CHECK(dense_target_in_range(family, t), op, ": target[", k / num_classes, ", ", k % num_classes, "] = ", t,
                " is out of range: a dense target's values must be ", dense_target_range_text(family));
  }
  TORCH_INTERNAL_ASSERT(false, op, ": the vectorised dense target check and dense_target_in_range disagree");
}

void name_bad_dense_target(OpName op, Family family, const LossArgs& a) {
  switch (a.logits_dtype) {
    case Dtype::kFloat32:
      return name_bad_dense_target(op, family, static_cast<const float*>(a.target), a.num_rows, a.num_classes);
    case Dtype::kFloat16:
      return name_bad_dense_target(op, family, static_cast<const at::Half*>(a.target), a.num_rows, a.num_classes);
    case Dtype::kBFloat16:
      return name_bad_dense_target(op, family, static_cast<const at::BFloat16*>(a.target), a.num_rows,
                                   a.num_classes);
  }
}

struct CpuBackend {
  static constexpr const char* kTag = "";
  static constexpr const char* kDevice = "CPU";

  static bool on_device(const at::Tensor& t) { return t.device().is_cpu(); }

  // The kernels index logits and class_weight by the target: they rely on this check. Dense target values
  // are checked by the kernels (see Launch).
  static void check_values(OpName op, Family family, const LossArgs& a) {
    if (a.dense_target) return;
    if (a.target_is_int64) {
      check_target_values(op, static_cast<const int64_t*>(a.target), a.num_rows, a.num_classes, a.ignore_index);
    } else {
      check_target_values(op, static_cast<const int32_t*>(a.target), a.num_rows, a.num_classes, a.ignore_index);
    }
  }

  class Launch {
   public:
    Launch(OpName op, const LossArgs&, const at::Tensor&) : op_(op) {}

    // Rows are independent: at::parallel_for over them. Dense target values are checked by the kernels, row by
    // row just before they compute it (RowsFn), rather than in check_values: the check's read then finds the row
    // in the L2 cache, where the kernels prefetched it while they computed the row before, and leaves it in the
    // L1 cache for the row's own passes, instead of the targets' being read from memory once more on their own
    // (measured at (1024, 8142) fp32 on one AVX-512 thread, the L3 cache flushed before each call, softmax CE
    // forward with gradient: 10.8 ms with every row checked ahead of the kernels, 9.8 ms with blocks of 16 rows
    // (512 KiB of targets) checked just before them, 8.9 ms row by row). A bad value stops its thread's rows,
    // and the error names the first one; the outputs written so far are discarded with the exception.
    void operator()(Family family, const LossArgs& args) const {
      if (args.num_rows == 0) return;
      const RowsFn rows = variant_rows()[static_cast<int>(family)];
      std::atomic<bool> in_range{true};
      at::parallel_for(0, args.num_rows, row_grain(args.num_classes), [&](int64_t begin, int64_t end) {
        if (!rows(args, begin, end)) in_range.store(false, std::memory_order_relaxed);
      });
      if (!in_range.load()) name_bad_dense_target(op_, family, args);
    }

   private:
    OpName op_;
  };

  // The fused backward's scaling (common/loss_function.h), one pass; rows whose factor is 1 are multiplied
  // by 1, which leaves them as they are. (Its caller skips the call when every factor is 1: it can read
  // CPU values on the host.)
  static void scale_rows_unless_one(const at::Tensor& grad, const at::Tensor& grad_loss) {
    check_scale_rows_args<CpuBackend>(grad, grad_loss);
    at::Tensor out = grad;
    mul_rows_out(out, grad, grad_loss);
  }
};

}  // namespace
}  // namespace cbkernels::cpu

TORCH_LIBRARY_IMPL(cbkernels, CPU, m) {
  cbkernels::register_loss_ops<cbkernels::cpu::CpuBackend>(m);
  m.impl("scale_rows_unless_one_", &cbkernels::cpu::CpuBackend::scale_rows_unless_one);
}

// Sparse and MKL-DNN tensors dispatch to these keys rather than to CPU. The same ops registered there
// answer such an argument with the checks' "<argument> must be a dense tensor" instead of the
// dispatcher's "Could not run 'cbkernels::...' with arguments from the 'SparseCPU' backend".
TORCH_LIBRARY_IMPL(cbkernels, SparseCPU, m) { cbkernels::register_loss_ops<cbkernels::cpu::CpuBackend>(m); }
TORCH_LIBRARY_IMPL(cbkernels, SparseCsrCPU, m) { cbkernels::register_loss_ops<cbkernels::cpu::CpuBackend>(m); }
TORCH_LIBRARY_IMPL(cbkernels, MkldnnCPU, m) { cbkernels::register_loss_ops<cbkernels::cpu::CpuBackend>(m); }
