"""The softmax focal loss kernel (gamma, label smoothing eps): per-row loss and/or gradient, with the
flags, paths (HELD or streamed) and row pieces of the softmax cross-entropy kernel (softmax_ce.py). Math:
docs/math.md, section 13 (and 6, 7); the op contract: docs/op-contract.md. With p = softmax(z),
q_c = 1 - p_c, l_c = -log p_c, mod_c = q_c^gamma and h_c = -mod_c (1 + gamma p_c l_c / q_c):

    loss_i = alpha_y sum_c q'_c mod_c l_c,               q' = (1 - eps) onehot(y) + eps / C
    grad_ij = (grad_loss_i) alpha_y ((eps / C) h_j - p_j G + (1 - eps) h_y [j == y]),
    G = (1 - eps) h_y + (eps / C) sum_c h_c.

Without smoothing (HAS_SMOOTHING false, the common case) the row is the cross entropy's single pass, the
same per-element work: loss alpha_y mod_y l_y and the cross entropy's gradient times one per-row factor
F = -h_y (13.2). Both come from the target's scalars of section 7's split: l_y = lse - z_y as the cross
entropy forms it, q_y = s_ny / s, p_y l_y / q_y = l_y exp(z_y - m) / s_ny; none subtracts from 1, so a
confident row keeps its loss and gradient to fp32's relative precision.

With smoothing every class's term counts (13.3): after the log-sum-exp, a second pass sums mod_c l_c and
h_c over the classes other than the target, and a third writes the gradient, which needs G first. A held
row makes both from its registers; a streamed row reads its tiles again for each (from L2 while the rows
in flight fit, as the cross entropy's gradient pass). The target stays out of the per-element work, as in
the cross entropy (the body tiles leave its vector out, its edge lane is selected away) and takes the
exact scalars above, its gradient formed as (1 - eps + eps/C) q_y h_y - (eps/C) p_y sum_{c != y} h_c (the
line above with G expanded: no 1 - p_y is formed). Its launch rows are the cross entropy's (configs.py),
chosen for the common case: with smoothing, a held row of 8192 columns (64 elements a thread) needs more
than the 255 registers a thread can have and spills a little (sm_90: 24 to 470 bytes by gamma case).

The logit adjustments (HAS_OFFSET, HAS_MARGIN) are the cross entropy's: the offset added to every tile as
it is loaded (each pass), offset and margin to z_y and the edge tile (softmax_ce.row_setup, rows.py).

The modulator is specialised by GAMMA_MODE (as the sigmoid family's): per element only with smoothing;
without, it is one value per row. gamma == 0 (mod = 1, h = -1) is the cross entropy, value and gradient.

Element weights and dense targets: as the cross entropy's (softmax_ce.py). The per-class path (PER_CLASS)
generalises the smoothing path from the coefficients eps/C (+ the target's 1 - eps) to u_c = alpha_i e_c q'_c:
loss alpha_i sum_c u_c mod_c l_c, gradient (grad_loss_i) (u_j h_j - p_j H), H = sum_c u_c h_c; a sums pass
then a gradient pass, after the log-sum-exp (a streamed row is read three times, its loss needing the sums
pass too). The class kept apart is the row's top class k (softmax_ce.py's per-class section), its scalars exact:
p_k = 1/s, 1 - p_k = s_rest/s, l_k = log1p(s_rest), h_k = -F_k (_target_factor with e = 1, s_ny = s_rest).

Rows split into column chunks (too few rows for the device): without label smoothing the loss and the
gradient need the row's log-sum-exp and the target's scalars only (target_terms), so the split is the cross
entropy's (softmax_split.py) with the factor F. With smoothing the sums over every class need the row's
(max, sum) first, a third launch: not split.
"""
import triton
import triton.language as tl

from .fastmath import LOG2E, rcp
from .rows import add_offset, body_mask, class_pointers, column_values, row_frame
from .sigmoid_focal import GAMMA_HALF, GAMMA_ONE, GAMMA_TWO, GAMMA_ZERO
from .softmax_ce import (class_coefficients, grad_coef, grad_terms, held_lse, held_tiles, held_top, log1p_pos,
                         per_class, row_setup, store_grad, store_zeros, streamed_grad, streamed_lse, streamed_top,
                         target_nll, top_class)

