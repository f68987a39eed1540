// Launchers of the CUDA kernels (kernels.cuh): pick the template instance (storage type, vector width,
// gamma case, gradient or not), the grid, and launch on the caller's stream. No torch header.
// The helpers every launch shares come first, then one launcher per family, launch_<name>, which
// launch_loss dispatches to from the family list (common/families.h).
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <type_traits>

#include "common/gamma_case.h"
#include "dense_kernels.cuh"
#include "kernels.cuh"
#include "launch.h"
#include "scale_rows.cuh"
#include "split_kernels.cuh"

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

// The vector accesses of a kernel cover the logits row and, at the same columns, the gradient row when one
// is written and the dense target row when the targets are dense. Every row's logits find their own aligned
// head (kernels.cuh), so with neither any width works. Otherwise logits row i and gradient (target) row i
// must sit at the same address modulo the vector size for every i: the bases must agree and the row strides
// (row_stride, and c elements for both of those contiguous (N, C) arrays) too.
bool rows_share_alignment(const LossArgs& a, int elem, int vec_bytes) {
  if (vec_bytes <= elem) return true;
  const auto x = reinterpret_cast<uintptr_t>(a.logits);
  const bool strides_agree =
      a.num_rows <= 1 || (a.row_stride * elem) % vec_bytes == (a.num_classes * elem) % vec_bytes;
  const auto shares = [&](const void* rows) {
    return rows == nullptr || (x % vec_bytes == reinterpret_cast<uintptr_t>(rows) % vec_bytes && strides_agree);
  };
  return shares(a.grad) && shares(a.dense_target ? a.target : nullptr);
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

// Calls fn(std::true_type{}) or fn(std::false_type{}): a template flag (gradient written, smoothing) from flag.
template <typename Fn>
cudaError_t with_flag(bool flag, Fn&& fn) {
  return flag ? fn(std::true_type{}) : fn(std::false_type{});
}

// Whether the call has an optional per-class input (LossArgs::logit_offset, target_margin, element_weight):
// the index-target kernels' flag Extended, so that the calls without one run instances with none of its code.
bool extended(const LossArgs& a) {
  return a.logit_offset != nullptr || a.target_margin != nullptr || a.element_weight != nullptr;
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

// Per-device constants the grids are sized from, queried once per device and cached (attribute queries
// are host calls, but not free ones; the values never change). A race between two first calls stores the
// same value twice.
constexpr int kMaxDevices = 64;

struct DeviceFacts {
  int sms;
  int l2_bytes;
};

cudaError_t device_facts(DeviceFacts& facts) {
  static std::atomic<int> sms[kMaxDevices], l2[kMaxDevices];
  int device = 0;
  if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  if (sms[device].load(std::memory_order_relaxed) == 0) {
    int count = 0, bytes = 0;
    if (const cudaError_t e = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device); e != cudaSuccess)
      return e;
    if (const cudaError_t e = cudaDeviceGetAttribute(&bytes, cudaDevAttrL2CacheSize, device); e != cudaSuccess)
      return e;
    l2[device].store(bytes, std::memory_order_relaxed);
    sms[device].store(count, std::memory_order_relaxed);
  }
  facts = {sms[device].load(std::memory_order_relaxed), l2[device].load(std::memory_order_relaxed)};
  return cudaSuccess;
}

struct Grid {
  dim3 blocks;
  dim3 threads;
  int tpr;
};

// The persistent grid: blocks_per_sm(config, resident) blocks per SM, never more than there are row groups.
Grid grid_of(const LossArgs& a, const LaunchConfig& config, const DeviceFacts& facts, int resident_threads) {
  const int per_sm = blocks_per_sm(config, resident_threads);
  const int64_t groups = (a.num_rows + config.rows_per_block - 1) / config.rows_per_block;
  const int64_t blocks = std::min<int64_t>(groups, static_cast<int64_t>(facts.sms) * per_sm);
  return {dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(config.threads)),
          config.threads / config.rows_per_block};
}

