"""Triton kernels of the op contract (docs/op-contract.md): CB sigmoid/focal and CB softmax CE.

Each program owns ROWS rows and walks their columns in tiles of BLOCK, so any C from 1 up works with a
fixed register budget. The logits and the gradient are contiguous (N, C), so row i is the flat range
[a, b) = [i C, i C + C), and a row of C = 8142 classes starts on a 16-byte boundary only every few
rows. Triton emits 16-byte vector loads/stores only for tiles it can prove aligned and whose mask is
constant over each vector, so every row is split (VEC = 16 bytes of elements):
    head [a, a_up)  |  body [a_up, b_dn): full aligned vectors, BLOCK-wide tiles  |  tail [b_dn, b)
a_up = a rounded up and b_dn = b rounded down to a multiple of VEC (head or tail may be empty; a row
shorter than a vector has head only). The body's index base and mask bound are multiples of VEC, so
its loads and stores vectorise; the head and tail (< VEC elements each) form one 2*VEC-lane edge
tile with exact element masks. No access ever leaves the row.

One launch gives the per-row loss and/or the gradient:
    forward, with_grad=True    WRITE_LOSS, WRITE_GRAD               grad = alpha_y * d loss_i / dz
    forward, with_grad=False   WRITE_LOSS                           no gradient written
    backward ("recompute")     WRITE_GRAD, SCALE_GRAD               grad = grad_loss[i] * alpha_y * d loss_i / dz
Math in fp32 whatever the logits' dtype; the gradient is rounded once, when stored. Offsets are int64
(the row index is int64 before it is multiplied by C: i * C overflows int32 once N * C > 2^31).

Target handling, per row: target == ignore_index -> loss 0 and gradient 0, whatever the logits hold
(tl.where, never a multiply by 0, so NaN/inf logits of ignored rows do not leak). A target outside
[0, C) that is not ignore_index is never used as an address: alpha_y becomes NaN, so that row's loss
and gradient are NaN (functional.py also asserts on the device).

Bytes (the speed target): the sigmoid family reads each logit once and writes each gradient once;
softmax reads the row once when it fits one tile (SINGLE_BLOCK: the tile stays in registers between
the log-sum-exp and the gradient) and twice otherwise (the second read comes from L2 only while the
rows in flight fit in it: at C = 262144 they do not, so large-C softmax moves 1.5x the useful bytes).
"""
import dataclasses
from typing import Callable

import triton
import triton.language as tl

from ..gamma_cases import GammaCase, gamma_case

# GAMMA_MODE constexpr values: the modulator (1 - p)^gamma specialised at compile time, one per GammaCase
# (cbkernels/gamma_cases.py, the mirror of the C++ kernels' enum). Module-level tl.constexpr, so the jitted
# code may read them.
GAMMA_ZERO = tl.constexpr(int(GammaCase.ZERO))
GAMMA_HALF = tl.constexpr(int(GammaCase.HALF))
GAMMA_ONE = tl.constexpr(int(GammaCase.ONE))
GAMMA_TWO = tl.constexpr(int(GammaCase.TWO))


@triton.jit
def _log1p_unit(e):
    """log1p(e) for e in [0, 1], with arithmetic only.

    log1p(e) = 2 atanh(s) with s = e / (2 + e) in [0, 1/3], and 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...).
    Stopping after s^14/15 leaves a relative remainder below s^16 / 17 / (1 - s^2) <= 1.54e-9, far under
    fp32's 6e-8 (derivation: docs/math.md, section 8). Unlike log(1 + e) it keeps full relative accuracy
    for tiny e (1 + e would round to 1), and it does not depend on how the GPU backend approximates log
    near 1. NaN in gives NaN out.
    """
    s = e / (2.0 + e)
    s2 = s * s
    p = s2 * (1.0 / 15.0) + (1.0 / 13.0)
    p = p * s2 + (1.0 / 11.0)
    p = p * s2 + (1.0 / 9.0)
    p = p * s2 + (1.0 / 7.0)
    p = p * s2 + (1.0 / 5.0)
    p = p * s2 + (1.0 / 3.0)
    p = p * s2 + 1.0
    return 2.0 * s * p