# Below this q, l / q = -log(1 - q) / q is taken as its series 1 + q/2 (the next term, q^2/3 < 2^-25, is below
# fp32's rounding): there q = 1 - p and l = log s - (z - m), both near 0 and formed by subtraction, have lost
# relative precision, and so would their quotient, while 1 + q/2 needs q to a few bits only.
_Q_SERIES = tl.constexpr(2.0**-12)


@triton.jit
def _modulator(q, gamma, GAMMA_MODE: tl.constexpr):
    """q^gamma for q in [0, 1]: 1, sqrt(q), q, q q, or exp2(gamma log2 q) (0 at q = 0)."""
    if GAMMA_MODE == GAMMA_ZERO:
        return tl.zeros_like(q) + 1.0
    elif GAMMA_MODE == GAMMA_HALF:
        return tl.sqrt(q)
    elif GAMMA_MODE == GAMMA_ONE:
        return q
    elif GAMMA_MODE == GAMMA_TWO:
        return q * q
    else:
        return tl.exp2(gamma * tl.log2(q))


@triton.jit
def _target_factor(mod_y, l_y, e_y, s_ny, gamma, GAMMA_MODE: tl.constexpr):
    """F = -h_y = mod_y (1 + gamma p_y l_y / q_y) per row (docs/math.md, 13.2), with
    p_y l_y / q_y = log1p(x) / x = l_y e_y / s_ny, x = s_ny / e_y, e_y = exp(z_y - m): 1 at x = 0 (C == 1,
    or s_ny underflowed: a confident row); 0 where e_y underflowed (x = inf) but l_y is finite. A target
    masked with -inf (l_y = inf, e_y = 0) gives NaN, as the reference's gradient there (its loss is inf).
    NaN stays NaN."""
    if GAMMA_MODE == GAMMA_ZERO:
        return mod_y
    else:
        return mod_y * (1.0 + gamma * tl.where(s_ny == 0.0, 1.0, l_y * e_y / s_ny))


@triton.jit
def target_terms(m, s_ny, z_y, gamma, GAMMA_MODE: tl.constexpr):
    """The target's scalars of a row from its log-sum-exp (m, s_ny; z_y the adjusted target logit):
    (e_y, s, inv_s, q_y, l_y, mod_y, f), e_y = exp(z_y - m), s = s_ny + e_y, q_y = s_ny / s = 1 - p_y (no
    subtraction), l_y = -log p_y (target_nll), mod_y = q_y^gamma, f = F (_target_factor)."""
    e_y = tl.exp2((z_y - m) * LOG2E)
    s = s_ny + e_y
    inv_s = 1.0 / s
    q_y = s_ny * inv_s
    l_y = target_nll(m, s, s_ny, z_y)
    mod_y = _modulator(q_y, gamma, GAMMA_MODE)
    return e_y, s, inv_s, q_y, l_y, mod_y, _target_factor(mod_y, l_y, e_y, s_ny, gamma, GAMMA_MODE)


@triton.jit
def _class_terms(z, ex, m, log_s, inv_s, gamma, GAMMA_MODE: tl.constexpr):
    """(p, mod l, h) of classes other than the target (docs/math.md, 13.3), from z and ex = exp(z - m):
    p = ex / s, l = log s - (z - m) (= lse - z, without rounding lse), q = 1 - p. A padding lane
    (z = -inf) gives l = inf and a NaN h: the callers mask them out."""
    p = ex * inv_s
    l = log_s - (z - m)
    if GAMMA_MODE == GAMMA_ZERO:
        return p, l, tl.zeros_like(p) - 1.0
    else:
        q = 1.0 - p
        mod = _modulator(q, gamma, GAMMA_MODE)
        l_over_q = tl.where(q < _Q_SERIES, 1.0 + 0.5 * q, l * rcp(q))  # rcp: q >= 2^-12, a normal float
        return p, mod * l, -mod * (1.0 + gamma * p * l_over_q)