// What every launch shares: launch nothing without rows, then call fn(E{}, IntC<VEC>{}, grid, facts) for
// the storage type and the widest vector access the call's rows allow.
template <typename Fn>
cudaError_t with_rows(const LossArgs& args, const LaunchConfig& config, Fn&& fn) {
  if (config_error(config, args.num_classes) != nullptr) return cudaErrorInvalidValue;
  if (args.num_rows == 0) return cudaSuccess;
  DeviceFacts facts{};
  if (const cudaError_t e = device_facts(facts); e != cudaSuccess) return e;
  const Grid grid = grid_of(args, config, facts, device::kMaxThreads);
  const int vec_bytes = effective_vec_bytes(args, config.vec_bytes);
  return with_storage(args.logits_dtype, [&](auto e) {
    using E = decltype(e);
    return with_vec<E>(vec_bytes, [&](auto vec) { return fn(e, vec, grid, facts); });
  });
}

// ---- the row split (split_kernels.cuh): split_plan below decides ---------------------------------------

// The workspace of a split call: the sigmoid family's loss parts (when it writes the loss), the softmax's
// statistics planes; each (N, S) fp32.
size_t split_workspace_bytes(Family family, const LossArgs& a, const SplitPlan& plan) {
  if (plan.chunks == 0) return 0;
  const size_t parts = static_cast<size_t>(a.num_rows) * static_cast<size_t>(plan.chunks) * sizeof(float);
  if (family == Family::kSigmoidFocal) return a.loss != nullptr ? parts : 0;
  return parts * device::kStatPlanes;
}

// The persistent grid of a split launch over `units` units, one per row slot of `config`.
Grid unit_grid(int64_t units, const LaunchConfig& config, const DeviceFacts& facts) {
  const int64_t groups = (units + config.rows_per_block - 1) / config.rows_per_block;
  const int64_t blocks =
      std::min<int64_t>(groups, static_cast<int64_t>(facts.sms) * blocks_per_sm(config, device::kMaxThreads));
  return {dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(config.threads)),
          config.threads / config.rows_per_block};
}

// The sigmoid family split: one launch of the units, then (the loss written) the sum of each row's parts.
template <typename E, int VEC>
cudaError_t launch_sigmoid_split(const LossArgs& args, const LaunchConfig& config, const DeviceFacts& facts,
                                 const SplitPlan& plan, void* workspace, cudaStream_t stream) {
  const device::SplitRows rows{0, args.num_rows, plan.chunks, plan.chunk_vecs};
  float* const parts = args.loss != nullptr ? static_cast<float*>(workspace) : nullptr;
  const Grid g = unit_grid(args.num_rows * plan.chunks, config, facts);
  const cudaError_t e = with_gamma(args.gamma, [&](auto gc) {
    return with_flag(args.grad != nullptr, [&](auto write) {
      return with_flag(extended(args), [&](auto extend) {
        device::sigmoid_split_kernel<E, VEC, decltype(gc)::value, decltype(write)::value, decltype(extend)::value>
            <<<g.blocks, g.threads, 0, stream>>>(args, g.tpr, rows, parts);
        return cudaGetLastError();
      });
    });
  });
  if (e != cudaSuccess || parts == nullptr) return e;
  constexpr int kThreads = device::kSumPartsThreads;
  const auto blocks = static_cast<unsigned>((args.num_rows + kThreads - 1) / kThreads);
  device::sum_parts_kernel<<<blocks, kThreads, 0, stream>>>(parts, plan.chunks, args.num_rows, args.loss);
  return cudaGetLastError();
}

// The finish launch of a call without a gradient computes per row, not per chunk (only the loss): one warp
// a row, a block of kLossOnlyThreads.
constexpr LaunchConfig kLossOnlyFinish{device::kLossOnlyThreads, device::kLossOnlyThreads / 32, 16, false, 0};