@triton.jit
def _log1p_pos(x):
    """log1p(x) for x >= 0: the arithmetic series on [0, 1], log(1 + x) above (no cancellation there)."""
    return tl.where(x <= 1.0, _log1p_unit(tl.minimum(x, 1.0)), tl.log(1.0 + x))


@triton.jit
def _row_setup(target_ptr, weight_ptr, rows, C, ignore_index, HAS_WEIGHT: tl.constexpr,
               ROWS: tl.constexpr):
    """Per row: the class index to use as an address (always in [0, C)), validity, and alpha_y.

    alpha_y is NaN for an out-of-range target that is not ignore_index (see the module docstring).
    """
    y = tl.load(target_ptr + rows).to(tl.int64)
    valid = y != ignore_index
    in_range = (y >= 0) & (y < C)
    y_safe = tl.where(in_range, y, 0)
    if HAS_WEIGHT:
        alpha = tl.load(weight_ptr + y_safe)
    else:
        alpha = tl.full([ROWS], 1.0, tl.float32)
    alpha = tl.where(valid & ~in_range, float("nan"), alpha)
    return y_safe, valid, alpha


@triton.jit
def _focal_elementwise(z, is_y, gamma, GAMMA_MODE: tl.constexpr):
    """(term, d term / dz) of one binary task, docs/math.md section 5, stable for any |z|.

    u = t z (t = +1 on the true class, -1 elsewhere), e = exp(-|u|) in (0, 1], l1pe = log1p(e):
      -log p = softplus(-u) = max(-u, 0) + l1pe,   softplus(u) = max(u, 0) + l1pe
      p, q = 1 - p from e without cancellation: u >= 0: p = 1/(1+e), q = e/(1+e); u < 0: swapped
      mod = (1 - p)^gamma = exp(-gamma softplus(u))  [q^gamma, so gamma 0.5, 1, 2 use sqrt(q), q, q*q]
      term = mod * softplus(-u)
      d term/du = mod * (gamma p log p - q)   (d mod/du = -gamma p mod, d softplus(-u)/du = -q)
    NaN in z makes e, l1pe, p and q NaN, so the NaN survives tl.maximum dropping it.
    """
    u = tl.where(is_y, z, -z)
    e = tl.exp(-tl.abs(u))
    l1pe = _log1p_unit(e)
    neg_log_p = tl.maximum(-u, 0.0) + l1pe
    r = 1.0 / (1.0 + e)
    er = e * r
    u_pos = u >= 0.0
    q = tl.where(u_pos, er, r)
    if GAMMA_MODE == GAMMA_ZERO:
        term = neg_log_p
        dterm_du = -q
    else:
        p = tl.where(u_pos, r, er)
        if GAMMA_MODE == GAMMA_HALF:
            mod = tl.sqrt(q)
        elif GAMMA_MODE == GAMMA_ONE:
            mod = q
        elif GAMMA_MODE == GAMMA_TWO:
            mod = q * q
        else:
            mod = tl.exp(-gamma * (tl.maximum(u, 0.0) + l1pe))
        term = mod * neg_log_p
        dterm_du = -mod * (gamma * p * neg_log_p + q)
    return term, tl.where(is_y, dterm_du, -dterm_du)



@triton.jit
def _row_ranges(rows, C, VEC: tl.constexpr):
    """Flat [a, b) of each row and the aligned body bounds a_up <= b_dn (multiples of VEC, by construction)."""
    a = rows * C
    b = a + C
    a_up = (a + (VEC - 1)) // VEC * VEC
    b_dn = b // VEC * VEC
    return a, b, a_up, b_dn


@triton.jit
def _edge_tile(a, b, a_up, b_dn, VEC: tl.constexpr):
    """Flat indices and mask of the head (lanes < VEC) and tail (lanes >= VEC) of each row."""
    lane = tl.arange(0, 2 * VEC)[None, :]
    is_head = lane < VEC
    idx = tl.where(is_head, a[:, None] + lane, b_dn[:, None] + (lane - VEC))
    mask = tl.where(is_head, (idx < a_up[:, None]) & (idx < b[:, None]),
                    (idx >= a_up[:, None]) & (idx < b[:, None]))
    return idx, mask


