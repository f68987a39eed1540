"""The shipped CUDA kernels (csrc/cuda/*), as the audit compiles and models them.

Contract (whoever changes the CUDA kernels, their launcher or the backward strategy updates this file, and
only this file, for the audit to follow):

SOURCES: the translation unit(s) holding the kernels and the launcher, compiled with the shipped flags.
PROBE_SOURCE: a host program linked with SOURCES; `probe <C> <dtype> [<N> <SMs> <L2 bytes>]` (dtype "float32" |
  "bfloat16") prints, as one JSON object, whatever launches() needs from the launcher's own code (its default
  launch configuration and constants, and with N and a device the row split of each family's audited call),
  so that no launch number is restated here. It must call no CUDA API. probe_arguments(n, c, dtype) gives
  its arguments.
launches(loss, dtype, n, c, config) -> list[launches.Launch]
  loss: "softmax" | "sigmoid" | "focal" | "softmax_focal" at the registry's default hyperparameters (focal:
  gamma 0.5; softmax_focal: gamma 2, no label smoothing);
  config: the probe's JSON for probe_arguments(n, c, dtype). Every kernel the default backward strategy
  (_backends.CUDA.default_strategy) launches for one forward + backward at (n, c), in order, each with:
  code: CudaKernel(a substring of the demangled name matching exactly one template instance); the grid,
  threads, threads per row, elements per thread per main-loop iteration; and the N x C bytes it moves per
  element in the audited scenario (loss.backward() of a mean: upstream gradient 1; class weights; int64
  targets; 16-byte aligned tensors, so the launcher keeps its widest vector).

The CUDA backend's default strategy is "fused": the eager call's forward launches the family kernel with
the gradient written (csrc/common/loss_function.h), and its backward launches the in-place scaling kernel
(csrc/cuda/scale_rows.cuh), whose warps, with an upstream gradient of 1, read their row's factor and move on.
Every kernel walks the rows with a persistent grid (launch.cu: grid_of, blocks_per_sm): the grid of the
audited GPU is its SM count times the launcher's blocks per SM (the audit derives the rows a thread walks).
The body loops skip the vector holding the target column (row_io.cuh: for_each_vector), which the row's edge
step computes with the head and tail, one column per thread, outside the loop: no rare path to declare.
The cached softmax has its own launch bound (kernels.cuh: kCachedMaxThreads, kCachedMinBlocks), hence its own
blocks per SM. The streaming softmax (rows longer than the cached kernel holds) reads each row twice; its
persistent grid is cut so that the rows in flight fit in a share of L2 (launch.cu: stream_grid, whose share
is read from its source), which the audit computes with the model's L2 size. Both softmax kernels are
templated on the loss they compute (kernels.cuh: SoftmaxCe<Smooth>, SoftmaxFocal, SoftmaxFocalSmooth<G>); the
softmax focal loss without label smoothing runs the cross entropy's passes with two per-row scalars changed,
so it launches, reads and writes as the cross entropy does. Every kernel has a last template flag Extended
(kernels.cuh): true only for a call with a logit offset, a target margin or element weights
(docs/op-contract.md), which the audited scenario has not, so the audit reads the Extended = false instances,
in which none of that code is.

With fewer rows than the GPU has SMs (and for the softmax, which reads its rows twice, also with fewer than two
per SM when one row per SM overflows half of L2), the launcher splits each row into column chunks
(launch.cu: split_plan, which the probe prints for the audited GPU; split_kernels.cuh): the sigmoid family runs
sigmoid_split_kernel over (row, chunk) units, then sum_parts_kernel (one thread a row, per-row values only);
the softmax families run, for each batch of rows that fits half of L2, softmax_split_stats_kernel then
softmax_split_finish_kernel (the finish re-reads the batch, from L2 when it fits), each over the batch's units
and on the grid of the unsplit kernels' configuration (unit_grid: a unit per row slot). A split unit's threads
share a row with the other chunks' (Launch.threads_per_row = threads a row x chunks). Dense targets are not
split.

With dense=True the same scenario has a dense (N, C) target in the logits' dtype instead of class indices, and
the launcher runs the kernels of dense_kernels.cuh (launch.cu: the sigmoid family's dense branch,
launch_softmax_dense), every one under its own launch bound (within(config, kDenseMaxThreads) and the blocks
per SM of kDenseMinBlocks; the cached softmax: kDenseCachedMinBlocks), the sigmoid family's and the cached
softmax's in their Extended = false instances, the sigmoid family's with its flag Focal (gamma != 0), the
cached softmax's with gamma's case (the cross entropy's kZero). The sigmoid family reads the targets first
alone for the row weight (class weights are on; their values one by one beside the targets' vectors) and
again beside the logits, kStep vectors of each a step; the streaming softmax reads both in each of its passes
(for_each_pair: kDenseStep vectors of each a step; the cross entropy's two, the focal loss's three); the cached
softmax holds the logits and reads the targets again for the gradient (its one loop, the row walk, loads the
logits and the targets twice).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from .. import _backends
from ..gamma_cases import GammaCase, gamma_case
from ..losses import loss as registered_loss
from .launches import ELEMENT_BYTES, CudaKernel, Launch
from .roofline import H200

SOURCES = ("csrc/cuda/launch.cu",)
_ROOT = Path(__file__).resolve().parents[2]

PROBE_SOURCE = r"""
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "cuda/dense_kernels.cuh"
#include "cuda/kernels.cuh"
#include "cuda/launch.h"
#include "cuda/scale_rows.cuh"

