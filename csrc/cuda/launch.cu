// Launchers of the CUDA kernels (kernels.cuh): pick the template instance (storage type, vector width,
// gamma specialisation, gradient or not), the grid, and launch on the caller's stream. No torch header.
#include <cuda_runtime.h>

#include <climits>
#include <type_traits>

#include "kernels.cuh"
#include "launch.h"

namespace cbkernels_cuda {
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
bool rows_share_alignment(const RowArgs& a, int elem, int vec_bytes) {
  if (a.grad == nullptr || vec_bytes <= elem) return true;
  const auto x = reinterpret_cast<uintptr_t>(a.logits), g = reinterpret_cast<uintptr_t>(a.grad);
  if (x % vec_bytes != g % vec_bytes) return false;
  return a.n <= 1 || (a.row_stride * elem) % vec_bytes == (a.c * elem) % vec_bytes;
}

// The widest of config.vec_bytes, 8 bytes and one element that the call's rows allow.
int effective_vec_bytes(const RowArgs& a, Dtype dtype, int wanted) {
  const int elem = elem_bytes(dtype);
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

int gamma_kind(float gamma) {
  if (gamma == 0.f) return device::kGamma0;
  if (gamma == 0.5f) return device::kGammaHalf;
  if (gamma == 1.f) return device::kGamma1;
  if (gamma == 2.f) return device::kGamma2;
  return device::kGammaAny;
}

template <typename Fn>
cudaError_t with_gamma(float gamma, Fn&& fn) {
  switch (gamma_kind(gamma)) {
    case device::kGamma0: return fn(IntC<device::kGamma0>{});
    case device::kGammaHalf: return fn(IntC<device::kGammaHalf>{});
    case device::kGamma1: return fn(IntC<device::kGamma1>{});
    case device::kGamma2: return fn(IntC<device::kGamma2>{});
    default: return fn(IntC<device::kGammaAny>{});
  }
}

struct Grid {
  dim3 blocks;
  dim3 threads;
  int tpr;
};

Grid grid_of(const RowArgs& a, const LaunchConfig& config) {
  const int64_t blocks = (a.n + config.rows_per_block - 1) / config.rows_per_block;
  return {dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(config.threads)),
          config.threads / config.rows_per_block};
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

cudaError_t sigmoid_focal(const RowArgs& args, Dtype dtype, float gamma, const LaunchConfig& config,
                          cudaStream_t stream) {
  if (config_error(config, args.n) != nullptr) return cudaErrorInvalidValue;
  if (args.n == 0) return cudaSuccess;
  const Grid grid = grid_of(args, config);
  const int vec_bytes = effective_vec_bytes(args, dtype, config.vec_bytes);
  return with_storage(dtype, [&](auto e) {
    using E = decltype(e);
    return with_vec<E>(vec_bytes, [&](auto vec) {
      return with_gamma(gamma, [&](auto g) {
        return with_write(args.grad != nullptr, [&](auto write) {
          device::sigmoid_focal_kernel<E, decltype(vec)::value, decltype(g)::value, decltype(write)::value>
              <<<grid.blocks, grid.threads, 0, stream>>>(args, gamma, grid.tpr);
          return cudaGetLastError();
        });
      });
    });
  });
}

cudaError_t softmax_ce(const RowArgs& args, Dtype dtype, float label_smoothing, const LaunchConfig& config,
                       cudaStream_t stream) {
  if (config_error(config, args.n) != nullptr) return cudaErrorInvalidValue;
  if (args.n == 0) return cudaSuccess;
  const Grid grid = grid_of(args, config);
  const int vec_bytes = effective_vec_bytes(args, dtype, config.vec_bytes);
  // A row that fits in registers is read once (with 16-byte vectors); without a gradient one pass
  // suffices anyway.
  const bool cached = config.cache_rows && args.grad != nullptr &&
                      args.c <= static_cast<int64_t>(device::kCachedElemsPerThread) * grid.tpr;
  return with_storage(dtype, [&](auto e) {
    using E = decltype(e);
    return with_vec<E>(vec_bytes, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      if constexpr (VEC * sizeof(typename E::bits) == device::kCachedVecBytes) {
        if (cached) {
          device::softmax_cached_kernel<E, VEC>
              <<<grid.blocks, grid.threads, 0, stream>>>(args, label_smoothing, grid.tpr);
          return cudaGetLastError();
        }
      }
      return with_write(args.grad != nullptr, [&](auto write) {
        device::softmax_stream_kernel<E, VEC, decltype(write)::value>
            <<<grid.blocks, grid.threads, 0, stream>>>(args, label_smoothing, grid.tpr);
        return cudaGetLastError();
      });
    });
  });
}

}  // namespace cbkernels_cuda