@triton.jit
def _focal_tile(logits_ptr, grad_ptr, idx, mask, store_mask, a, y, valid, coef, gamma,
                GAMMA_MODE: tl.constexpr, WRITE_GRAD: tl.constexpr):
    """Loads one tile, writes its gradient (WRITE_GRAD) and returns its per-element terms (0 off-mask)."""
    z = tl.load(logits_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    term, dz = _focal_elementwise(z, (idx - a[:, None]) == y[:, None], gamma, GAMMA_MODE)
    if WRITE_GRAD:
        g = tl.where(valid[:, None], coef[:, None] * dz, 0.0)
        tl.store(grad_ptr + idx, g.to(grad_ptr.dtype.element_ty), mask=store_mask)
    return tl.where(mask, term, 0.0)


@triton.jit
def _program_rows(target_ptr, weight_ptr, N, C, ignore_index, HAS_WEIGHT: tl.constexpr, ROWS: tl.constexpr,
                  VEC: tl.constexpr):
    """This program's ROWS rows: (rows, row_mask, y, valid, alpha, a, b, a_up, b_dn).

    Padding rows past N recompute row N - 1 (their stores are masked by row_mask), so no load needs a
    row mask; _row_setup and _row_ranges give the per-row target data and column ranges."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < N
    rows = tl.minimum(rows, N - 1)
    y, valid, alpha = _row_setup(target_ptr, weight_ptr, rows, C, ignore_index, HAS_WEIGHT, ROWS)
    a, b, a_up, b_dn = _row_ranges(rows, C, VEC)
    return rows, row_mask, y, valid, alpha, a, b, a_up, b_dn


@triton.jit
def sigmoid_focal_kernel(
    logits_ptr, target_ptr, weight_ptr, grad_loss_ptr, loss_ptr, grad_ptr,
    N, C, gamma, ignore_index,
    HAS_WEIGHT: tl.constexpr, GAMMA_MODE: tl.constexpr,
    WRITE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr, SCALE_GRAD: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr,
):
    """loss_i = alpha_y sum_c term_c; grad_ic = (grad_loss_i) alpha_y t_c dterm/du. Logits read once."""
    rows, row_mask, y, valid, alpha, a, b, a_up, b_dn = _program_rows(target_ptr, weight_ptr, N, C, ignore_index,
                                                                      HAS_WEIGHT, ROWS, VEC)
    coef = alpha
    if SCALE_GRAD:
        coef = alpha * tl.load(grad_loss_ptr + rows)
    cols0 = tl.arange(0, BLOCK)[None, :]
    acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for start in range(0, C, BLOCK):  # body: b_dn - a_up <= C
        idx = a_up[:, None] + start + cols0
        mask = idx < b_dn[:, None]
        acc += _focal_tile(logits_ptr, grad_ptr, idx, mask, mask & row_mask[:, None], a, y, valid, coef,
                           gamma, GAMMA_MODE, WRITE_GRAD)
    idx, mask = _edge_tile(a, b, a_up, b_dn, VEC)
    edge = _focal_tile(logits_ptr, grad_ptr, idx, mask, mask & row_mask[:, None], a, y, valid, coef,
                       gamma, GAMMA_MODE, WRITE_GRAD)
    if WRITE_LOSS:
        total = tl.sum(acc, axis=1) + tl.sum(edge, axis=1)
        tl.store(loss_ptr + rows, tl.where(valid, alpha * total, 0.0), mask=row_mask)


# Running max of the online log-sum-exp starts at the lowest finite float, not -inf: a tile with no
# element of a row (its masked lanes load -inf) then leaves (m, s) as they are, with no -inf - -inf.
_LOWEST = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def _lse_update(m, s, s_ny, z, is_y):
    """(m, s, s_ny) extended by tile z (masked lanes -inf): s = sum exp(z - m) over the row so far,
    s_ny the same sum without the target class (see _softmax_grad_store for why it is kept apart)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    rescale = tl.exp(m - m_new)
    ez = tl.exp(z - m_new[:, None])
    s = s * rescale + tl.sum(ez, axis=1)
    s_ny = s_ny * rescale + tl.sum(tl.where(is_y, 0.0, ez), axis=1)
    return m_new, s, s_ny


@triton.jit
def _softmax_grad_store(grad_ptr, z, idx, store_mask, a, y, valid, coef, lse, g_y, off_target):
    """Stores coef * (softmax - off_target) off the target and coef * g_y on it (masked lanes store nothing).

    On the target, p_y - 1 = -(sum over c != y of exp(z_c - m)) / s = -s_ny / s: formed from the sum
    without the target, it keeps its relative precision when p_y is within fp32's epsilon of 1 (a
    confident prediction), where exp(z_y - lse) - 1 would round to 0 and lose the true-class gradient
    (docs/math.md, section 7).
    """
    is_y = (idx - a[:, None]) == y[:, None]
    g = tl.where(is_y, g_y[:, None], tl.exp(z - lse[:, None]) - off_target)
    g = tl.where(valid[:, None], coef[:, None] * g, 0.0)
    tl.store(grad_ptr + idx, g.to(grad_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def softmax_ce_kernel(
    logits_ptr, target_ptr, weight_ptr, grad_loss_ptr, loss_ptr, grad_ptr,
    N, C, eps, ignore_index,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    WRITE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr, SCALE_GRAD: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    """loss_i = alpha_y (lse - (1-eps) z_y - eps/C sum_c z_c);
    grad_ic = (grad_loss_i) alpha_y (softmax_c - (1-eps) [c == y] - eps/C), formed in fp32.

    Math: docs/math.md, sections 6 and 7. Log-sum-exp online over the tiles (body tiles, then the edge
    tile): m = running max, s = sum exp(z - m), rescaled by exp(m - m_new) when the max grows.
    SINGLE_BLOCK (BLOCK >= C): the body is one tile and it stays in registers with the edge tile, so the
    logits are read once.
    NaN: if a max-reduction drops a NaN, exp(NaN - m) still makes s (hence lse, loss, grad) NaN.
    """
    rows, row_mask, y, valid, alpha, a, b, a_up, b_dn = _program_rows(target_ptr, weight_ptr, N, C, ignore_index,
                                                                      HAS_WEIGHT, ROWS, VEC)
    cols0 = tl.arange(0, BLOCK)[None, :]
    e_idx, e_mask = _edge_tile(a, b, a_up, b_dn, VEC)
    z_e = tl.load(logits_ptr + e_idx, mask=e_mask, other=float("-inf")).to(tl.float32)
    m = tl.full([ROWS], _LOWEST, tl.float32)
    s = tl.zeros([ROWS], dtype=tl.float32)
    m, s, s_ny = _lse_update(m, s, s, z_e, (e_idx - a[:, None]) == y[:, None])
    sum_z = tl.zeros([ROWS], dtype=tl.float32)
    if HAS_SMOOTHING:
        sum_z = tl.sum(tl.where(e_mask, z_e, 0.0), axis=1)
    if SINGLE_BLOCK:  # the body is one tile: keep it (and the edge) in registers for the gradient
        b_idx = a_up[:, None] + cols0
        b_mask = b_idx < b_dn[:, None]
        z_b = tl.load(logits_ptr + b_idx, mask=b_mask, other=float("-inf")).to(tl.float32)
        m, s, s_ny = _lse_update(m, s, s_ny, z_b, (b_idx - a[:, None]) == y[:, None])
        if HAS_SMOOTHING:
            sum_z += tl.sum(tl.where(b_mask, z_b, 0.0), axis=1)
    else:
        for start in range(0, C, BLOCK):
            b_idx = a_up[:, None] + start + cols0
            b_mask = b_idx < b_dn[:, None]
            z = tl.load(logits_ptr + b_idx, mask=b_mask, other=float("-inf")).to(tl.float32)
            m, s, s_ny = _lse_update(m, s, s_ny, z, (b_idx - a[:, None]) == y[:, None])
            if HAS_SMOOTHING:
                sum_z += tl.sum(tl.where(b_mask, z, 0.0), axis=1)
    lse = m + tl.log(s)

    if WRITE_LOSS:
        z_y = tl.load(logits_ptr + a + y, mask=valid, other=0.0).to(tl.float32)
        # lse - z_y = (m - z_y) + log s. When the target holds the max (z_y == m), s = 1 + s_ny and
        # log1p(s_ny) keeps the loss's relative precision for a confident prediction (log s would round
        # to 0 once s_ny < 2^-24). Then lse - (1-eps) z_y - eps mean(z), grouped so that each bracket
        # is exactly 0 when C == 1.
        row_loss = (m - z_y) + tl.where(z_y == m, _log1p_pos(s_ny), tl.log(s))
        if HAS_SMOOTHING:
            row_loss += eps * (z_y - sum_z / C)
        tl.store(loss_ptr + rows, tl.where(valid, alpha * row_loss, 0.0), mask=row_mask)

    if WRITE_GRAD:
        coef = alpha
        if SCALE_GRAD:
            coef = alpha * tl.load(grad_loss_ptr + rows)
        # on the target: p_y - (1 - eps) - eps/C = -s_ny/s + eps (1 - 1/C); elsewhere p_c - eps/C
        g_y = -s_ny / s
        if HAS_SMOOTHING:
            g_y += eps * (1.0 - 1.0 / C)
            off_target = eps / C
        else:
            off_target = 0.0
        if SINGLE_BLOCK:
            _softmax_grad_store(grad_ptr, z_b, b_idx, b_mask & row_mask[:, None], a, y, valid, coef, lse, g_y,
                                off_target)
        else:
            for start in range(0, C, BLOCK):
                b_idx = a_up[:, None] + start + cols0
                b_mask = b_idx < b_dn[:, None]
                z = tl.load(logits_ptr + b_idx, mask=b_mask, other=0.0).to(tl.float32)
                _softmax_grad_store(grad_ptr, z, b_idx, b_mask & row_mask[:, None], a, y, valid, coef, lse,
                                    g_y, off_target)
        _softmax_grad_store(grad_ptr, z_e, e_idx, e_mask & row_mask[:, None], a, y, valid, coef, lse, g_y,
                            off_target)


# ---- the family table: what cbkernels/triton/ops.py needs to define and launch each family's ops ----------


@dataclasses.dataclass(frozen=True)
class FamilyKernel:
    """One family's Triton kernel, as ops.py launches it.

    kernel: a @triton.jit function whose arguments are, in order,
        logits_ptr, target_ptr, weight_ptr, grad_loss_ptr, loss_ptr, grad_ptr,
        N, C, <the family's hyperparameters, in schema order>, ignore_index,
    then the constexprs HAS_WEIGHT, WRITE_LOSS, WRITE_GRAD, SCALE_GRAD, ROWS, BLOCK, VEC (by keyword, as the
    kernels above take them: see the module docstring) and the family's own.
    constexprs(hyperparameters, num_classes, block) -> the family's own constexprs, by name: hyperparameters
    are the op's values (a sequence, in schema order), num_classes is C (an int), block the tile width of
    the launch.
    """
    kernel: Callable
    constexprs: Callable[..., dict]


def _sigmoid_focal_constexprs(hyperparameters, num_classes, block):
    (gamma,) = hyperparameters
    return {"GAMMA_MODE": int(gamma_case(float(gamma)))}


def _softmax_ce_constexprs(hyperparameters, num_classes, block):
    (label_smoothing,) = hyperparameters
    return {"HAS_SMOOTHING": label_smoothing != 0.0, "SINGLE_BLOCK": block >= num_classes}


# By the registry's family name (losses.Family.name).
FAMILY_KERNELS = {
    "sigmoid_focal": FamilyKernel(sigmoid_focal_kernel, _sigmoid_focal_constexprs),
    "softmax_ce": FamilyKernel(softmax_ce_kernel, _softmax_ce_constexprs),
}