// The architecture this probe's kernels are compiled for (nvcc's list, one entry: the audited arch).
constexpr int kArchs[] = {__CUDA_ARCH_LIST__};

// The row split (launch.h split_plan) of the audited call of `family` on n rows: class-index targets, class
// weights, the loss and the gradient written (the fused forward), no label smoothing; 256-byte aligned
// pointers that are never dereferenced (the plan reads their alignment only).
cbkernels::cuda::SplitPlan audited_split(cbkernels::Family family, long long n, long long c, cbkernels::Dtype dtype,
                                         const cbkernels::cuda::LaunchConfig& k, int sms, int l2) {
  cbkernels::LossArgs a{};
  void* aligned = reinterpret_cast<void*>(std::uintptr_t{256});
  a.logits = aligned;
  a.grad = aligned;
  a.target = aligned;
  a.target_is_int64 = true;
  a.class_weight = static_cast<const float*>(aligned);
  a.loss = static_cast<float*>(aligned);
  a.num_rows = n;
  a.num_classes = c;
  a.row_stride = c;
  a.logits_dtype = dtype;
  a.gamma = 2.f;  // the softmax focal loss's default (any gamma splits without label smoothing)
  return cbkernels::cuda::split_plan(family, a, k, sms, l2);
}

int main(int argc, char** argv) {
  namespace d = cbkernels::cuda::device;
  if (argc != 3 && argc != 6) return 2;
  const long long c = std::atoll(argv[1]);
  const bool fp32 = std::strcmp(argv[2], "float32") == 0;
  const auto dtype = fp32 ? cbkernels::Dtype::kFloat32 : cbkernels::Dtype::kBFloat16;
  const cbkernels::cuda::LaunchConfig k = cbkernels::cuda::default_config(c, dtype);
  const char* error = cbkernels::cuda::config_error(k, c);
  const cbkernels::cuda::LaunchConfig dk = cbkernels::cuda::within(k, d::kDenseMaxThreads);
  std::printf("{\"threads\": %d, \"rows_per_block\": %d, \"vec_bytes\": %d, \"cache_rows\": %d, "
              "\"ctas_per_sm\": %d, \"blocks_per_sm\": %d, \"cached_blocks_per_sm\": %d, \"cached\": %d, "
              "\"config_error\": \"%s\", \"step_vectors\": %d, \"cached_elems_per_thread\": %d, "
              "\"scale_threads\": %d, \"scale_blocks_per_sm\": %d, \"stream_step_vectors\": %d, "
              "\"dense_threads\": %d, \"dense_rows_per_block\": %d, \"dense_blocks_per_sm\": %d, "
              "\"dense_cached_blocks_per_sm\": %d, \"dense_step_vectors\": %d",
              k.threads, k.rows_per_block, k.vec_bytes, k.cache_rows ? 1 : 0, k.ctas_per_sm,
              cbkernels::cuda::blocks_per_sm(k, d::kMaxThreads),
              cbkernels::cuda::blocks_per_sm(k, d::kCachedMaxThreads * d::kCachedMinBlocks),
              cbkernels::cuda::cached_softmax(k, c) ? 1 : 0, error ? error : "", d::kStep,
              d::kCachedElemsPerThread, d::kScaleThreads, d::kScaleBlocksPerSm,
              d::stream_step(fp32 ? 16 / 4 : 16 / 2, kArchs[0]), dk.threads, dk.rows_per_block,
              cbkernels::cuda::blocks_per_sm(dk, d::kDenseMaxThreads * d::kDenseMinBlocks),
              cbkernels::cuda::blocks_per_sm(k, d::kCachedMaxThreads * d::kDenseCachedMinBlocks<false>), d::kDenseStep);
  if (argc == 6) {  // "split": {family: [chunks, chunk_vecs, batch_rows]} of the audited call on this device
    const long long n = std::atoll(argv[3]);
    const int sms = std::atoi(argv[4]), l2 = std::atoi(argv[5]);
    const char* sep = "";
    std::printf(", \"split\": {");
    for (auto [family, name] : {std::pair{cbkernels::Family::kSigmoidFocal, "sigmoid_focal"},
                                std::pair{cbkernels::Family::kSoftmaxCe, "softmax_ce"},
                                std::pair{cbkernels::Family::kSoftmaxFocal, "softmax_focal"}}) {
      const cbkernels::cuda::SplitPlan p = audited_split(family, n, c, dtype, k, sms, l2);
      std::printf("%s\"%s\": [%d, %d, %lld]", sep, name, p.chunks, p.chunk_vecs, static_cast<long long>(p.batch_rows));
      sep = ", ";
    }
    std::printf("}");
  }
  std::printf("}\n");
  return 0;
}
"""

_STORAGE = {"float32": "F32", "bfloat16": "BF16"}
_NS = "cbkernels::cuda::device::"
_SMS = H200.sms  # the persistent grids' blocks per SM x this (H100 and H200 alike: 132)
_L2_BYTES = H200.l2_bytes  # the streaming softmax's grid is cut to this L2 (H100 and H200 alike: 50 MiB)


def probe_arguments(n: int, c: int, dtype: str) -> tuple:
    """The probe's arguments for the audited call at (n, c) on the audited GPU (see PROBE_SOURCE)."""
    return (c, dtype, n, _SMS, _L2_BYTES)


