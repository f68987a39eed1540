// The fused backward's scaling pass: grad[i, :] *= f_i in place, f_i = grad_loss[i] (or grad_loss[0] for
// every row when the upstream gradient is one value), skipping rows whose factor is exactly 1.
//
// loss.backward() of a "sum", or of functional.py's "mean" (1/count folded into the class weights,
// docs/math.md, section 4), hands every row a factor of 1: the forward already wrote the final gradient,
// and this launch reads the factors and touches no element of the (N, C) buffer. Deciding that on the
// host would need a device sync; each warp reads its row's factor and moves on instead (no sync,
// CUDA-graph safe). NaN != 1, so a NaN factor still reaches its row. The product is formed in fp32 and
// rounded once to grad's dtype, as torch.mul(grad, grad_loss[:, None]) does.
//
// One warp per row, a bounded grid of warps walking the rows (launch.cu), 16-byte vectors loaded a step
// ahead (row_io.cuh: for_each_vector); each row finds its own aligned head (row_io.cuh), so any C works.
#pragma once

#include <cstdint>

#include "row_io.cuh"

namespace cbkernels::cuda::device {

constexpr int kScaleThreads = 256;
constexpr int kScaleBlocksPerSm = 4;  // 32 warps per SM: enough rows' factors in flight

template <typename E, int VEC>
__global__ void __launch_bounds__(kScaleThreads) scale_rows_unless_one_kernel(typename E::bits* grad,
                                                                             const float* grad_loss, int64_t n,
                                                                             int c, bool broadcast) {
  constexpr int kWarps = kScaleThreads / 32;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < n; row += stride) {
    const float f = grad_loss[broadcast ? 0 : row];
    if (f == 1.f) continue;
    typename E::bits* g = grad + row * c;
    const Span s = split_row<VEC>(g, c);
    if (lane < s.head) g[lane] = E::store(E::load(g[lane]) * f);
    if (lane < s.len - s.tail_start) {
      const int col = s.tail_start + lane;
      g[col] = E::store(E::load(g[col]) * f);
    }
    for_each_vector<E, VEC>(g + s.head, s.nvec, -1, lane, 32, [&](int col, const float (&z)[VEC]) {
      float out[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = z[j] * f;
      store_word<E, VEC>(g + s.head + col, out);
    });
  }
}

}  // namespace cbkernels::cuda::device