// The softmax split (L: SoftmaxCe<Smooth> or SoftmaxFocal). With a gradient: for each batch of rows, the
// statistics launch then the finish launch over its units. Without: one statistics launch over every
// row's units, then one finish launch of one unit a row.
template <typename E, int VEC, typename L>
cudaError_t launch_softmax_split(const LossArgs& args, const LaunchConfig& config, const DeviceFacts& facts,
                                 const SplitPlan& plan, void* workspace, cudaStream_t stream) {
  float* const stats = static_cast<float*>(workspace);
  return with_flag(extended(args), [&](auto extend) {
    constexpr bool X = decltype(extend)::value;
    const bool write = args.grad != nullptr;
    const int64_t batch = write ? plan.batch_rows : args.num_rows;
    for (int64_t row0 = 0; row0 < args.num_rows; row0 += batch) {
      const device::SplitRows rows{row0, std::min(batch, args.num_rows - row0), plan.chunks, plan.chunk_vecs};
      const Grid g = unit_grid(rows.rows * plan.chunks, config, facts);
      device::softmax_split_stats_kernel<E, VEC, L::kSumZ, X><<<g.blocks, g.threads, 0, stream>>>(args, g.tpr, rows, stats);
      if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
      if (write) {
        device::softmax_split_finish_kernel<E, VEC, L, true, X><<<g.blocks, g.threads, 0, stream>>>(args, g.tpr, rows, stats);
      } else {
        const Grid f = unit_grid(rows.rows, kLossOnlyFinish, facts);
        device::softmax_split_finish_kernel<E, VEC, L, false, X><<<f.blocks, f.threads, 0, stream>>>(args, f.tpr, rows, stats);
      }
      if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    }
    return cudaSuccess;
  });
}

// ---- one launcher per family of common/families.h: launch_<name>, called by launch_loss below ----------

// Dense targets: the focal form when gamma != 0 (dense_kernels.cuh reads gamma at run time), the optional inputs'
// code when the call has them, under its launch bound.
// Index targets: the split kernels when the call splits (split_plan), else one launch of the row kernel.
cudaError_t launch_sigmoid_focal(const LossArgs& args, const LaunchConfig& config, void* workspace,
                                 cudaStream_t stream) {
  return with_rows(args, config, [&](auto e, auto vec, const Grid& grid, const DeviceFacts& facts) {
    using E = decltype(e);
    constexpr int VEC = decltype(vec)::value;
    if constexpr (VEC * sizeof(typename E::bits) == 16) {
      const SplitPlan plan = split_plan(Family::kSigmoidFocal, args, config, facts.sms, facts.l2_bytes);
      if (plan.chunks > 0) return launch_sigmoid_split<E, VEC>(args, config, facts, plan, workspace, stream);
    }
    if (args.dense_target) {
      constexpr int kBound = device::kDenseMaxThreads;
      const Grid g = grid_of(args, within(config, kBound), facts, kBound * device::kDenseMinBlocks);
      return with_flag(args.gamma != 0.f, [&](auto focal) {
        return with_flag(extended(args), [&](auto extend) {
          device::sigmoid_dense_kernel<decltype(e), decltype(vec)::value, decltype(focal)::value,
                                       decltype(extend)::value><<<g.blocks, g.threads, 0, stream>>>(args, g.tpr);
          return cudaGetLastError();
        });
      });
    }
    return with_gamma(args.gamma, [&](auto g) {
      return with_flag(args.grad != nullptr, [&](auto write) {
        return with_flag(extended(args), [&](auto extend) {
          device::sigmoid_focal_kernel<decltype(e), decltype(vec)::value, decltype(g)::value, decltype(write)::value,
                                       decltype(extend)::value><<<grid.blocks, grid.threads, 0, stream>>>(args, grid.tpr);
          return cudaGetLastError();
        });
      });
    });
  });
}

// The streaming softmax reads each row twice. Its second read is served by L2 when the rows in flight fit
// there: the grid is cut to half of L2's worth of rows, provided one block per SM fits. When it does not,
// the second read comes from DRAM whatever the grid, and fewer blocks would only hold fewer bytes in
// flight: the grid stays.
Grid stream_grid(const LossArgs& args, Grid grid, const DeviceFacts& facts) {
  if (args.grad == nullptr) return grid;  // one read only
  const int64_t row_bytes = args.num_classes * elem_bytes(args.logits_dtype);
  const int64_t rows_per_block = grid.threads.x / grid.tpr;
  const int64_t fit = facts.l2_bytes / 2 / (row_bytes * rows_per_block);
  if (fit >= facts.sms) grid.blocks.x = static_cast<unsigned>(std::min<int64_t>(grid.blocks.x, fit));
  return grid;
}