def _source_constant(path: str, name: str) -> int:
    """The value of `constexpr int <name> = <integer>;` in csrc/cuda/<path>, read from its source, not restated."""
    found = re.search(rf"constexpr int {name} = (\d+);", (_ROOT / "csrc" / "cuda" / path).read_text())
    if not found:
        raise RuntimeError(f"cuda_variants: cannot find {name} in csrc/cuda/{path}; update this file")
    return int(found.group(1))


def _stream_l2_divisor() -> int:
    """The launcher keeps the streaming softmax's rows in flight within L2 / this (launch.cu: stream_grid,
    `facts.l2_bytes / D / ...`), read from its source, not restated."""
    source = (_ROOT / SOURCES[0]).read_text()
    body = re.search(r"Grid stream_grid\(.*?\n}\n", source, re.S)
    found = body and re.search(r"facts\.l2_bytes\s*/\s*(\d+)\s*/", body.group(0))
    if not found:
        raise RuntimeError("cuda_variants: cannot find the L2 share in launch.cu's stream_grid; update this file")
    return int(found.group(1))


def _stream_blocks(blocks: int, c: int, elem: int, rows_per_block: int) -> int:
    """launch.cu: stream_grid. The persistent grid cut to the blocks whose rows fit in L2 / divisor when
    one block per SM fits; otherwise the grid unchanged."""
    fit = _L2_BYTES // _stream_l2_divisor() // (c * elem * rows_per_block)
    return min(blocks, fit) if fit >= _SMS else blocks


def _b(flag: bool) -> str:
    return "true" if flag else "false"


