"""Triton kernels of the op contract (docs/op-contract.md): CB sigmoid/focal and CB softmax CE.

Each program owns ROWS rows and walks their columns in tiles of BLOCK, so any C from 1 up works with a
fixed register budget. One launch gives the per-row loss and/or the gradient:
    forward, with_grad=True    WRITE_LOSS, WRITE_GRAD               grad = alpha_y * d loss_i / dz
    forward, with_grad=False   WRITE_LOSS                           no gradient written
    backward ("recompute")     WRITE_GRAD, SCALE_GRAD               grad = grad_loss[i] * alpha_y * d loss_i / dz
Math in fp32 whatever the logits' dtype; the gradient is rounded once, when stored. Row offsets are
int64 (row * stride overflows int32 once N * C > 2^31); column offsets stay int32 (C < 2^31).

Target handling, per row: target == ignore_index -> loss 0 and gradient 0, whatever the logits hold
(tl.where, never a multiply by 0, so NaN/inf logits of ignored rows do not leak). A target outside
[0, C) that is not ignore_index is never used as an address: alpha_y becomes NaN, so that row's loss
and gradient are NaN (functional.py also asserts on the device).

Bytes (the speed target): the sigmoid family reads each logit once and writes each gradient once;
softmax reads the row once when it fits one tile (SINGLE_BLOCK: the tile stays in registers between
the log-sum-exp and the gradient) and twice otherwise (the second read mostly hits L2).
"""
import triton
import triton.language as tl

# GAMMA_MODE constexpr values: the modulator (1 - p)^gamma specialised at compile time.
GAMMA_ZERO, GAMMA_HALF, GAMMA_ONE, GAMMA_TWO, GAMMA_GENERAL = 0, 1, 2, 3, 4


@triton.jit
def _log1p_unit(e):
    """log1p(e) for e in [0, 1], with arithmetic only.

    log1p(e) = 2 atanh(s) with s = e / (2 + e) in [0, 1/3], and 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...).
    Stopping after s^14/15 leaves a relative remainder below s^16 / 17 / (1 - s^2) <= 1.5e-9, far under
    fp32's 6e-8. Unlike log(1 + e) it keeps full relative accuracy for tiny e (1 + e would round to 1),
    and it does not depend on how the GPU backend approximates log near 1. NaN in gives NaN out.
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
    """(term, d term / dz) of one binary task, paper-notes.md section 5, stable for any |z|.

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
    if GAMMA_MODE == 0:
        term = neg_log_p
        dterm_du = -q
    else:
        p = tl.where(u_pos, r, er)
        if GAMMA_MODE == 1:
            mod = tl.sqrt(q)
        elif GAMMA_MODE == 2:
            mod = q
        elif GAMMA_MODE == 3:
            mod = q * q
        else:
            mod = tl.exp(-gamma * (tl.maximum(u, 0.0) + l1pe))
        term = mod * neg_log_p
        dterm_du = -mod * (gamma * p * neg_log_p + q)
    return term, tl.where(is_y, dterm_du, -dterm_du)


