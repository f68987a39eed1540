"""The fused backward's scaling pass on CUDA tensors: grad[i, :] *= grad_loss[i], skipping rows whose
upstream gradient is exactly 1.

loss.backward() of a "sum", or of functional.py's "mean" (1/count folded into the class weights,
docs/math.md, section 4), hands every row an upstream gradient of 1: then the forward already wrote
the final gradient, and this launch reads N floats and touches no element of the (N, C) buffer, so
forward + backward moves one read of the logits and one write of the gradient. Deciding that on the
host would need a device sync; here each program reads its row's grad_loss and returns early instead
(no sync, CUDA-graph safe).

Grid: (rows, column tiles of TILE), rows on axis 0 (up to 2^31 - 1 programs there; axis 1 allows
65535 tiles, C up to 2^28 at TILE = 4096). Offsets are int64. The product is formed in fp32 and
rounded once to grad's dtype, as torch.mul(grad, grad_loss[:, None]) does.
"""
import torch
import triton
import triton.language as tl

TILE = 4096


@triton.jit
def scale_rows_unless_one_kernel(grad_ptr, grad_loss_ptr, C, TILE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(grad_loss_ptr + row)
    if g != 1.0:  # NaN != 1 as well: a NaN upstream gradient still reaches the row
        cols = tl.program_id(1).to(tl.int64) * TILE + tl.arange(0, TILE)
        mask = cols < C
        ptrs = grad_ptr + row * C + cols
        scaled = tl.load(ptrs, mask=mask).to(tl.float32) * g
        tl.store(ptrs, scaled.to(grad_ptr.dtype.element_ty), mask=mask)


def scale_rows_unless_one_(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """In place on a contiguous (N, C) grad; grad_loss (N,) float32 contiguous on the same device."""
    n, c = grad.shape
    if n and c:
        scale_rows_unless_one_kernel[(n, triton.cdiv(c, TILE))](grad, grad_loss, c, TILE=TILE, num_warps=8)
    return grad
