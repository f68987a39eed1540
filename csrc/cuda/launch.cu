// Launchers of the CUDA kernels (kernels.cuh): pick the template instance (storage type, vector width,
// gamma case, gradient or not), the grid, and launch on the caller's stream. No torch header.
// The helpers every launch shares come first, then one launcher per family, launch_<name>, which
// launch_loss dispatches to from the family list (common/families.h).
#include <cuda_runtime.h>

#include <climits>
#include <type_traits>

#include "common/gamma_case.h"
#include "kernels.cuh"
#include "launch.h"

namespace cbkernels::cuda {
namespace {

template <int V>
using IntC = std::integral_constant<int, V>;

int elem_bytes(Dtype dtype) { return dtype == Dtype::kFloat32 ? 4 : 2; }

// Calls fn(E{}) for the storage type of dtype.
template <typename Fn>
cudaError_t with_storage(Dtype dtype, Fn&& fn) {
  switch (dtype) {
    case Dtype::kFloat32: return fn(device::F32{});
    case Dtype::kFloat16: return fn(device::F16{});
    case Dtype::kBFloat16: return fn(device::BF16{});
  }
  return cudaErrorInvalidValue;
}

// The vector accesses of a kernel cover the logits row and, when a gradient is written, the gradient row
// at the same columns. Every row's logits find their own aligned head (kernels.cuh), so without a gradient
// any width works. With one, logits row i and gradient row i must sit at the same address modulo the
// vector size for every i: the bases must agree and the row strides (row_stride and c elements) too.
bool rows_share_alignment(const LossArgs& a, int elem, int vec_bytes) {
  if (a.grad == nullptr || vec_bytes <= elem) return true;
  const auto x = reinterpret_cast<uintptr_t>(a.logits), g = reinterpret_cast<uintptr_t>(a.grad);
  if (x % vec_bytes != g % vec_bytes) return false;
  return a.num_rows <= 1 || (a.row_stride * elem) % vec_bytes == (a.num_classes * elem) % vec_bytes;
}

// The widest of config.vec_bytes, 8 bytes and one element that the call's rows allow.
int effective_vec_bytes(const LossArgs& a, int wanted) {
  const int elem = elem_bytes(a.logits_dtype);
  for (int vb : {16, 8}) {
    if (vb <= wanted && vb > elem && rows_share_alignment(a, elem, vb)) return vb;
  }
  return 1;
}

// Calls fn(IntC<VEC>{}) with VEC elements per vector access for vec_bytes (1 = one element).
template <typename E, typename Fn>
cudaError_t with_vec(int vec_bytes, Fn&& fn) {
  constexpr int elem = sizeof(typename E::bits);
  if (vec_bytes == 16) return fn(IntC<16 / elem>{});
  if (vec_bytes == 8) return fn(IntC<8 / elem>{});
  return fn(IntC<1>{});
}

template <typename Fn>
cudaError_t with_write(bool write, Fn&& fn) {
  return write ? fn(std::true_type{}) : fn(std::false_type{});
}

template <GammaCase G>
using GammaC = std::integral_constant<GammaCase, G>;

// Calls fn(GammaC<G>{}) for the case of gamma.
template <typename Fn>
cudaError_t with_gamma(float gamma, Fn&& fn) {
  switch (gamma_case(gamma)) {
    case GammaCase::kZero: return fn(GammaC<GammaCase::kZero>{});
    case GammaCase::kHalf: return fn(GammaC<GammaCase::kHalf>{});
    case GammaCase::kOne: return fn(GammaC<GammaCase::kOne>{});
    case GammaCase::kTwo: return fn(GammaC<GammaCase::kTwo>{});
    case GammaCase::kGeneral: break;
  }
  return fn(GammaC<GammaCase::kGeneral>{});
}

struct Grid {
  dim3 blocks;
  dim3 threads;
  int tpr;
};

Grid grid_of(const LossArgs& a, const LaunchConfig& config) {
  const int64_t blocks = (a.num_rows + config.rows_per_block - 1) / config.rows_per_block;
  return {dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(config.threads)),
          config.threads / config.rows_per_block};
}

// What every launch shares: refuse a bad configuration, launch nothing without rows, then call
// fn(E{}, IntC<VEC>{}, grid) for the storage type and the widest vector access the call's rows allow.
template <typename Fn>
cudaError_t with_rows(const LossArgs& args, const LaunchConfig& config, Fn&& fn) {
  if (config_error(config, args.num_rows) != nullptr) return cudaErrorInvalidValue;
  if (args.num_rows == 0) return cudaSuccess;
  const Grid grid = grid_of(args, config);
  const int vec_bytes = effective_vec_bytes(args, config.vec_bytes);
  return with_storage(args.logits_dtype, [&](auto e) {
    using E = decltype(e);
    return with_vec<E>(vec_bytes, [&](auto vec) { return fn(e, vec, grid); });
  });
}

// ---- one launcher per family of common/families.h: launch_<name>, called by launch_loss below ----------

cudaError_t launch_sigmoid_focal(const LossArgs& args, const LaunchConfig& config, cudaStream_t stream) {
  return with_rows(args, config, [&](auto e, auto vec, const Grid& grid) {
    return with_gamma(args.gamma, [&](auto g) {
      return with_write(args.grad != nullptr, [&](auto write) {
        device::sigmoid_focal_kernel<decltype(e), decltype(vec)::value, decltype(g)::value, decltype(write)::value>
            <<<grid.blocks, grid.threads, 0, stream>>>(args, grid.tpr);
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t launch_softmax_ce(const LossArgs& args, const LaunchConfig& config, cudaStream_t stream) {
  return with_rows(args, config, [&](auto e, auto vec, const Grid& grid) {
    using E = decltype(e);
    constexpr int VEC = decltype(vec)::value;
    if constexpr (VEC * sizeof(typename E::bits) == device::kCachedVecBytes) {
      // A row that fits in registers is read once (with 16-byte vectors); without a gradient one pass
      // suffices anyway.
      const bool cached = config.cache_rows && args.grad != nullptr &&
                          args.num_classes <= static_cast<int64_t>(device::kCachedElemsPerThread) * grid.tpr;
      if (cached) {
        device::softmax_cached_kernel<E, VEC><<<grid.blocks, grid.threads, 0, stream>>>(args, grid.tpr);
        return cudaGetLastError();
      }
    }
    return with_write(args.grad != nullptr, [&](auto write) {
      device::softmax_stream_kernel<E, VEC, decltype(write)::value>
          <<<grid.blocks, grid.threads, 0, stream>>>(args, grid.tpr);
      return cudaGetLastError();
    });
  });
}

}  // namespace

LaunchConfig default_config(int64_t c, Dtype) {
  // Threads per row: enough that a row is at most 16 elements per thread (the cached softmax holds
  // such a row in registers), from one warp to 1024 threads; short rows share a 256-thread block.
  // The row sweep of bench/sweep_cuda.py measures the alternatives; this table is the one to change.
  int tpr = 32;
  while (tpr < device::kMaxThreads && static_cast<int64_t>(tpr) * device::kCachedElemsPerThread < c) tpr *= 2;
  const int rows = tpr >= 256 ? 1 : 256 / tpr;
  return {tpr * rows, rows, 16, true};
}

const char* config_error(const LaunchConfig& config, int64_t n) {
  if (config.threads < 32 || config.threads > device::kMaxThreads || config.threads % 32 != 0)
    return "threads per block must be a multiple of 32 in [32, 1024]";
  if (config.rows_per_block < 1 || config.threads % config.rows_per_block != 0 ||
      (config.threads / config.rows_per_block) % 32 != 0)
    return "rows per block must divide threads per block into a multiple of 32 threads per row";
  if (config.vec_bytes != 16 && config.vec_bytes != 8 && config.vec_bytes != 1)
    return "vector width must be 16, 8 (bytes) or 1 (one element)";
  if ((n + config.rows_per_block - 1) / config.rows_per_block > INT_MAX)
    return "too many rows for one grid: raise rows per block";
  return nullptr;
}

cudaError_t launch_loss(Family family, const LossArgs& args, const LaunchConfig& config, cudaStream_t stream) {
  switch (family) {
#define CBKERNELS_LAUNCH_FAMILY(enumerator, name, hyperparameters) \
  case Family::enumerator:                                        \
    return launch_##name(args, config, stream);
    CBKERNELS_FAMILIES(CBKERNELS_LAUNCH_FAMILY)
#undef CBKERNELS_LAUNCH_FAMILY
  }
  return cudaErrorInvalidValue;
}

}  // namespace cbkernels::cuda