def _persistent(groups: int, per_sm: int) -> int:
    """Blocks of a persistent grid of per_sm blocks per SM over `groups` row groups (launch.cu: grid_of)."""
    return min(groups, _SMS * per_sm)


def _scale_launch(dtype: str, n: int, config: dict) -> Launch:
    """scale_rows_unless_one_kernel: one warp per row, at most scale_blocks_per_sm blocks per SM. With an
    upstream gradient of 1 each warp reads its rows' factors and skips them."""
    warps = config["scale_threads"] // 32
    blocks = _persistent(math.ceil(n / warps), config["scale_blocks_per_sm"])
    vec = 16 // ELEMENT_BYTES[dtype]
    return Launch(kernel="scale_rows_unless_one_kernel[upstream grad 1]",
                  code=CudaKernel(f"{_NS}scale_rows_unless_one_kernel<{_NS}{_STORAGE[dtype]}, {vec}>("),
                  ctas=blocks, threads_per_cta=config["scale_threads"], threads_per_row=32,
                  elems_per_iter=vec * config["step_vectors"], read_bytes_per_elem=0,
                  write_bytes_per_elem=0, per_element_work=False)


def _softmax_losses(spec) -> tuple[str, str]:
    """The loss template argument (kernels.cuh) of the cached and of the streaming softmax kernel for a
    softmax-family loss at its default hyperparameters, as launch.cu picks them (launch_softmax_ce,
    launch_softmax_focal), demangled (each followed by the kernel's flags): the cross entropy's cached kernel without the sum
    of z, its streaming kernel with eps read at run time; the focal loss's without smoothing, or the cross
    entropy's at gamma 0."""
    values = dict(zip((h.name for h in spec.family.hyperparameters), spec.kernel_hyperparameters({})))
    if values["label_smoothing"] != 0:
        raise ValueError("cuda_variants describes the softmax kernels without label smoothing (the registry's "
                         "default): update this file")
    if spec.family.name == "softmax_focal" and gamma_case(values["gamma"]) != GammaCase.ZERO:
        return f"{_NS}SoftmaxFocal", f"{_NS}SoftmaxFocal"
    return f"{_NS}SoftmaxCe<false>", f"{_NS}SoftmaxCe<true>"


def _dense_launch(spec, dtype: str, n: int, c: int, config: dict) -> Launch:
    """The forward's launch for a dense target (launch.cu: the sigmoid family's dense branch,
    launch_softmax_dense; see the module docstring)."""
    elem = ELEMENT_BYTES[dtype]
    storage = f"{_NS}{_STORAGE[dtype]}"
    vec = config["vec_bytes"] // elem if config["vec_bytes"] > elem else 1
    if spec.family.name == "sigmoid_focal":
        (gamma,) = spec.kernel_hyperparameters({})
        tpr = config["dense_threads"] // config["dense_rows_per_block"]
        return Launch(kernel="sigmoid_dense_kernel[loss+grad+dense]",
                      code=CudaKernel(f"{_NS}sigmoid_dense_kernel<{storage}, {vec}, {_b(gamma != 0)}, false>("),
                      ctas=_persistent(math.ceil(n / config["dense_rows_per_block"]), config["dense_blocks_per_sm"]),
                      threads_per_cta=config["dense_threads"], threads_per_row=tpr,
                      elems_per_iter=vec * config["step_vectors"], read_bytes_per_elem=3 * elem,
                      write_bytes_per_elem=elem, reread_bytes_per_elem=elem, tile_loop_bytes=(elem, 2 * elem))
    focal = _b(spec.family.name == "softmax_focal" and _softmax_losses(spec)[0] == f"{_NS}SoftmaxFocal")
    if config["cached"]:
        case = GammaCase.ZERO  # the cross entropy's
        if focal == "true":
            values = dict(zip((h.name for h in spec.family.hyperparameters), spec.kernel_hyperparameters({})))
            case = gamma_case(values["gamma"])
        tpr = config["threads"] // config["rows_per_block"]
        return Launch(kernel="softmax_dense_cached_kernel[loss+grad+dense]",
                      code=CudaKernel(f"{_NS}softmax_dense_cached_kernel<{storage}, {vec}, "
                                      f"(cbkernels::GammaCase){int(case)}, false>("),
                      ctas=_persistent(math.ceil(n / config["rows_per_block"]), config["dense_cached_blocks_per_sm"]),
                      threads_per_cta=config["threads"], threads_per_row=tpr,
                      elems_per_iter=config["cached_elems_per_thread"], read_bytes_per_elem=3 * elem,
                      write_bytes_per_elem=elem, reread_bytes_per_elem=elem, tile_loop_bytes=(3 * elem,))
    passes = 3 if focal == "true" else 2
    tpr = config["dense_threads"] // config["dense_rows_per_block"]
    blocks = _persistent(math.ceil(n / config["dense_rows_per_block"]), config["dense_blocks_per_sm"])
    return Launch(kernel="softmax_dense_stream_kernel[loss+grad+dense]",
                  code=CudaKernel(f"{_NS}softmax_dense_stream_kernel<{storage}, {vec}, {focal}>("),
                  ctas=_stream_blocks(blocks, c, elem, config["dense_rows_per_block"]),
                  threads_per_cta=config["dense_threads"], threads_per_row=tpr,
                  elems_per_iter=vec * config["dense_step_vectors"], read_bytes_per_elem=2 * passes * elem,
                  write_bytes_per_elem=elem, reread_bytes_per_elem=2 * (passes - 1) * elem, rereads=passes - 1,
                  tile_loop_bytes=(2 * elem,) * passes)