@triton.jit
def _streamed_sums(body_z, body_o, cols, body, body_1, y_vec, m, log_s, inv_s, gamma, GAMMA_MODE: tl.constexpr,
                   HAS_OFFSET: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr,
                   STAGES: tl.constexpr):
    """Pass 2 of a streamed row with smoothing: (sum mod l, sum h) over the body's classes, per lane then
    merged once per row."""
    mb = m * LOG2E
    acc_ml = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    acc_h = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for start in tl.range(0, body_1, BLOCK, num_stages=STAGES):
        offs = start + cols
        mask = body_mask(offs, body, y_vec, VEC)
        z = add_offset(tl.load(body_z + offs, mask=mask, other=0.0).to(tl.float32), body_o, offs, mask, HAS_OFFSET)
        _, ml, h = _class_terms(z, tl.exp2(z * LOG2E - mb[:, None]), m[:, None], log_s[:, None], inv_s[:, None],
                                gamma, GAMMA_MODE)
        acc_ml += tl.where(mask, ml, 0.0)
        acc_h += tl.where(mask, h, 0.0)
    return tl.sum(acc_ml, axis=1), tl.sum(acc_h, axis=1)


@triton.jit
def _streamed_smoothed_grad(grad_ptr, body_z, body_o, body_at, cols, body, body_1, y_vec, row_store, valid, m,
                            log_s, inv_s, gamma, k_h, k_p, GAMMA_MODE: tl.constexpr, HAS_OFFSET: tl.constexpr,
                            PER_ROW: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, STAGES: tl.constexpr):
    """Pass 3 of a streamed row with smoothing: the body's gradient k_h h - k_p p."""
    mb = m * LOG2E
    for start in tl.range(0, body_1, BLOCK, num_stages=STAGES):
        offs = start + cols
        mask = body_mask(offs, body, y_vec, VEC)
        z = add_offset(tl.load(body_z + offs, mask=mask, other=0.0).to(tl.float32), body_o, offs, mask, HAS_OFFSET)
        p, _, h = _class_terms(z, tl.exp2(z * LOG2E - mb[:, None]), m[:, None], log_s[:, None], inv_s[:, None],
                               gamma, GAMMA_MODE)
        store_grad(grad_ptr + body_at + offs, mask & row_store, k_h[:, None] * h - k_p[:, None] * p,
                   valid[:, None], PER_ROW)


@triton.jit
def _per_class_terms(zm, ex, u, mask, unique, log_s, inv_s, gamma, GAMMA_MODE: tl.constexpr):
    """A tile's parts of the per-class sums (softmax_ce.py's per-class path): (u mod l, u h) on lanes other than
    the top class (0 elsewhere), and u on the top class's lane. The top class takes its exact scalars (the
    caller's): the others have p <= 1/2, so _class_terms' q = 1 - p keeps its precision."""
    top = top_class(zm, unique)
    _, ml, h = _class_terms(zm, ex, 0.0, log_s, inv_s, gamma, GAMMA_MODE)
    rest = mask & ~top
    return tl.where(rest, u * ml, 0.0), tl.where(rest, u * h, 0.0), tl.where(top, u, 0.0)


@triton.jit
def _per_class_grad(zm, ex, u, unique, log_s, inv_s, gamma, f_top, q_top, sum_h, sum_h_rest, coef,
                    GAMMA_MODE: tl.constexpr):
    """The per-class gradient on a tile: coef (u h - p H), H = sum_c u_c h_c; at the top class k, with
    h_k = -F_k, coef (-u F_k (1 - p_k) - p_k sum_{c != k} u_c h_c) (H expanded: no 1 - p_k formed)."""
    p, _, h = _class_terms(zm, ex, 0.0, log_s, inv_s, gamma, GAMMA_MODE)
    return coef * tl.where(top_class(zm, unique), -(u * f_top) * q_top - inv_s * sum_h_rest, u * h - p * sum_h)