@triton.jit
def sigmoid_focal_kernel(
    logits_ptr, target_ptr, weight_ptr, grad_loss_ptr, loss_ptr, grad_ptr,
    N, C, stride_n, gamma, ignore_index,
    HAS_WEIGHT: tl.constexpr, GAMMA_MODE: tl.constexpr,
    WRITE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr, SCALE_GRAD: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """loss_i = alpha_y sum_c term_c; grad_ic = (grad_loss_i) alpha_y t_c dterm/du. Logits read once."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < N
    rows = tl.minimum(rows, N - 1)  # padding rows recompute row N-1 (stores are masked): loads need no row mask
    y, valid, alpha = _row_setup(target_ptr, weight_ptr, rows, C, ignore_index, HAS_WEIGHT, ROWS)
    coef = alpha
    if SCALE_GRAD:
        coef = alpha * tl.load(grad_loss_ptr + rows)
    in_row = logits_ptr + rows[:, None] * stride_n
    if WRITE_GRAD:  # (unused pointers are None: only touch them under their flag)
        out_row = grad_ptr + rows[:, None] * C
    cols0 = tl.arange(0, BLOCK)
    acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for start in range(0, C, BLOCK):
        cols = start + cols0
        mask = cols[None, :] < C
        z = tl.load(in_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        term, dz = _focal_elementwise(z, cols[None, :] == y[:, None], gamma, GAMMA_MODE)
        if WRITE_LOSS:
            acc += tl.where(mask, term, 0.0)
        if WRITE_GRAD:
            g = tl.where(valid[:, None], coef[:, None] * dz, 0.0)
            tl.store(out_row + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=row_mask[:, None] & mask)
    if WRITE_LOSS:
        loss = tl.where(valid, alpha * tl.sum(acc, axis=1), 0.0)
        tl.store(loss_ptr + rows, loss, mask=row_mask)


@triton.jit
def softmax_ce_kernel(
    logits_ptr, target_ptr, weight_ptr, grad_loss_ptr, loss_ptr, grad_ptr,
    N, C, stride_n, eps, ignore_index,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    WRITE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr, SCALE_GRAD: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    """loss_i = alpha_y (lse - (1-eps) z_y - eps/C sum_c z_c);
    grad_ic = (grad_loss_i) alpha_y (softmax_c - (1-eps) [c == y] - eps/C), formed in fp32.

    Log-sum-exp online over column tiles: m = running max, s = sum exp(z - m), rescaled by exp(m - m_new)
    when the max grows. m starts at -inf; every real row's first tile holds at least one real logit, so
    m is finite after it and exp(-inf - m) = 0 (no -inf - -inf). Masked lanes load -inf: exp gives 0.
    NaN: if a max-reduction drops a NaN, exp(NaN - m) still makes s (hence lse, loss, grad) NaN.
    """
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < N
    rows = tl.minimum(rows, N - 1)  # padding rows recompute row N-1 (stores are masked): loads need no row mask
    y, valid, alpha = _row_setup(target_ptr, weight_ptr, rows, C, ignore_index, HAS_WEIGHT, ROWS)
    in_row = logits_ptr + rows[:, None] * stride_n
    cols0 = tl.arange(0, BLOCK)
    sum_z = tl.zeros([ROWS], dtype=tl.float32)
    if SINGLE_BLOCK:  # BLOCK >= C: the row stays in registers between the lse and the gradient
        mask = cols0[None, :] < C
        z_tile = tl.load(in_row + cols0[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.max(z_tile, axis=1)
        ez = tl.exp(z_tile - m[:, None])
        s = tl.sum(ez, axis=1)
        if HAS_SMOOTHING:
            sum_z = tl.sum(tl.where(mask, z_tile, 0.0), axis=1)
    else:
        m = tl.full([ROWS], float("-inf"), tl.float32)
        s = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, C, BLOCK):
            cols = start + cols0
            mask = cols[None, :] < C
            z = tl.load(in_row + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m = m_new
            if HAS_SMOOTHING:
                sum_z += tl.sum(tl.where(mask, z, 0.0), axis=1)
    lse = m + tl.log(s)

    if WRITE_LOSS:
        z_y = tl.load(logits_ptr + rows * stride_n + y, mask=valid, other=0.0).to(tl.float32)
        # lse - (1-eps) z_y - eps mean(z), grouped so that each bracket is exactly 0 when C == 1
        row_loss = lse - z_y
        if HAS_SMOOTHING:
            row_loss += eps * (z_y - sum_z / C)
        tl.store(loss_ptr + rows, tl.where(valid, alpha * row_loss, 0.0), mask=row_mask)

    if WRITE_GRAD:
        out_row = grad_ptr + rows[:, None] * C
        coef = alpha
        if SCALE_GRAD:
            coef = alpha * tl.load(grad_loss_ptr + rows)
        if HAS_SMOOTHING:
            on_target = 1.0 - eps
            off_target = eps / C
        else:
            on_target = 1.0
            off_target = 0.0
        if SINGLE_BLOCK:
            prob = ez * (1.0 / s)[:, None]
            g = prob - tl.where(cols0[None, :] == y[:, None], on_target, 0.0) - off_target
            g = tl.where(valid[:, None], coef[:, None] * g, 0.0)
            tl.store(out_row + cols0[None, :], g.to(grad_ptr.dtype.element_ty), mask=row_mask[:, None] & mask)
        else:
            for start in range(0, C, BLOCK):
                cols = start + cols0
                mask = cols[None, :] < C
                z = tl.load(in_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                prob = tl.exp(z - lse[:, None])
                g = prob - tl.where(cols[None, :] == y[:, None], on_target, 0.0) - off_target
                g = tl.where(valid[:, None], coef[:, None] * g, 0.0)
                tl.store(out_row + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=row_mask[:, None] & mask)