// The softmax kernels of a call computing loss L (kernels.cuh: SoftmaxCe, SoftmaxFocal, SoftmaxFocalSmooth):
// the cached kernel with CachedL (L, or a form specialised further) when the gradient is written and the row
// fits (cached_softmax), else the streaming kernel with L, under its launch bound (kStreamMaxThreads: half
// the others' for the smoothed focal loss, and for the smoothed cross entropy with the optional inputs).
// Element weights that weigh every column (label smoothing) are streamed: the cached kernel takes them only
// where they fold into the row's weight (kernels.cuh).
// Calls that split (split_plan) run the split kernels with CachedL instead.
template <typename L, typename CachedL>
cudaError_t launch_softmax(const LossArgs& args, const LaunchConfig& config, void* workspace, cudaStream_t stream) {
  const bool column_weights = args.element_weight != nullptr && args.label_smoothing != 0.f;
  return with_rows(args, config, [&](auto e, auto vec, const Grid&, const DeviceFacts& facts) {
    using E = decltype(e);
    constexpr int VEC = decltype(vec)::value;
    if constexpr (VEC * sizeof(typename E::bits) == 16 && !CachedL::kTerms) {
      const Family family = CachedL::kFocal ? Family::kSoftmaxFocal : Family::kSoftmaxCe;
      const SplitPlan plan = split_plan(family, args, config, facts.sms, facts.l2_bytes);
      if (plan.chunks > 0) return launch_softmax_split<E, VEC, CachedL>(args, config, facts, plan, workspace, stream);
    }
    if constexpr (VEC * sizeof(typename E::bits) == device::kCachedVecBytes) {
      if (cached_softmax(config, args.num_classes) && args.grad != nullptr && !column_weights) {
        // Its own launch bound: the blocks its registers leave resident per SM.
        const Grid g = grid_of(args, config, facts, device::kCachedMaxThreads * device::kCachedMinBlocks);
        return with_flag(extended(args), [&](auto extend) {
          device::softmax_cached_kernel<E, VEC, CachedL, decltype(extend)::value><<<g.blocks, g.threads, 0, stream>>>(args, g.tpr);
          return cudaGetLastError();
        });
      }
    }
    return with_flag(args.grad != nullptr, [&](auto write) {
      return with_flag(extended(args), [&](auto extend) {
        constexpr int kBound = device::kStreamMaxThreads<L, decltype(extend)::value>;
        const Grid g = stream_grid(args, grid_of(args, within(config, kBound), facts, kBound), facts);
        device::softmax_stream_kernel<E, VEC, L, decltype(write)::value, decltype(extend)::value>
            <<<g.blocks, g.threads, 0, stream>>>(args, g.tpr);
        return cudaGetLastError();
      });
    });
  });
}

// Dense targets (dense_kernels.cuh): the cached kernel when the gradient is written and the row fits
// (cached_softmax), in the form of gamma's case G (kZero: the cross entropy) and with the optional inputs only
// when the call has them; else the streaming one under its launch bound, which reads gamma (G != kZero: the focal
// loss) and the optional inputs at run time. eps is read at run time.
template <GammaCase G>
cudaError_t launch_softmax_dense(const LossArgs& args, const LaunchConfig& config, cudaStream_t stream) {
  return with_rows(args, config, [&](auto e, auto vec, const Grid&, const DeviceFacts& facts) {
    using E = decltype(e);
    constexpr int VEC = decltype(vec)::value;
    if constexpr (VEC * sizeof(typename E::bits) == device::kCachedVecBytes) {
      if (cached_softmax(config, args.num_classes) && args.grad != nullptr) {
        return with_flag(extended(args), [&](auto extend) {
          constexpr bool kExtend = decltype(extend)::value;
          constexpr int kResident = device::kCachedMaxThreads * device::kDenseCachedMinBlocks<kExtend>;
          const Grid g = grid_of(args, config, facts, kResident);
          device::softmax_dense_cached_kernel<E, VEC, G, kExtend><<<g.blocks, g.threads, 0, stream>>>(args, g.tpr);
          return cudaGetLastError();
        });
      }
    }
    constexpr int kBound = device::kDenseMaxThreads;
    const Grid g =
        stream_grid(args, grid_of(args, within(config, kBound), facts, kBound * device::kDenseMinBlocks), facts);
    device::softmax_dense_stream_kernel<E, VEC, G != GammaCase::kZero><<<g.blocks, g.threads, 0, stream>>>(args, g.tpr);
    return cudaGetLastError();
  });
}