@triton.jit
def _streamed_per_class_sums(body_z, body_o, body_t, body_ew, cols, body, body_1, y_vec, m, unique, log_s, inv_s, gamma,
                             eps, C, GAMMA_MODE: tl.constexpr, HAS_OFFSET: tl.constexpr,
                             HAS_ELEMENT_WEIGHT: tl.constexpr, DENSE_TARGET: tl.constexpr,
                             HAS_SMOOTHING: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr,
                             STAGES: tl.constexpr):
    """Pass 2 of a streamed per-class row: _per_class_terms summed over the body, per lane then merged once."""
    acc_ml = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    acc_h = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    acc_top = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for start in tl.range(0, body_1, BLOCK, num_stages=STAGES):
        offs = start + cols
        mask = body_mask(offs, body, y_vec, VEC)
        z = add_offset(tl.load(body_z + offs, mask=mask, other=0.0).to(tl.float32), body_o, offs, mask, HAS_OFFSET)
        u, _ = class_coefficients(body_t, body_ew, offs, mask, False, eps, C, DENSE_TARGET, HAS_ELEMENT_WEIGHT,
                                  HAS_SMOOTHING)
        zm = z - m[:, None]
        ml, h, u_top = _per_class_terms(zm, tl.exp2(zm * LOG2E), u, mask, unique[:, None], log_s[:, None],
                                        inv_s[:, None], gamma, GAMMA_MODE)
        acc_ml += ml
        acc_h += h
        acc_top += u_top
    return tl.sum(acc_ml, axis=1), tl.sum(acc_h, axis=1), tl.sum(acc_top, axis=1)


@triton.jit
def _streamed_per_class_grad(grad_ptr, body_z, body_o, body_t, body_ew, body_at, cols, body, body_1, y_vec, row_store,
                             valid, m, unique, log_s, inv_s, gamma, f_top, q_top, sum_h, sum_h_rest, coef, eps, C,
                             GAMMA_MODE: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_ELEMENT_WEIGHT: tl.constexpr,
                             DENSE_TARGET: tl.constexpr, HAS_SMOOTHING: tl.constexpr, PER_ROW: tl.constexpr,
                             BLOCK: tl.constexpr, VEC: tl.constexpr, STAGES: tl.constexpr):
    """Pass 3 of a streamed per-class row: the body's gradient (_per_class_grad)."""
    for start in tl.range(0, body_1, BLOCK, num_stages=STAGES):
        offs = start + cols
        mask = body_mask(offs, body, y_vec, VEC)
        z = add_offset(tl.load(body_z + offs, mask=mask, other=0.0).to(tl.float32), body_o, offs, mask, HAS_OFFSET)
        u, _ = class_coefficients(body_t, body_ew, offs, mask, False, eps, C, DENSE_TARGET, HAS_ELEMENT_WEIGHT,
                                  HAS_SMOOTHING)
        zm = z - m[:, None]
        store_grad(grad_ptr + body_at + offs, mask & row_store,
                   _per_class_grad(zm, tl.exp2(zm * LOG2E), u, unique[:, None], log_s[:, None], inv_s[:, None], gamma,
                                   f_top[:, None], q_top[:, None], sum_h[:, None], sum_h_rest[:, None],
                                   coef[:, None], GAMMA_MODE), valid[:, None], PER_ROW)


