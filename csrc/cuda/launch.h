// Host interface of the CUDA kernels (csrc/cuda/launch.cu): a LossArgs, a launch configuration and a
// stream in, a cudaError_t out. No torch header here, so nvcc compiles launch.cu on machines whose torch
// has no CUDA (CI); bindings.cpp (through common/loss_ops.h) turns tensors into these arguments and checks
// the result.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/loss_args.h"

namespace cbkernels::cuda {

// How rows map onto the GPU. A block of `threads` threads handles `rows_per_block` rows at a time, each
// with threads / rows_per_block threads (a multiple of 32), and walks the rows with a persistent grid of
// `ctas_per_sm` blocks per SM (0: as many as each kernel's launch bound keeps resident, see blocks_per_sm;
// never more blocks than row groups); a kernel whose launch bound is below `threads` (the streaming softmax
// focal loss with label smoothing: 512) runs with fewer rows a block, then fewer threads a row. `vec_bytes`
// (16, 8, or 1 = one element) is the widest vector access tried: a call falls back to narrower accesses
// when the logits and gradient rows cannot share one alignment. `cache_rows`: the softmax keeps a row that
// fits in registers and reads the logits once (cached_softmax); otherwise (or when false) it reads them
// twice (three times for the softmax focal loss with label smoothing).
struct LaunchConfig {
  int threads;
  int rows_per_block;
  int vec_bytes;
  bool cache_rows;
  int ctas_per_sm;
};

// The default configuration for rows of c classes: the one table the sweep (bench/sweep_cuda.py) tunes.
LaunchConfig default_config(int64_t c, Dtype dtype);

// Blocks per SM of the persistent grid for `config` and a kernel whose launch bound keeps
// `resident_threads` threads resident per SM: config.ctas_per_sm, or for 0 resident_threads / threads.
// (kernels.cuh: kMaxThreads for the 64-register kernels, kCachedMaxThreads * kCachedMinBlocks for the
// cached softmax.)
int blocks_per_sm(const LaunchConfig& config, int resident_threads);

// `config` with at most max_threads threads a block (a kernel's launch bound).
LaunchConfig within(LaunchConfig config, int max_threads);

// Whether a softmax call with a gradient on rows of c classes takes the cached kernel under `config`
// (with 16-byte vectors; a call whose rows allow only narrower ones streams).
bool cached_softmax(const LaunchConfig& config, int64_t c);

// nullptr when `config` is usable for a call on logits of c classes, else a sentence saying what is wrong.
const char* config_error(const LaunchConfig& config, int64_t c);

// How a call splits its rows into column chunks (split_kernels.cuh) on a device of `sms` SMs and `l2_bytes`
// of L2: chunks 0 when it does not (enough rows, rows too short to split, or a call the split kernels do not
// take). Reads no tensor value (the pointers' alignment only); launch_loss follows it, and the static audit
// (cbkernels/audit/cuda_variants.py) prints it for the audited GPU.
struct SplitPlan {
  int chunks = 0;          // S per row; 0: the call does not split
  int chunk_vecs = 0;      // W: 16-byte vectors a chunk
  int64_t batch_rows = 0;  // rows of one stats + finish pair (the softmax with a gradient), else every row
};
SplitPlan split_plan(Family family, const LossArgs& args, const LaunchConfig& config, int sms, int l2_bytes);

// The device memory a call of `family` needs as scratch, in *bytes (0 when it needs none): calls with fewer
// rows than the device has SMs split their rows into column chunks (split_kernels.cuh), whose partial results
// (fp32, a few per row) go there. Reads no tensor value; the device's SM count and L2 size are host queries,
// cached per device.
cudaError_t workspace_bytes(Family family, const LossArgs& args, const LaunchConfig& config, size_t* bytes);

// Queues the kernels of `family` on `stream` and returns the launch's error (cudaSuccess when launched;
// no rows launch nothing). The caller has already checked the arguments and config_error. workspace:
// workspace_bytes(family, args, config) bytes of device memory on the current device, 256-byte aligned (or
// nullptr when that is 0), not read before written; the kernels queued on `stream` use it, so it may be
// freed to a stream-ordered allocator once this returns.
cudaError_t launch_loss(Family family, const LossArgs& args, const LaunchConfig& config, void* workspace,
                        cudaStream_t stream);

// The fused backward's in-place scaling (scale_rows.cuh): grad (n, c) contiguous of `dtype` on the current
// device, row i multiplied by grad_loss[i] (by grad_loss[0] for every row when `broadcast`), rows whose
// factor is exactly 1 left untouched. Reads no value on the host.
cudaError_t launch_scale_rows_unless_one(void* grad, Dtype dtype, int64_t n, int64_t c, const float* grad_loss,
                                         bool broadcast, cudaStream_t stream);

}  // namespace cbkernels::cuda