// The streaming kernel reads eps at run time; the cached one is specialised for eps == 0 (no sum of z).
cudaError_t launch_softmax_ce(const LossArgs& args, const LaunchConfig& config, void* workspace, cudaStream_t stream) {
  if (args.dense_target) return launch_softmax_dense<GammaCase::kZero>(args, config, stream);
  return with_flag(args.label_smoothing != 0.f, [&](auto smooth) {
    return launch_softmax<device::SoftmaxCe<true>, device::SoftmaxCe<decltype(smooth)::value>>(args, config, workspace,
                                                                                                 stream);
  });
}

// gamma 0 is the cross entropy: its kernels. Otherwise gamma enters once per row without smoothing, and
// per element with it, in the form of its case.
cudaError_t launch_softmax_focal(const LossArgs& args, const LaunchConfig& config, void* workspace,
                                 cudaStream_t stream) {
  return with_gamma(args.gamma, [&](auto g) {
    constexpr GammaCase G = decltype(g)::value;
    if constexpr (G == GammaCase::kZero) {
      return launch_softmax_ce(args, config, workspace, stream);
    } else {
      if (args.dense_target) return launch_softmax_dense<G>(args, config, stream);
      using Focal = device::SoftmaxFocal;
      using Smooth = device::SoftmaxFocalSmooth<G>;
      if (args.label_smoothing == 0.f) return launch_softmax<Focal, Focal>(args, config, workspace, stream);
      return launch_softmax<Smooth, Smooth>(args, config, workspace, stream);
    }
  });
}

// The most threads default_config gives a row: half of the 64-register kernels' launch bound, so that two
// blocks stay resident per SM and one block's per-row phases (reductions, edge step, the streaming
// softmax's switch between its passes) overlap the other's loads. With the whole bound (1024 threads) a
// long row's block is alone on its SM and every such phase leaves the memory system idle.
constexpr int kMaxDefaultRowThreads = device::kMaxThreads / 2;

}  // namespace

LaunchConfig default_config(int64_t c, Dtype) {
  // Chosen from the static model (not yet from a sweep; bench/sweep_cuda.py prints the rows that replace
  // it): threads per row enough that a row is at most kCachedElemsPerThread = 64 elements per thread (the
  // cached softmax holds such a row in registers; the sigmoid family spreads its per-row work, the edge
  // step and the reduction, over as many elements), from one warp to kMaxDefaultRowThreads (rows longer
  // than 32768 columns take more elements a thread); short rows share a 128-thread block. At C = 8142:
  // 128 threads a row, one row a block.
  int tpr = 32;
  while (tpr < kMaxDefaultRowThreads && static_cast<int64_t>(tpr) * device::kCachedElemsPerThread < c) tpr *= 2;
  const int rows = tpr >= 128 ? 1 : 128 / tpr;
  return {tpr * rows, rows, 16, true, 0};
}

int blocks_per_sm(const LaunchConfig& config, int resident_threads) {
  return config.ctas_per_sm > 0 ? config.ctas_per_sm : std::max(1, resident_threads / config.threads);
}

// Fewer rows a block, then fewer threads a row (the kernels compute the same with any multiple of 32).
LaunchConfig within(LaunchConfig config, int max_threads) {
  if (config.threads <= max_threads) return config;
  const int tpr = std::min(config.threads / config.rows_per_block, max_threads);
  config.rows_per_block = max_threads / tpr;
  config.threads = tpr * config.rows_per_block;
  return config;
}