@triton.jit
def softmax_focal_kernel(
    logits_ptr, target_ptr, weight_ptr, offset_ptr, margin_ptr, sample_weight_ptr, element_weight_ptr, grad_loss_ptr,
    loss_ptr, grad_ptr, N, C, gamma, eps, ignore_index,
    HAS_WEIGHT: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_SAMPLE_WEIGHT: tl.constexpr,
    HAS_ELEMENT_WEIGHT: tl.constexpr, DENSE_TARGET: tl.constexpr,
    GAMMA_MODE: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    WRITE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr, SCALE_GRAD: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, HELD: tl.constexpr, STAGES: tl.constexpr,
):
    """Grid and paths: softmax_ce_kernel's; the passes: the module docstring; PER_CLASS (a dense target, or
    element weights with smoothing): the per-class path of softmax_ce.py, its sums pass and gradient pass those
    of the smoothing path with per-class coefficients. Row values are [ROWS] tensors; the body tile is
    [ROWS, BLOCK], the edge tile [4 VEC, ROWS] (rows.py)."""
    PER_ROW: tl.constexpr = ROWS == 1
    PER_CLASS: tl.constexpr = per_class(DENSE_TARGET, HAS_ELEMENT_WEIGHT, HAS_SMOOTHING)
    ROW_WEIGHT: tl.constexpr = DENSE_TARGET and HAS_WEIGHT
    cols = tl.arange(0, BLOCK)[None, :]
    n_blocks = tl.cdiv(N, ROWS)
    for block in tl.range(tl.program_id(0), n_blocks, tl.num_programs(0), num_stages=STAGES if HELD else 1):
        (rows, row_mask, valid, alpha, a_up, body, y_vec, e_at, e_mask, e_is_y, z_y, body_o, e_o, margin_y, head,
         e_cols) = row_setup(logits_ptr, target_ptr, weight_ptr, offset_ptr, margin_ptr, sample_weight_ptr,
                             element_weight_ptr, block, N, C, ignore_index, HAS_WEIGHT, HAS_OFFSET, HAS_MARGIN,
                             HAS_SAMPLE_WEIGHT, HAS_ELEMENT_WEIGHT, DENSE_TARGET, PER_CLASS, ROWS, VEC)
        body_z, body_at, row_store, e_store, body_1, compute = row_frame(logits_ptr, a_up, row_mask, e_mask, body,
                                                                         valid, PER_ROW)
        if PER_CLASS:
            body_t, e_t, body_w, e_w, body_ew, e_ew = class_pointers(target_ptr, weight_ptr, element_weight_ptr,
                                                                    body_at, e_at, head, e_cols, HAS_WEIGHT,
                                                                    HAS_ELEMENT_WEIGHT, DENSE_TARGET)
        if HELD:  # loaded before the branch, so the pipelined loop prefetches them for every row
            b_mask, z_b, z_e = held_tiles(logits_ptr, body_z, cols, body, y_vec, e_at, e_mask, e_is_y, body_o, e_o,
                                          margin_y, HAS_OFFSET, HAS_MARGIN, VEC)
            if PER_CLASS:
                u_b, t_b = class_coefficients(body_t, body_ew, cols, b_mask, False, eps, C, DENSE_TARGET,
                                              HAS_ELEMENT_WEIGHT, HAS_SMOOTHING)
                u_e, t_e = class_coefficients(e_t, e_ew, 0, e_mask, e_is_y, eps, C, DENSE_TARGET, HAS_ELEMENT_WEIGHT,
                                              HAS_SMOOTHING)
        if compute:
            if PER_CLASS:
                if HELD:
                    m, zm_b, zm_e, ex_b, ex_e, s_rest = held_top(z_b, z_e)
                    if ROW_WEIGHT:
                        alpha *= (tl.sum(t_b * column_values(body_w, cols, b_mask), axis=1)
                                  + tl.sum(t_e * column_values(e_w, 0, e_mask), axis=0))
                else:
                    m, s_rest, z_e, zm_e, ex_e, u_e, _, _, row_weight = streamed_top(
                        logits_ptr, body_z, body_o, body_t, body_ew, body_w, cols, body, body_1, y_vec, e_at, e_t, e_ew,
                        e_w, e_mask, e_is_y, e_o, margin_y, eps, C, False, ROW_WEIGHT, HAS_OFFSET, HAS_MARGIN,
                        HAS_ELEMENT_WEIGHT, DENSE_TARGET, HAS_SMOOTHING, ROWS, BLOCK, VEC, STAGES)
                    if ROW_WEIGHT:
                        alpha *= row_weight
                # the top class's scalars: p = 1/s, 1 - p = s_rest/s, -log p = log s = log1p(s_rest), F = -h
                inv_s = 1.0 / (1.0 + s_rest)
                log_s = log1p_pos(s_rest)
                q_top = s_rest * inv_s
                unique = s_rest < 1.0
                mod_top = _modulator(q_top, gamma, GAMMA_MODE)
                f_top = _target_factor(mod_top, log_s, 1.0, s_rest, gamma, GAMMA_MODE)
                ml_e, h_e, top_e = _per_class_terms(zm_e, ex_e, u_e, e_mask, unique[None, :], log_s[None, :],
                                                    inv_s[None, :], gamma, GAMMA_MODE)
                if HELD:
                    ml_b, h_b, top_b = _per_class_terms(zm_b, ex_b, u_b, b_mask, unique[:, None], log_s[:, None],
                                                        inv_s[:, None], gamma, GAMMA_MODE)
                    sum_ml = tl.sum(ml_b, axis=1)
                    sum_h_rest = tl.sum(h_b, axis=1)
                    u_top = tl.sum(top_b, axis=1)
                else:
                    sum_ml, sum_h_rest, u_top = _streamed_per_class_sums(
                        body_z, body_o, body_t, body_ew, cols, body, body_1, y_vec, m, unique, log_s, inv_s, gamma,
                        eps, C, GAMMA_MODE, HAS_OFFSET, HAS_ELEMENT_WEIGHT, DENSE_TARGET, HAS_SMOOTHING, ROWS, BLOCK,
                        VEC, STAGES)
                sum_ml += tl.sum(ml_e, axis=0)
                sum_h_rest += tl.sum(h_e, axis=0)
                u_top += tl.sum(top_e, axis=0)
                if WRITE_LOSS:
                    tl.store(loss_ptr + rows, tl.where(valid, alpha * (sum_ml + u_top * (mod_top * log_s)), 0.0),
                             mask=row_mask)
                if WRITE_GRAD:
                    coef = grad_coef(alpha, grad_loss_ptr, rows, SCALE_GRAD)
                    sum_h = sum_h_rest - u_top * f_top
                    if HELD:
                        store_grad(grad_ptr + body_at + cols, b_mask & row_store,
                                   _per_class_grad(zm_b, ex_b, u_b, unique[:, None], log_s[:, None], inv_s[:, None],
                                                   gamma, f_top[:, None], q_top[:, None], sum_h[:, None],
                                                   sum_h_rest[:, None], coef[:, None], GAMMA_MODE),
                                   valid[:, None], PER_ROW)
                    else:
                        _streamed_per_class_grad(grad_ptr, body_z, body_o, body_t, body_ew, body_at, cols, body, body_1,
                                                 y_vec, row_store, valid, m, unique, log_s, inv_s, gamma, f_top, q_top,
                                                 sum_h, sum_h_rest, coef, eps, C, GAMMA_MODE, HAS_OFFSET,
                                                 HAS_ELEMENT_WEIGHT, DENSE_TARGET, HAS_SMOOTHING, PER_ROW, BLOCK, VEC,
                                                 STAGES)
                    store_grad(grad_ptr + e_at, e_store,
                               _per_class_grad(zm_e, ex_e, u_e, unique[None, :], log_s[None, :], inv_s[None, :], gamma,
                                               f_top[None, :], q_top[None, :], sum_h[None, :], sum_h_rest[None, :],
                                               coef[None, :], GAMMA_MODE), valid[None, :], PER_ROW)
            else:
                if HELD:
                    m, ex_b, ex_e, s_ny = held_lse(z_b, z_e, e_is_y)
                else:
                    m, z_e, ex_e, s_ny, _ = streamed_lse(logits_ptr, body_z, cols, body, body_1, y_vec, e_at, e_mask,
                                                         e_is_y, z_y, body_o, e_o, margin_y, False, HAS_OFFSET,
                                                         HAS_MARGIN, ROWS, BLOCK, VEC, STAGES)
                e_y, s, inv_s, q_y, l_y, mod_y, f = target_terms(m, s_ny, z_y, gamma, GAMMA_MODE)
                if HAS_SMOOTHING:
                    log_s = tl.log(s)
                    if HELD:
                        p_b, ml_b, h_b = _class_terms(z_b, ex_b, m[:, None], log_s[:, None], inv_s[:, None], gamma,
                                                      GAMMA_MODE)
                        sum_ml = tl.sum(tl.where(b_mask, ml_b, 0.0), axis=1)
                        sum_h = tl.sum(tl.where(b_mask, h_b, 0.0), axis=1)
                    else:
                        sum_ml, sum_h = _streamed_sums(body_z, body_o, cols, body, body_1, y_vec, m, log_s, inv_s,
                                                       gamma, GAMMA_MODE, HAS_OFFSET, ROWS, BLOCK, VEC, STAGES)
                    p_e, ml_e, h_e = _class_terms(z_e, ex_e, m[None, :], log_s[None, :], inv_s[None, :], gamma,
                                                  GAMMA_MODE)
                    e_rest = e_mask & ~e_is_y
                    sum_ml += tl.sum(tl.where(e_rest, ml_e, 0.0), axis=0)
                    sum_h += tl.sum(tl.where(e_rest, h_e, 0.0), axis=0)
                    eps_c = eps / C
                    w_y = (1.0 - eps) + eps_c  # q'_y
                    row_loss = w_y * (mod_y * l_y) + eps_c * sum_ml
                    if WRITE_GRAD:
                        coef = grad_coef(alpha, grad_loss_ptr, rows, SCALE_GRAD)
                        k_h = coef * eps_c
                        k_p = coef * (eps_c * sum_h - w_y * f)  # coef G, with h_y = -F
                        # the target: q'_y q_y h_y - (eps/C) p_y sum_{c != y} h_c
                        g_y = coef * (-(w_y * q_y) * f - eps_c * (e_y * inv_s) * sum_h)
                        if HELD:
                            store_grad(grad_ptr + body_at + cols, b_mask & row_store,
                                       k_h[:, None] * h_b - k_p[:, None] * p_b, valid[:, None], PER_ROW)
                        else:
                            _streamed_smoothed_grad(grad_ptr, body_z, body_o, body_at, cols, body, body_1, y_vec,
                                                    row_store, valid, m, log_s, inv_s, gamma, k_h, k_p, GAMMA_MODE,
                                                    HAS_OFFSET, PER_ROW, BLOCK, VEC, STAGES)
                        store_grad(grad_ptr + e_at, e_store,
                                   tl.where(e_is_y, g_y[None, :], k_h[None, :] * h_e - k_p[None, :] * p_e),
                                   valid[None, :], PER_ROW)
                else:
                    row_loss = mod_y * l_y
                    if WRITE_GRAD:
                        # the cross entropy's gradient (eps = 0) with its scale times F
                        k, off, g_y = grad_terms(grad_coef(alpha, grad_loss_ptr, rows, SCALE_GRAD) * f, s, s_ny, eps,
                                                 C, False)
                        if HELD:
                            store_grad(grad_ptr + body_at + cols, b_mask & row_store, ex_b * k[:, None] - off[:, None],
                                       valid[:, None], PER_ROW)
                        else:
                            streamed_grad(grad_ptr, body_z, body_o, body_at, cols, body, 0, body_1, y_vec, row_store,
                                          valid, m, k, off, HAS_OFFSET, PER_ROW, BLOCK, VEC, STAGES)
                        store_grad(grad_ptr + e_at, e_store,
                                   tl.where(e_is_y, g_y[None, :], ex_e * k[None, :] - off[None, :]), valid[None, :],
                                   PER_ROW)
                if WRITE_LOSS:
                    tl.store(loss_ptr + rows, tl.where(valid, alpha * row_loss, 0.0), mask=row_mask)
        else:
            store_zeros(grad_ptr, body_at, cols, body, 0, body_1, y_vec, row_store, e_at, e_store, loss_ptr, rows,
                        row_mask, WRITE_LOSS, WRITE_GRAD, HELD, ROWS, BLOCK, VEC)