def _split_launches(spec, dtype: str, n: int, config: dict, plan: list) -> list[Launch]:
    """The forward's launches of a call whose rows split (launch.cu: launch_sigmoid_split, launch_softmax_split;
    plan: the probe's [chunks, chunk_vecs, batch_rows]; see the module docstring)."""
    chunks, _, batch_rows = plan
    elem = ELEMENT_BYTES[dtype]
    storage = f"{_NS}{_STORAGE[dtype]}"
    vec = 16 // elem
    tpr = config["threads"] // config["rows_per_block"]
    units = dict(threads_per_cta=config["threads"], threads_per_row=tpr * chunks)

    def unit_ctas(rows: int) -> int:  # launch.cu unit_grid: a unit per row slot, the persistent grid's bound
        return _persistent(math.ceil(rows * chunks / config["rows_per_block"]), config["blocks_per_sm"])

    if spec.family.name == "sigmoid_focal":
        (gamma,) = spec.kernel_hyperparameters({})
        sum_threads = _source_constant("split_kernels.cuh", "kSumPartsThreads")
        return [Launch(kernel="sigmoid_split_kernel[loss+grad]",
                       code=CudaKernel(f"{_NS}sigmoid_split_kernel<{storage}, {vec}, "
                                       f"(cbkernels::GammaCase){int(gamma_case(gamma))}, true, false>("),
                       ctas=unit_ctas(n), elems_per_iter=vec * config["step_vectors"], read_bytes_per_elem=elem,
                       write_bytes_per_elem=elem, **units),
                Launch(kernel="sum_parts_kernel[loss]", code=CudaKernel(f"{_NS}sum_parts_kernel("),
                       ctas=math.ceil(n / sum_threads), threads_per_cta=sum_threads, threads_per_row=1,
                       elems_per_iter=1, read_bytes_per_elem=0, write_bytes_per_elem=0, per_element_work=False,
                       follows_launch=True)]
    finish_loss = _softmax_losses(spec)[0]  # the cached kernel's loss: no sum of z without label smoothing
    step = vec * config["stream_step_vectors"]
    out = []
    for row0 in range(0, n, batch_rows):
        rows = min(batch_rows, n - row0)
        batch = dict(batch_rows=rows if rows != n else None, **units)
        label = "" if rows == n else f"+rows {row0}:{row0 + rows}"
        out.append(Launch(kernel=f"softmax_split_stats_kernel[stats{label}]",
                          code=CudaKernel(f"{_NS}softmax_split_stats_kernel<{storage}, {vec}, false, false>("),
                          ctas=unit_ctas(rows), elems_per_iter=step, read_bytes_per_elem=elem, write_bytes_per_elem=0,
                          follows_launch=row0 > 0, **batch))
        out.append(Launch(kernel=f"softmax_split_finish_kernel[loss+grad{label}]",
                          code=CudaKernel(f"{_NS}softmax_split_finish_kernel<{storage}, {vec}, {finish_loss}, "
                                          "true, false>("),
                          ctas=unit_ctas(rows), elems_per_iter=step, read_bytes_per_elem=elem,
                          write_bytes_per_elem=elem, reread_bytes_per_elem=elem, follows_launch=True, **batch))
    return out


