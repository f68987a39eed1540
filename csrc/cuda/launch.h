// Host interface of the CUDA kernels (csrc/cuda/launch.cu): raw pointers, a stream and a launch
// configuration in, a cudaError_t out. No torch header here, so nvcc compiles launch.cu on machines whose
// torch has no CUDA (CI); bindings.cpp turns tensors into these arguments and checks the result.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace cbkernels_cuda {

enum class Dtype { kFloat32, kFloat16, kBFloat16 };

// One call's tensors (docs/op-contract.md). Rows are processed independently.
struct RowArgs {
  const void* logits;         // (n, c) of `dtype`, column stride 1, row stride `row_stride` elements
  int64_t row_stride;         // >= 0, in elements
  const void* target;         // (n,) contiguous, int64 when target_int64 else int32
  bool target_int64;
  const float* class_weight;  // (c,) contiguous, or nullptr (alpha_y = 1)
  const float* grad_scale;    // (n,) contiguous upstream grad per row, or nullptr (scale 1)
  float* loss;                // (n,) or nullptr (the backward op writes no loss)
  void* grad;                 // (n, c) contiguous of `dtype`, or nullptr (loss only)
  int64_t n;
  int64_t c;
  int64_t ignore_index;
};

// How rows map onto the GPU. A block of `threads` threads handles `rows_per_block` rows, each with
// threads / rows_per_block threads (a multiple of 32); `vec_bytes` (16, 8, or 1 = one element) is the
// widest vector access tried: a call falls back to narrower accesses when the logits and gradient rows
// cannot share one alignment. `cache_rows`: the softmax keeps a row that fits in registers and reads the
// logits once; otherwise (or when false) it reads them twice.
struct LaunchConfig {
  int threads;
  int rows_per_block;
  int vec_bytes;
  bool cache_rows;
};

// The default configuration for rows of c classes: the one table the sweep (bench/sweep_cuda.py) tunes.
LaunchConfig default_config(int64_t c, Dtype dtype);

// nullptr when `config` is usable for this call, else a sentence saying what is wrong.
const char* config_error(const LaunchConfig& config, int64_t n);

// Each returns the launch's error (cudaSuccess when launched; n == 0 launches nothing). The caller has
// already checked shapes, dtypes and config_error.
cudaError_t sigmoid_focal(const RowArgs& args, Dtype dtype, float gamma, const LaunchConfig& config,
                          cudaStream_t stream);
cudaError_t softmax_ce(const RowArgs& args, Dtype dtype, float label_smoothing, const LaunchConfig& config,
                       cudaStream_t stream);

}  // namespace cbkernels_cuda