bool cached_softmax(const LaunchConfig& config, int64_t c) {
  const int tpr = config.threads / config.rows_per_block;
  return config.cache_rows && config.vec_bytes == device::kCachedVecBytes && config.threads <= device::kCachedMaxThreads &&
         c <= static_cast<int64_t>(device::kCachedElemsPerThread) * tpr;
}

namespace {

// At least this many elements a thread in every chunk (see split_plan).
constexpr int kMinChunkElemsPerThread = device::kCachedElemsPerThread;

// Whether the split kernels compute this call (see split_plan).
bool split_kernels_take(Family family, const LossArgs& a) {
  if (a.dense_target) return false;
  const bool ce_takes = a.element_weight == nullptr || a.label_smoothing == 0.f;
  switch (family) {
    case Family::kSigmoidFocal: return true;
    case Family::kSoftmaxCe: return ce_takes;
    case Family::kSoftmaxFocal: return gamma_case(a.gamma) == GammaCase::kZero ? ce_takes : a.label_smoothing == 0.f;
  }
  return false;
}

}  // namespace

// Mirrors the Triton backend's rule (cbkernels/triton/grid.py split_geometry). A call splits its rows into
// column chunks when it has fewer rows than SMs (some SMs would idle, the others hold one row slot each);
// one that reads its rows twice (the softmax with a gradient) also when it has fewer than two per SM and one
// row per SM already overflows half of L2 (stream_grid then keeps the grid, and the second read comes from
// DRAM): the split's batches keep the rows between the two reads in L2.
//
// Each chunk keeps at least kCachedElemsPerThread (64) elements a thread: the work of a unit that does not
// scale with its columns (the row's target and weights, the chunk's bounds, one or two row reductions with
// their barriers, the partial results' store, and chunk 0's edge step) is then amortised over as many
// elements a thread as the cached softmax's whole row gives it, and each thread's pipelined loop (row_io.cuh
// for_each_vector, 2 vectors a step) runs at least 4 steps (8 for fp32). With the default table (512 threads
// a row above 32768 columns) rows of 65536 columns and more split, into 2 chunks at least.
//
// Only calls whose rows take 16-byte vectors split (row_io.cuh: the logits and gradient rows share that
// alignment, and the configuration asks for it): a narrower access is a misaligned view or a sweep's forced
// configuration, rare enough not to double the instances for. What splits: class-index targets, for the
// sigmoid family always, for the softmax the cross entropy and the focal loss without label smoothing, each
// with the optional inputs but element weights under label smoothing (the per-class path, whose extra sum of
// weights the statistics do not carry). The smoothed focal loss would need a third launch for its sums pass,
// and dense targets their own statistics: those keep the unsplit kernels.
SplitPlan split_plan(Family family, const LossArgs& a, const LaunchConfig& config, int sms, int l2_bytes) {
  if (a.num_rows == 0 || !split_kernels_take(family, a) || effective_vec_bytes(a, config.vec_bytes) != 16) return {};
  const bool reread = family != Family::kSigmoidFocal && a.grad != nullptr;
  const int64_t row_bytes = a.num_classes * elem_bytes(a.logits_dtype);
  const int64_t fit = l2_bytes / 2 / row_bytes;  // rows in half of L2
  const bool few = a.num_rows < sms;
  if (!few && !(reread && a.num_rows < 2 * static_cast<int64_t>(sms) && fit < sms)) return {};
  const int tpr = config.threads / config.rows_per_block;
  const int64_t most = a.num_classes / (static_cast<int64_t>(kMinChunkElemsPerThread) * tpr);
  if (most < 2) return {};
  // The fewest balanced batches of at most `fit` rows (while one row fits).
  int64_t batch = a.num_rows;
  if (reread && fit > 0) {
    const int64_t batches = (a.num_rows + fit - 1) / fit;
    batch = (a.num_rows + batches - 1) / batches;
  }
  // As many chunks as fill every row slot of the grid once (floor: no slot takes two units while another
  // takes one), at least 2, at most `most` and kMaxChunks (split_kernels.cuh: combined_row); then the row's vectors spread evenly over them. A row's body has
  // at most c / VEC vectors (a head of 0).
  const int64_t slots = static_cast<int64_t>(blocks_per_sm(config, device::kMaxThreads)) * sms * config.rows_per_block;
  const int64_t chunks = std::min({std::max<int64_t>(2, slots / batch), most, int64_t{device::kMaxChunks}});
  const int64_t vecs = a.num_classes * elem_bytes(a.logits_dtype) / 16;
  const int64_t chunk_vecs = (vecs + chunks - 1) / chunks;
  return {static_cast<int>((vecs + chunk_vecs - 1) / chunk_vecs), static_cast<int>(chunk_vecs), batch};
}

