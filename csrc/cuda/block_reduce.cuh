// Reductions over the tpr threads of one row slot (row_io.cuh: Slot): warp shuffles, then (tpr > 32) one
// shared-memory slot per warp and one barrier. Every thread of the row then combines its row's warp
// slots in the same order, so all of them hold the same, run-to-run identical value (no atomics).
//
// One barrier per reduction, none to free the slots afterwards: a caller passes a slot array that nobody
// writes again before the block's next barrier. The loss kernels make two reductions per row on two arrays
// (each array's next write then comes after the other's barrier), or one per row on two arrays used on
// alternate rows. Called by every thread of the block (tpr is block-uniform, so the early return is too).
#pragma once

namespace cbkernels::cuda::device {

constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / 32;

struct SumOp {
  static __device__ __forceinline__ float apply(float a, float b) { return a + b; }
};
// fmaxf drops a NaN operand; the softmax needs no NaN-keeping max, because a NaN logit makes its own
// exp, hence the row's sum and every output of the row, NaN whatever the max is.
struct MaxOp {
  static __device__ __forceinline__ float apply(float a, float b) { return fmaxf(a, b); }
};

// Reduces each of the K values of v over the 32 lanes of the warp, in place, every lane active. A butterfly:
// at each level lane i combines its value with lane i ^ offset's, and both lanes form the same operation on
// the same two operands (Op commutes), so every lane ends with the same, bit-identical value.
template <typename Op, int K>
__device__ __forceinline__ void warp_reduce(float (&v)[K]) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = Op::apply(v[k], __shfl_xor_sync(0xffffffffu, v[k], offset));
  }
}

// Reduces each of the K values of v over the row's threads, in place. slots: K * kMaxWarps floats of
// shared memory (see above for when they may be reused).
template <typename Op, int K>
__device__ __forceinline__ void row_reduce(float (&v)[K], int tpr, int group, float* slots) {
  warp_reduce<Op>(v);
  if (tpr == 32) return;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) slots[k * kMaxWarps + warp] = v[k];
  }
  __syncthreads();
  const int warps = tpr >> 5, first = group * warps;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float r = slots[k * kMaxWarps + first];
    for (int i = 1; i < warps; ++i) r = Op::apply(r, slots[k * kMaxWarps + first + i]);
    v[k] = r;
  }
}

}  // namespace cbkernels::cuda::device
