"""The shipped CUDA kernels (csrc/cuda/*), as the audit compiles and models them.

Contract (whoever changes the CUDA kernels, their launcher or the backward strategy updates this file, and
only this file, for the audit to follow):

SOURCES: the translation unit(s) holding the kernels and the launcher, compiled with the shipped flags.
PROBE_SOURCE: a host program linked with SOURCES; `probe <C> <dtype>` (dtype "float32" | "bfloat16") prints,
  as one JSON object, whatever launches() needs from the launcher's own code (its default launch
  configuration and constants), so that no launch number is restated here. It must call no CUDA API.
launches(loss, dtype, n, c, config) -> list[launches.Launch]
  loss: "softmax" | "sigmoid" | "focal" at the registry's default hyperparameters (focal: gamma 0.5);
  config: the probe's JSON for (c, dtype). Every kernel the default backward strategy
  (_backends.CUDA.default_strategy) launches for one forward + backward at (n, c), in order, each with:
  code: CudaKernel(a substring of the demangled name matching exactly one template instance); the grid,
  threads, threads per row, elements per thread per main-loop iteration; and the N x C bytes it moves per
  element in the audited scenario (loss.backward() of a mean: upstream gradient 1; class weights; int64
  targets; 16-byte aligned tensors, so the launcher keeps its widest vector).
"""
from __future__ import annotations

from .. import _backends
from ..gamma_cases import gamma_case
from ..losses import loss as registered_loss
from .launches import ELEMENT_BYTES, CudaKernel, Launch

SOURCES = ("csrc/cuda/launch.cu",)

PROBE_SOURCE = r"""
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "cuda/kernels.cuh"
#include "cuda/launch.h"

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  const long long c = std::atoll(argv[1]);
  const bool fp32 = std::strcmp(argv[2], "float32") == 0;
  const auto dtype = fp32 ? cbkernels::Dtype::kFloat32 : cbkernels::Dtype::kBFloat16;
  const cbkernels::cuda::LaunchConfig k = cbkernels::cuda::default_config(c, dtype);
  std::printf("{\"threads\": %d, \"rows_per_block\": %d, \"vec_bytes\": %d, \"cache_rows\": %d, "
              "\"cached_elems_per_thread\": %d, \"cached_vec_bytes\": %d}\n",
              k.threads, k.rows_per_block, k.vec_bytes, k.cache_rows ? 1 : 0,
              cbkernels::cuda::device::kCachedElemsPerThread, cbkernels::cuda::device::kCachedVecBytes);
  return 0;
}
"""

_STORAGE = {"float32": "F32", "bfloat16": "BF16"}
_NS = "cbkernels::cuda::device::"


def _b(flag: bool) -> str:
    return "true" if flag else "false"


def launches(loss: str, dtype: str, n: int, c: int, config: dict) -> list[Launch]:
    if _backends.CUDA.default_strategy != "recompute":
        raise ValueError("cuda_variants describes the 'recompute' strategy (forward: loss only; backward: "
                         f"gradient); the default is now {_backends.CUDA.default_strategy!r}: update this file")
    spec = registered_loss(loss)
    elem = ELEMENT_BYTES[dtype]
    storage = f"{_NS}{_STORAGE[dtype]}"
    vec = config["vec_bytes"] // elem
    tpr = config["threads"] // config["rows_per_block"]
    common = dict(ctas=-(-n // config["rows_per_block"]), threads_per_cta=config["threads"], threads_per_row=tpr)
    if spec.family.name == "sigmoid_focal":
        (gamma,) = spec.kernel_hyperparameters({})
        case = int(gamma_case(gamma))

        def focal(write):
            return Launch(kernel=f"sigmoid_focal_kernel[{'grad' if write else 'loss'}]",
                          code=CudaKernel(f"{_NS}sigmoid_focal_kernel<{storage}, {vec}, "
                                          f"(cbkernels::GammaCase){case}, {_b(write)}>("),
                          elems_per_iter=vec, read_bytes_per_elem=elem, write_bytes_per_elem=elem if write else 0,
                          **common)
        return [focal(False), focal(True)]
    # softmax_ce: forward streams the row once for the loss; backward keeps a short row in registers
    # (launch.cu: cache_rows, 16-byte vectors, C <= kCachedElemsPerThread * tpr), else streams it twice.
    forward = Launch(kernel="softmax_stream_kernel[loss]",
                     code=CudaKernel(f"{_NS}softmax_stream_kernel<{storage}, {vec}, false>("),
                     elems_per_iter=vec, read_bytes_per_elem=elem, write_bytes_per_elem=0, **common)
    cached = (config["cache_rows"] and config["vec_bytes"] == config["cached_vec_bytes"]
              and c <= config["cached_elems_per_thread"] * tpr)
    if cached:
        backward = Launch(kernel="softmax_cached_kernel[grad]",
                          code=CudaKernel(f"{_NS}softmax_cached_kernel<{storage}, {vec}>("),
                          elems_per_iter=config["cached_elems_per_thread"], read_bytes_per_elem=elem,
                          write_bytes_per_elem=elem, **common)
    else:
        backward = Launch(kernel="softmax_stream_kernel[grad]",
                          code=CudaKernel(f"{_NS}softmax_stream_kernel<{storage}, {vec}, true>("),
                          elems_per_iter=vec, read_bytes_per_elem=2 * elem, write_bytes_per_elem=elem, **common)
    return [forward, backward]