const char* config_error(const LaunchConfig& config, int64_t c) {
  if (config.threads < 32 || config.threads > device::kMaxThreads || config.threads % 32 != 0)
    return "threads per block must be a multiple of 32 in [32, 1024]";
  if (config.rows_per_block < 1 || config.threads % config.rows_per_block != 0 ||
      (config.threads / config.rows_per_block) % 32 != 0)
    return "rows per block must divide threads per block into a multiple of 32 threads per row";
  if (config.vec_bytes != 16 && config.vec_bytes != 8 && config.vec_bytes != 1)
    return "vector width must be 16, 8 (bytes) or 1 (one element)";
  if (config.ctas_per_sm < 0 || config.ctas_per_sm > 32)
    return "blocks per SM must be in [0, 32] (0: as many as stay resident)";
  if (c > device::kMaxColumns) return "rows of more than 2^31 - 65 classes are not supported by the CUDA kernels";
  return nullptr;
}

cudaError_t workspace_bytes(Family family, const LossArgs& args, const LaunchConfig& config, size_t* bytes) {
  *bytes = 0;
  if (args.num_rows == 0 || config_error(config, args.num_classes) != nullptr) return cudaSuccess;
  DeviceFacts facts{};
  if (const cudaError_t e = device_facts(facts); e != cudaSuccess) return e;
  *bytes = split_workspace_bytes(family, args, split_plan(family, args, config, facts.sms, facts.l2_bytes));
  return cudaSuccess;
}

cudaError_t launch_loss(Family family, const LossArgs& args, const LaunchConfig& config, void* workspace,
                        cudaStream_t stream) {
  switch (family) {
#define CBKERNELS_LAUNCH_FAMILY(enumerator, name, hyperparameters) \
  case Family::enumerator:                                        \
    return launch_##name(args, config, workspace, stream);
    CBKERNELS_FAMILIES(CBKERNELS_LAUNCH_FAMILY)
#undef CBKERNELS_LAUNCH_FAMILY
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_scale_rows_unless_one(void* grad, Dtype dtype, int64_t n, int64_t c, const float* grad_loss,
                                         bool broadcast, cudaStream_t stream) {
  if (c > device::kMaxColumns) return cudaErrorInvalidValue;
  if (n == 0 || c == 0) return cudaSuccess;
  DeviceFacts facts{};
  if (const cudaError_t e = device_facts(facts); e != cudaSuccess) return e;
  // One warp per row; enough warps for every row, at most kScaleBlocksPerSm blocks per SM.
  constexpr int kWarps = device::kScaleThreads / 32;
  const int64_t blocks =
      std::min<int64_t>((n + kWarps - 1) / kWarps, static_cast<int64_t>(facts.sms) * device::kScaleBlocksPerSm);
  return with_storage(dtype, [&](auto e) {
    using E = decltype(e);
    constexpr int VEC = 16 / sizeof(typename E::bits);
    device::scale_rows_unless_one_kernel<E, VEC><<<static_cast<unsigned>(blocks), device::kScaleThreads, 0, stream>>>(
        static_cast<typename E::bits*>(grad), grad_loss, n, static_cast<int>(c), broadcast);
    return cudaGetLastError();
  });
}

}  // namespace cbkernels::cuda
