"""The fused backward's scaling pass on CUDA tensors: grad[i, :] *= grad_loss[i], skipping rows whose
upstream gradient is exactly 1.

loss.backward() of a "sum", or of functional.py's "mean" (1/count folded into the class weights,
docs/math.md, section 4), hands every row an upstream gradient of 1: then the forward already wrote
the final gradient. Deciding that on the host would need a device sync; here it is decided on the device
(no sync, CUDA-graph safe), and cheaply: each program owns a chunk of CHUNK consecutive rows, reads their
CHUNK upstream values with one vector load and returns when all are 1, so forward + backward moves one
read of the logits and one write of the gradient plus N floats, in cdiv(N, CHUNK) programs (512 at
N = 8192: about four per SM, enough to spread the general case, rows that do need scaling, over the GPU). Otherwise it walks its rows and scales each row that is not at 1 (NaN != 1 as well: a NaN
upstream gradient still reaches its row), split as the loss kernels split rows (rows.py: an aligned
body in 16-byte vectors, head and tail apart). The product is formed in fp32 and rounded once to grad's
dtype, as torch.mul(grad, grad_loss[:, None]) does.
"""
import torch
import triton
import triton.language as tl

from .rows import edge_columns, row_split

CHUNK = 16  # rows per program
TILE = 2048  # columns per step of a row


@triton.jit
def scale_rows_unless_one_kernel(grad_ptr, grad_loss_ptr, N, C, CHUNK: tl.constexpr, TILE: tl.constexpr,
                                 VEC: tl.constexpr):
    first = tl.program_id(0) * CHUNK
    chunk_rows = first + tl.arange(0, CHUNK)
    upstream = tl.load(grad_loss_ptr + chunk_rows, mask=chunk_rows < N, other=1.0)
    if tl.sum((upstream != 1.0).to(tl.int32), axis=0) != 0:
        cols = tl.arange(0, TILE)[None, :]
        for r in tl.range(first, tl.minimum(first + CHUNK, N)):
            g = tl.load(grad_loss_ptr + r)
            if g != 1.0:
                rows = (r + tl.arange(0, 1)).to(tl.int64)
                a, a_up, head, body = row_split(rows, C, VEC)
                body_ptr = grad_ptr + a_up[:, None]
                for start in tl.range(0, tl.sum(body, axis=0), TILE):
                    offs = start + cols
                    mask = offs < body[:, None]
                    x = tl.load(body_ptr + offs, mask=mask).to(tl.float32) * g
                    tl.store(body_ptr + offs, x.to(grad_ptr.dtype.element_ty), mask=mask)
                e_cols, e_mask = edge_columns(head, body, tl.full([1], -1, tl.int32), C, VEC)  # no target vector
                e_ptr = grad_ptr + a[None, :] + e_cols
                x = tl.load(e_ptr, mask=e_mask).to(tl.float32) * g
                tl.store(e_ptr, x.to(grad_ptr.dtype.element_ty), mask=e_mask)


def scale_rows_unless_one_(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """In place on a contiguous (N, C) grad; grad_loss (N,) float32 contiguous on the same device."""
    n, c = grad.shape
    if n and c:
        scale_rows_unless_one_kernel[((n + CHUNK - 1) // CHUNK,)](grad, grad_loss, n, c, CHUNK=CHUNK, TILE=TILE,
                                                                   VEC=16 // grad.element_size(), num_warps=8)
    return grad
