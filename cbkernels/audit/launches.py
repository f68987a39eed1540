"""The record a variant file gives for each kernel launch: what to compile and how it runs at (N, C).

triton_variants.py and cuda_variants.py return lists of `Launch`; the rest of the audit reads only these
fields and never names a kernel.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

LOSSES = ("softmax", "sigmoid", "focal", "softmax_focal")
DTYPES = ("float32", "bfloat16")
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2}


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """A @triton.jit function and the arguments of the launch, as the launcher passes them.

    args: the positional arguments; a tensor is given as its torch.dtype (compiled as a 16-byte aligned
    pointer, as Triton specialises a freshly allocated tensor), None and Python numbers as they are passed
    (Triton specialises integers divisible by 16 and equal to 1, as at a real launch).
    constexprs: the keyword constexpr arguments. num_warps / num_stages: the launch options.
    """
    fn: Callable
    args: tuple
    constexprs: dict
    num_warps: int
    num_stages: int = 1


@dataclasses.dataclass(frozen=True)
class CudaKernel:
    """A template instance of the CUDA translation unit, named by a substring of its demangled name that
    matches exactly one kernel (e.g. "sigmoid_focal_kernel<cbkernels::cuda::device::F32, 4, ...>(")."""
    demangled: str


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch of the forward + backward of a loss at (N, C).

    kernel: the label printed in the report (e.g. "sigmoid_focal_kernel[loss+grad]").
    code: TritonKernel or CudaKernel (what to compile).
    ctas: CTAs (programs) in the grid; threads_per_cta: threads of one CTA.
    threads_per_row: threads that share one row; a thread handles ceil(C / threads_per_row) elements of a row.
    elems_per_iter: elements per thread in one iteration of the source-level main loop (for a kernel that
      holds the row in registers and has no loop: the elements per thread per row).
    read_bytes_per_elem / write_bytes_per_elem: N x C bytes this launch moves per element (logits read,
      gradient written or read back), in the audited scenario (docs/roofline.md); per-row vectors are
      negligible and not counted.
    reread_bytes_per_elem: of read_bytes_per_elem, the bytes per element that the launch reads a second time
      from rows it read earlier (a softmax whose second pass re-reads the row to write the gradient). The
      model serves them from L2 when the rows in flight (the resident CTAs x their rows) times C x these
      bytes fit in roofline.L2_FIT_FRACTION of L2, else from DRAM (docs/roofline.md, "Re-reads").
    rows_per_thread: rows a thread walks one after the other. Optional: the audit derives it from the grid
      (ceil(row groups / ctas), a row group being the threads_per_cta / threads_per_row rows a CTA handles at
      once) and refuses a stated value that differs.
    per_element_work: False for a launch whose programs, in the audited scenario, read a per-row value and
      exit (the fused backward's scaling pass when the upstream gradient is 1): only its launch and latency
      count, not the per-element instructions of the path it skips.
    rare_functions: names of source functions (Triton @jit helpers, C++ device functions) whose code, where
      it sits in a tile loop behind a uniform branch, runs in at most one tile per row: typically the path
      of the tile that holds the target column. The audit finds their instructions through the cubin's line
      table (inlined calls included), takes the basic blocks made mostly of them out of the per-tile count
      and counts them once per row (docs/roofline.md, "Counting instructions"). Declare a function only if
      every call of it inside a tile loop is behind such a branch; a name no instruction comes from is an
      error. The default, none, counts every block of a tile loop once per tile.
    rereads: how many later passes re-read the rows (reread_bytes_per_elem counts each): the bytes of a row held
      between its reads, which must fit in L2 for the re-reads to hit, are reread_bytes_per_elem / rereads a
      column (the softmax focal loss's two later passes over a streamed row hold one row, not two).
    tile_loop_bytes: the bytes per element that each tile loop loads in full-width vectors, in the order the
      loops appear in the machine code (their source order): the logits' element bytes, plus a dense target's
      read beside them, plus the class weights where a loop reads them by column in vectors (the dense row
      weight's sum, when the columns are known aligned). The compiler's unroll factor of a loop is read from
      its widest loads, which cover all of these (metrics.py). None: the logits' element bytes for every
      loop. The audit refuses a tuple whose length is not the number of tile loops.
    batch_rows: the rows this launch covers when it covers a batch of the N rows (the Triton softmax's split
      launches, which run batch by batch so that a batch stays in L2 between two launches); None: all N.
      Its elements, bytes and rows a thread walks are then those of the batch.
    follows_launch: the launch starts when the previous launch of the same op call has finished (stream
      order) and reads what it wrote or what it left in L2: the model charges the boundary between the two
      (roofline.LAUNCH_GAP_US and the new launch's first round trip; docs/roofline.md, "Launch boundaries").
      False for an op's first launch.
    """
    kernel: str
    code: Any
    ctas: int
    threads_per_cta: int
    threads_per_row: int
    elems_per_iter: int
    read_bytes_per_elem: float
    write_bytes_per_elem: float
    reread_bytes_per_elem: float = 0.0
    rows_per_thread: int | None = None
    per_element_work: bool = True
    rare_functions: tuple[str, ...] = ()
    tile_loop_bytes: tuple[float, ...] | None = None
    rereads: int = 1
    batch_rows: int | None = None
    follows_launch: bool = False