def launches(loss: str, dtype: str, n: int, c: int, config: dict, dense: bool = False) -> list[Launch]:
    if _backends.CUDA.default_strategy != "fused":
        raise ValueError("cuda_variants describes the 'fused' strategy (forward: loss and gradient; backward: "
                         f"in-place scaling); the default is now {_backends.CUDA.default_strategy!r}: update "
                         "this file")
    if config["config_error"]:
        raise ValueError(f"cuda_variants: the launcher's default configuration is refused: {config['config_error']}")
    spec = registered_loss(loss)
    if dense:
        return [_dense_launch(spec, dtype, n, c, config), _scale_launch(dtype, n, config)]
    plan = config["split"][spec.family.name]
    if plan[0]:
        return [*_split_launches(spec, dtype, n, config, plan), _scale_launch(dtype, n, config)]
    elem = ELEMENT_BYTES[dtype]
    storage = f"{_NS}{_STORAGE[dtype]}"
    vec = config["vec_bytes"] // elem if config["vec_bytes"] > elem else 1
    tpr = config["threads"] // config["rows_per_block"]
    blocks = _persistent(math.ceil(n / config["rows_per_block"]), config["blocks_per_sm"])
    common = dict(ctas=blocks, threads_per_cta=config["threads"], threads_per_row=tpr)
    if spec.family.name == "sigmoid_focal":
        (gamma,) = spec.kernel_hyperparameters({})
        case = int(gamma_case(gamma))
        forward = Launch(kernel="sigmoid_focal_kernel[loss+grad]",
                         code=CudaKernel(f"{_NS}sigmoid_focal_kernel<{storage}, {vec}, "
                                         f"(cbkernels::GammaCase){case}, true, false>("),
                         elems_per_iter=vec * config["step_vectors"], read_bytes_per_elem=elem,
                         write_bytes_per_elem=elem, **common)
        return [forward, _scale_launch(dtype, n, config)]
    # The softmax families: a row that fits in registers (launch.cu: cached_softmax) is read once; its only
    # loop is the row walk, each iteration one row of up to cached_elems_per_thread elements a thread.
    # Otherwise the row is streamed: pass 1 reads it for the max and the sums, pass 2 reads it again for the
    # gradient (a re-read, which the model serves from L2 when the grid's rows in flight fit there), on a
    # grid cut by stream_grid.
    cached_loss, stream_loss = _softmax_losses(spec)
    if config["cached"]:
        blocks = _persistent(math.ceil(n / config["rows_per_block"]), config["cached_blocks_per_sm"])
        forward = Launch(kernel="softmax_cached_kernel[loss+grad]",
                         code=CudaKernel(f"{_NS}softmax_cached_kernel<{storage}, {vec}, {cached_loss}, false>("),
                         ctas=blocks, threads_per_cta=config["threads"], threads_per_row=tpr,
                         elems_per_iter=config["cached_elems_per_thread"], read_bytes_per_elem=elem,
                         write_bytes_per_elem=elem)
    else:
        step = 1 if vec == 1 else config["stream_step_vectors"]
        forward = Launch(kernel="softmax_stream_kernel[loss+grad]",
                         code=CudaKernel(f"{_NS}softmax_stream_kernel<{storage}, {vec}, {stream_loss}, true, false>("),
                         ctas=_stream_blocks(blocks, c, elem, config["rows_per_block"]),
                         threads_per_cta=config["threads"], threads_per_row=tpr, elems_per_iter=vec * step,
                         read_bytes_per_elem=2 * elem, write_bytes_per_elem=elem, reread_bytes_per_elem=elem)
    return [forward, _scale_launch(dtype, n, config)]
