"""Class-parallel class-balanced losses over torch.distributed, for classifier heads sharded by classes.

Each rank of a process group holds the logits (N, C_local) of a contiguous class range
[class_start, class_start + C_local) of the global C classes (shards may be uneven); the targets (N,)
and the class weights (C,) are global and identical on every rank. Only per-row statistics cross the
ranks: O(N) floats per call, never O(N x C); memory per rank stays O(N x C_local).

Softmax (docs/math.md, sections 6, 7 and 9; label smoothing eps), per row, z = [z_0 | z_1 | ...] split by rank:
    m      = max over ranks of (max_c z_rc)                      all_reduce MAX   (N floats)
    s_rest = sum over ranks of sum_{c != y} exp(z_rc - m)         \
    z_y    = the target logit, nonzero only on the owning rank    > one all_reduce SUM of a (2, N) tensor
    S      = sum over ranks of sum_c z_rc  (only when eps > 0)   /  ((3, N) with label smoothing)
    s      = s_rest + exp(z_y - m),  lse = m + log s
    loss   = alpha_y * (softplus(log s_rest + m - z_y) + eps * (z_y - S / C))
    grad_rc = alpha_y * (exp(z_rc - lse) - (1 - eps) * [c == y] - eps / C)       (local: lse is known)
             with the c = y entry formed as eps - s_rest / s (no cancellation for confident rows)
Sigmoid family (focal, gamma = 0 is sigmoid CE): the loss is a sum of independent per-class terms, so
each rank sums its own C_local terms (t_c = +1 only for the target class, i.e. only on the rank owning y)
and one all_reduce SUM of the (N,) partial rows gives the row loss; the gradient is per element, local.
Sample weights (N,), like the targets the same on every rank, multiply alpha_y of their row (as the kernels
fold them), so they scale the loss and the local gradient alike and add nothing to the collectives.
Element weighting (weighting="element", docs/math.md section 14): the global class weights e (C,) multiply each
class's term instead of the row, loss_i = sum_c e_c l_ic. Each rank multiplies its own classes' terms (and
their gradient entries) by its slice of e; e_y, the target's weight, is global, so without label smoothing
the softmax losses are the row-weighted ones with alpha_y -> e_y. With label smoothing the softmax cross
entropy needs sum_c e_c (lse - z_c) = E log s + sum_c e_c (m - z_c), E = sum_c e_c: the last sum is one more
row of the SUM collective (in place of S, every term >= 0 for positive weights: no cancellation); the softmax
focal loss weighs the two shard sums of its second SUM (e_c l_c mod_c and e_c h_c). Gradient, softmax CE:
    grad_rc = alpha * (W exp(z_rc - lse) - (eps / C) e_c - (1 - eps) e_y [c == y]),  W = (1 - eps) e_y + eps E / C
with the c = y entry formed as (eps / C) (E p_y - e_y) - (1 - eps) e_y s_rest / s.
Targets: class indices only. A dense (N, C) target is refused: it would be an N x C tensor on every rank,
which is what sharding the classes exists to avoid.

Why the backward needs no collective: after the forward's all_reduce, the row losses are replicated, and
everything downstream of them (the reduction, the rest of the objective) is computed identically on
every rank, so each rank's autograd receives the same upstream gradient d(objective)/d(loss_i). Rank r's
logits reach loss_i only through its own partial statistics, whose derivative is local given the
replicated lse (softmax) or nothing at all (sigmoid). The max m is only a shift for stability: lse does
not depend on it, so it carries no gradient. Differentiable collectives (torch.distributed.nn.functional
.all_reduce) would be wrong here: their backward all-reduces the upstream gradient as well, which with a
replicated objective multiplies every logit gradient by the world size. The caller must therefore
compute the same objective from the returned loss on every rank (the usual case: the loss is the same
value everywhere); ranks that built different objectives from it would get gradients of none of them.

The per-shard math uses torch ops, not the fused kernels: the kernels' op contract computes a whole row
with the positive class inside it and one lse, which a shard does not have. Logits in float16/bfloat16
are computed in float32, float64 stays float64 (for tests); the gradient is formed in the compute dtype
and rounded once to the logits' dtype. Backward strategy: "fused" (the project's CPU default): forward
forms d loss_i / d z of its shard from the intermediates it already has, and backward only scales row i
by the upstream gradient. That holds one (N, C_local) tensor from forward to backward; recomputing
instead would repeat every transcendental of the shard.
No host sync beyond the collectives: every check reads metadata or runs on the device, except the
optional derivation of class_start (see class_shard_range), which reads the gathered shard sizes once.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import _checks, _reduction, losses

__all__ = ["class_shard_range", "cb_softmax_cross_entropy_parallel", "cb_focal_loss_parallel",
           "cb_sigmoid_cross_entropy_parallel", "cb_softmax_focal_loss_parallel", "global_class_counts"]


def _group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("cbkernels.distributed needs an initialised process group "
                           "(torch.distributed.init_process_group)")
    return dist.group.WORLD if group is None else group


def class_shard_range(num_local_classes: int, group=None, device=None) -> tuple[int, int]:
    """(class_start, num_classes) of this rank's shard, from an all-gather of every rank's C_local.

    Shards are laid out in rank order: rank r owns [sum of C_local of ranks < r, ... + C_local).
    This reads the gathered sizes on the host (a device sync under NCCL): call it once at setup and
    pass the result to the losses, which otherwise call it on every step.
    """
    group = _group(group)
    if not isinstance(num_local_classes, int) or isinstance(num_local_classes, bool) or num_local_classes < 1:
        raise ValueError(f"num_local_classes must be an int >= 1, got {num_local_classes!r}")
    if device is None:  # NCCL only moves CUDA tensors; gloo takes CPU ones
        device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend(group) == "nccl" else torch.device("cpu")
    sizes = [torch.zeros((), dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor(num_local_classes, dtype=torch.int64, device=device), group=group)
    sizes = [int(s) for s in sizes]
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes)


def _resolve_shard(logits, class_weight, class_start, num_classes, group):
    """The shard's (class_start, C): from the arguments, class_weight's length, or class_shard_range."""
    local = logits.shape[1]
    if num_classes is None and class_weight is not None:
        num_classes = class_weight.shape[0]
    if class_start is None:
        class_start, gathered = class_shard_range(local, group, logits.device)
        if num_classes is not None and num_classes != gathered:
            raise ValueError(f"the ranks' logits hold {gathered} classes in all but num_classes / class_weight "
                             f"say {num_classes}")
        num_classes = gathered
    if num_classes is None:
        raise ValueError("num_classes is needed when class_start is given and class_weight is None")
    for name, value in (("class_start", class_start), ("num_classes", num_classes)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if class_start < 0 or class_start + local > num_classes:
        raise ValueError(f"class_start={class_start} with {local} local classes does not fit in "
                         f"num_classes={num_classes}")
    return class_start, num_classes


def _check_inputs(logits, target, class_weight, class_start, num_classes, reduction, ignore_index, group, family,
                  logit_offset, target_margin, sample_weight, normalizer, weighting, where):
    # Before check_inputs, which takes a dense (N, C) target: class indices only here (`where`: the function).
    _checks.check_index_target_only(target, where)
    target, _ = _checks.check_inputs(logits, target, None)  # shapes, dtypes, devices of logits and target
    _checks.check_reduction(reduction)
    _checks.check_weighting(weighting)
    sample_weight = _checks.check_sample_weight(sample_weight, logits.shape[0], logits.device)
    normalizer = _checks.check_normalizer(normalizer, reduction, logits.device)
    ignore_index = _checks.check_ignore_index(ignore_index)
    group = _group(group)
    if class_weight is not None and (not isinstance(class_weight, torch.Tensor) or class_weight.dim() != 1):
        raise ValueError("class_weight must be a 1-D tensor (C,) of the global class weights, or None")
    class_start, num_classes = _resolve_shard(logits, class_weight, class_start, num_classes, group)
    class_weight = _checks.check_class_weight(class_weight, num_classes, logits.device)
    class_weight, element_weight = _reduction.split_weighting(class_weight, weighting)
    logit_offset, target_margin = _checks.check_logit_adjustments(family, logit_offset, target_margin, num_classes,
                                                                  logits.device)
    # Targets are global: a device-side check against the global C (raises at once on CPU tensors,
    # before any collective, so every rank raises alike: the targets are identical on every rank).
    _checks.check_target_range_async(target, num_classes, ignore_index)
    return (class_start, num_classes, ignore_index, group, class_weight, element_weight, logit_offset, target_margin,
            sample_weight, normalizer)


def _row_setup(logits, target, class_weight, sample_weight, logit_offset, target_margin, class_start, num_classes,
               ignore_index):
    """Compute-dtype logits (adjusted: this shard's columns of z + logit_offset, the owned target logits minus
    their margin), valid-row mask, the local column of each row's target (owned rows), and each row's weight
    alpha_y * sample_weight (applied to ignored rows only through a where or masked_fill: their NaN stays out)."""
    dtype = _reduction.compute_dtype(logits.dtype)
    z = logits.to(dtype)
    valid = target != ignore_index
    local = target.long() - class_start
    owned = valid & (local >= 0) & (local < logits.shape[1])
    local = torch.where(owned, local, torch.zeros_like(local))  # a safe index for rows owned elsewhere
    if logit_offset is not None:  # out of place: z may be the caller's logits
        z = z + logit_offset[class_start:class_start + logits.shape[1]].to(dtype)
    if target_margin is not None:
        margin = target_margin.to(dtype).gather(0, target.long().clamp(0, num_classes - 1))
        z = z - torch.zeros_like(z).scatter(1, local.unsqueeze(1), torch.where(owned, margin, 0.0).unsqueeze(1))
    if class_weight is None:
        alpha = torch.ones(target.shape, dtype=dtype, device=logits.device)
    else:
        # Clamped index: on CUDA a bad target is reported by the asynchronous assert, never read out of bounds.
        alpha = class_weight.to(dtype).gather(0, target.long().clamp(0, num_classes - 1))
    if sample_weight is not None:
        alpha = alpha * sample_weight.to(dtype)
    return z, valid, owned, local, alpha


def _element_weights(element_weight, target, class_start, local_classes, num_classes, dtype):
    """weighting="element": (this shard's slice of the weights (C_local,), each row's target weight e_y (N,),
    E = sum_c e_c (0-d)) in the compute dtype; None without element weights. All from the global (C,) weights
    every rank holds: no collective."""
    if element_weight is None:
        return None
    e = element_weight.to(dtype)
    e_y = e.gather(0, target.long().clamp(0, num_classes - 1))  # clamped: ignored rows (masked out later)
    return e[class_start:class_start + local_classes], e_y, e.sum()


class _FusedParallel(torch.autograd.Function):
    """The "fused" strategy: forward saves d loss_i / d z of its shard (the subclass's forward) and backward
    scales row i by the upstream gradient; the other inputs get no gradient."""

    @staticmethod
    def backward(ctx, grad_rows):
        (grad,) = ctx.saved_tensors
        grad_logits = (grad * grad_rows.to(grad.dtype).unsqueeze(1)).to(ctx.logits_dtype)
        return (grad_logits,) + (None,) * (len(ctx.needs_input_grad) - 1)


def _softmax_statistics(z, owned, local, group, extra=None):
    """The replicated per-row softmax statistics of every shard (docs/math.md, section 9): m, s_rest (the sum
    of exp(z_c - m) over c != y), z_y and s = s_rest + exp(z_y - m), plus the shard's exp(z - m) (N, C_local)
    and the sum over ranks of each of the shard's (N,) tensors `extra(m)` returns, given the global max m (in
    the same SUM collective)."""
    m = z.amax(dim=1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    index = local.unsqueeze(1)
    z_y = torch.where(owned, z.gather(1, index).squeeze(1), torch.zeros_like(m))
    ex = (z - m.unsqueeze(1)).exp_()
    # The sum over the classes other than y, s_rest, not s - exp(z_y - m): for a confident row s_rest is
    # far below s's rounding error. The target column is zeroed in place for the sum, then put back.
    ex_y = ex.gather(1, index)
    ex.scatter_(1, index, torch.where(owned.unsqueeze(1), torch.zeros_like(ex_y), ex_y))
    parts = [ex.sum(dim=1), z_y, *(extra(m) if extra is not None else ())]
    ex.scatter_(1, index, ex_y)
    stats = torch.stack(parts)
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    s_rest, z_y = stats[0], stats[1]
    return m, s_rest, z_y, s_rest + torch.exp(z_y - m), ex, stats[2:]


class _SoftmaxParallel(_FusedParallel):
    @staticmethod
    def forward(ctx, logits, target, class_weight, sample_weight, element_weight, logit_offset, target_margin,
                class_start, num_classes, eps, ignore_index, group):
        z, valid, owned, local, alpha = _row_setup(logits, target, class_weight, sample_weight, logit_offset,
                                                   target_margin, class_start, num_classes, ignore_index)
        elements = _element_weights(element_weight, target, class_start, z.shape[1], num_classes, z.dtype)
        if elements is not None and not eps:  # sum_c e_c onehot_c (lse - z_c) = e_y (lse - z_y): a row weight
            alpha = alpha * elements[1]
        elif elements is not None:
            return _softmax_element_smoothed(ctx, logits, z, valid, owned, local, alpha, elements, num_classes, eps,
                                             group)
        m, s_rest, z_y, s, ex, sum_z = _softmax_statistics(z, owned, local, group,
                                                           (lambda _m: [z.sum(dim=1)]) if eps else None)
        # lse - z_y = softplus(log s_rest + m - z_y) (docs/math.md, section 7): finite and exact to fp32's
        # relative precision when p_y -> 1, where m + log s - z_y rounds to 0.
        rows = F.softplus(torch.log(s_rest) + m - z_y)
        if eps:
            rows = rows + eps * (z_y - sum_z[0] / num_classes)
        # where, not a multiply by the mask: an ignored row's NaN or inf must not leak into the loss.
        rows = torch.where(valid, alpha * rows, torch.zeros_like(rows))
        grad = None
        if ctx.needs_input_grad[0]:
            # d loss_i / d z_ic = alpha_y * (softmax_c - (1 - eps) [c == y] - eps / C), formed in the compute
            # dtype (docs/math.md, section 6: subtract the one-hot before any rounding to half precision), in
            # place on ex. At c = y: p_y - 1 + eps = eps - s_rest / s, from s_rest for the same reason as the loss.
            inv_s = torch.reciprocal(s)
            grad = ex.mul_(inv_s.unsqueeze(1))
            _set_true_class_(grad, local, owned, eps - s_rest * inv_s)
            if eps:
                grad.sub_(eps / num_classes)
            grad = _scale_valid_rows_(grad, alpha, valid)
        ctx.save_for_backward(grad)
        ctx.logits_dtype = logits.dtype
        return rows


def _softmax_element_smoothed(ctx, logits, z, valid, owned, local, alpha, elements, num_classes, eps, group):
    """The softmax cross entropy with element weights e and label smoothing eps > 0 (module docstring):
    loss = alpha * ((1 - eps) e_y (lse - z_y) + (eps / C) (E log s + sum_c e_c (m - z_c)))."""
    e_local, e_y, e_total = elements
    # the shard's sum of e_c (m - z_c), m the global max: summed over ranks with the statistics
    m, s_rest, z_y, s, ex, (gaps,) = _softmax_statistics(z, owned, local, group,
                                                         lambda m: [((m.unsqueeze(1) - z) * e_local).sum(dim=1)])
    rows = (1 - eps) * e_y * F.softplus(torch.log(s_rest) + m - z_y) \
        + (eps / num_classes) * (e_total * torch.log(s) + gaps)
    rows = torch.where(valid, alpha * rows, torch.zeros_like(rows))
    grad = None
    if ctx.needs_input_grad[0]:
        # grad_c = W p_c - (eps / C) e_c, W = (1 - eps) e_y + (eps / C) E; at c = y (owned rows):
        # (eps / C) (E p_y - e_y) - (1 - eps) e_y s_rest / s, no 1 - p_y formed.
        inv_s = torch.reciprocal(s)
        big_w = (1 - eps) * e_y + (eps / num_classes) * e_total
        grad = ex.mul_((big_w * inv_s).unsqueeze(1)).sub_((eps / num_classes) * e_local)
        p_y = torch.exp(z_y - m) * inv_s
        true_class = (eps / num_classes) * (e_total * p_y - e_y) - (1 - eps) * e_y * s_rest * inv_s
        _set_true_class_(grad, local, owned, true_class)
        grad = _scale_valid_rows_(grad, alpha, valid)
    ctx.save_for_backward(grad)
    ctx.logits_dtype = logits.dtype
    return rows


class _SoftmaxFocalParallel(_FusedParallel):
    """The softmax focal loss (docs/math.md, section 13) on the softmax statistics of section 9. The target's
    terms come from x = s_rest / exp(z_y - m), replicated after the first SUM. With label smoothing each rank
    also sums mod_c l_c and h_c over its own classes other than y (they need lse, hence a second SUM of
    (2, N)); every gradient entry is then local. Element weights e: without smoothing a row weight e_y; with it,
    every target term (l_y mod_y, h_y) times e_y and every other class's (l_c mod_c, h_c) times e_c, so the
    formulas below hold as written with the weighted terms."""

    @staticmethod
    def forward(ctx, logits, target, class_weight, sample_weight, element_weight, logit_offset, target_margin,
                class_start, num_classes, gamma, eps, ignore_index, group):
        z, valid, owned, local, alpha = _row_setup(logits, target, class_weight, sample_weight, logit_offset,
                                                   target_margin, class_start, num_classes, ignore_index)
        elements = _element_weights(element_weight, target, class_start, z.shape[1], num_classes, z.dtype)
        if elements is not None and not eps:  # sum_c e_c onehot_c f_c = e_y f_y: a row weight
            alpha = alpha * elements[1]
        m, s_rest, z_y, s, ex, _ = _softmax_statistics(z, owned, local, group)
        x = s_rest / torch.exp(z_y - m)
        l_y = torch.log1p(x)  # -log p_y
        q_y = x / (1 + x)     # 1 - p_y
        mod_y = q_y.pow(gamma)  # 0^0 = 1: gamma = 0 is the cross entropy
        h_y = -mod_y * (1 + gamma * torch.where(x > 0, l_y / x, torch.ones_like(x)))  # p_y l_y / q_y = l_y / x
        rows = mod_y * l_y
        index = local.unsqueeze(1)
        if eps and elements is not None:  # the target's terms times e_y (the others' below, times e_c)
            h_y = h_y * elements[1]
            rows = rows * elements[1]
        if eps:
            # Off the target: p = exp(z - m) / s, l = log s - (z - m), q = 1 - p (docs/math.md, 13.3).
            p = ex / s.unsqueeze(1)
            l = torch.log(s).unsqueeze(1) - (z - m.unsqueeze(1))
            q = 1 - p
            mod = q.pow(gamma)
            small = q < torch.finfo(q.dtype).eps ** 0.5  # l / q = 1 + q / 2 + q^2 / 3 + ...
            h = -mod * (1 + gamma * p * torch.where(small, 1 + q / 2, l / torch.where(small, 1, q)))
            terms = mod * l
            if elements is not None:
                h = h.mul_(elements[0])
                terms = terms.mul_(elements[0])
            not_y = torch.ones_like(p).scatter_(1, index, (~owned).to(p.dtype).unsqueeze(1))
            sums = torch.stack([(terms * not_y).sum(dim=1), (h * not_y).sum(dim=1)])
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
            rows = (1 - eps) * rows + (eps / num_classes) * (sums[0] + rows)
            sum_h = sums[1] + h_y
        rows = torch.where(valid, alpha * rows, torch.zeros_like(rows))
        grad = None
        if ctx.needs_input_grad[0]:
            # grad_j = alpha ((eps/C) h_j - p_j G), G = (1 - eps) h_y + (eps/C) sum_c h_c; at the target,
            # grad_y = (1 - eps) h_y q_y + (eps/C) (h_y - p_y sum_c h_c), from q_y = s_rest / s (no cancellation).
            p_y = 1 / (1 + x)
            if eps:
                big_g = (1 - eps) * h_y + (eps / num_classes) * sum_h
                grad = h.mul_(eps / num_classes).sub_(p * big_g.unsqueeze(1))
                true_class = (1 - eps) * h_y * q_y + (eps / num_classes) * (h_y - p_y * sum_h)
            else:
                grad = ex.mul_((-h_y / s).unsqueeze(1))
                true_class = h_y * q_y
            _set_true_class_(grad, local, owned, true_class)
            grad = _scale_valid_rows_(grad, alpha, valid)
        ctx.save_for_backward(grad)
        ctx.logits_dtype = logits.dtype
        return rows


class _FocalParallel(_FusedParallel):
    """Element weights: each rank multiplies its classes' terms and their gradient entries by its slice of e."""

    @staticmethod
    def forward(ctx, logits, target, class_weight, sample_weight, element_weight, logit_offset, target_margin,
                class_start, num_classes, gamma, ignore_index, group):
        z, valid, owned, local, alpha = _row_setup(logits, target, class_weight, sample_weight, logit_offset,
                                                   target_margin, class_start, num_classes, ignore_index)
        elements = _element_weights(element_weight, target, class_start, z.shape[1], num_classes, z.dtype)
        # The op contract's stable forms, with u = t * z and e = exp(-|u|) shared by everything below:
        #   -log p = softplus(-u) = max(-u, 0) + log1p(e),  (1 - p)^gamma = exp(-gamma * softplus(u)).
        u = _times_t(z, owned, local)
        e = u.abs().neg_().exp_()
        l1pe = torch.log1p(e)
        neg_log_p = u.neg().clamp_min_(0).add_(l1pe)
        mod = u.clamp_min(0).add_(l1pe).mul_(-gamma).exp_() if gamma else None
        terms = neg_log_p * mod if gamma else neg_log_p
        rows = (terms if elements is None else terms * elements[0]).sum(dim=1)
        dist.all_reduce(rows, op=dist.ReduceOp.SUM, group=group)
        rows = torch.where(valid, alpha * rows, torch.zeros_like(rows))
        grad = None
        if ctx.needs_input_grad[0]:
            # d term / du = (1 - p)^gamma * (gamma * p * log p - q), with p and q = 1 - p both taken from e
            # (u >= 0: p = 1/(1+e), q = e/(1+e); else swapped), never as 1 - p, which cancels.
            inv = e.add(1).reciprocal_()  # 1 / (1 + e)
            e_inv = e.mul_(inv)  # e / (1 + e), in place: e is not needed after this
            positive_u = u >= 0
            q = torch.where(positive_u, e_inv, inv)
            if gamma:
                p = torch.where(positive_u, inv, e_inv)
                dterm = p.mul_(neg_log_p).mul_(-gamma).sub_(q).mul_(mod)
            else:
                dterm = q.neg_()
            if elements is not None:
                dterm = dterm.mul_(elements[0])
            grad = _scale_valid_rows_(_times_t(dterm, owned, local), alpha, valid)
        ctx.save_for_backward(grad)
        ctx.logits_dtype = logits.dtype
        return rows



def _times_t(x, owned, local):
    """t * x with t = +1 at the row's target column (only where this rank owns it), -1 elsewhere.

    One negated copy, then the owned rows' target entries are put back (an (N,) scatter, not a mask).
    """
    out = x.neg()
    index = local.unsqueeze(1)
    out.scatter_(1, index, torch.where(owned.unsqueeze(1), x.gather(1, index), out.gather(1, index)))
    return out


def _set_true_class_(grad, local, owned, true_class):
    """grad[i, local[i]] = true_class[i] in place, on the rows whose target class this rank owns (the others
    keep their entry: local is a safe index there, not their target)."""
    index = local.unsqueeze(1)
    grad.scatter_(1, index, torch.where(owned, true_class, grad.gather(1, index).squeeze(1)).unsqueeze(1))


def _scale_valid_rows_(grad, alpha, valid):
    """grad * alpha_y per row, in place, and exactly 0 on ignored rows (masked_fill: their NaNs do not leak)."""
    return grad.mul_(alpha.unsqueeze(1)).masked_fill_(~valid.unsqueeze(1), 0.0)


# The class-parallel implementation of each kernel family of the registry (losses.FAMILIES).
_PARALLEL = {losses.SOFTMAX_CE.name: _SoftmaxParallel, losses.SIGMOID_FOCAL.name: _FocalParallel,
             losses.SOFTMAX_FOCAL.name: _SoftmaxFocalParallel}


def parallel_loss(spec: losses.Loss, logits, target, class_weight, reduction, ignore_index, hyperparameters,
                  class_start, num_classes, group, logit_offset=None, target_margin=None, sample_weight=None,
                  normalizer=None, weighting="row"):
    """One class-parallel loss call for a registered loss; hyperparameters by name (checked here); the logit
    adjustments global (C,), as class_weight; sample_weight (N,), normalizer and weighting as in the
    single-device losses; class-index targets only."""
    (class_start, num_classes, ignore_index, group, class_weight, element_weight, logit_offset, target_margin,
     sample_weight, normalizer) = _check_inputs(logits, target, class_weight, class_start, num_classes, reduction,
                                                ignore_index, group, spec.family, logit_offset, target_margin,
                                                sample_weight, normalizer, weighting, f"{spec.function}_parallel")
    values = spec.kernel_hyperparameters(hyperparameters)
    rows = _PARALLEL[spec.family.name].apply(logits, target, class_weight, sample_weight, element_weight, logit_offset,
                                             target_margin, class_start, num_classes, *values, ignore_index, group)
    return _reduction.reduce_rows(rows, target, ignore_index, reduction, normalizer)


def cb_softmax_cross_entropy_parallel(logits, target, class_weight=None, reduction="mean", ignore_index=-100,
                                      label_smoothing=0.0, *, class_start=None, num_classes=None, group=None,
                                      logit_offset=None, target_margin=None, sample_weight=None, normalizer=None,
                                      weighting="row"):
    """Class-balanced softmax cross entropy with the classes sharded across the ranks of `group`.

    logits: this rank's (N, C_local) slice of the global (N, C) logits, classes [class_start, class_start +
    C_local). target (N,) and class_weight (C,) or None: global, the same on every rank. class_start and
    num_classes default to class_shard_range (one extra all-gather and a host read per call: pass them);
    explicit class_start values must tile [0, C) over the ranks (only this rank's range is checked).
    logit_offset / target_margin: the global (C,) logit adjustments of cb_softmax_cross_entropy, the same on
    every rank (each rank applies its columns of the offset, the rank owning a row's target its margin).
    sample_weight (N,) or None: row i's loss and gradient times sample_weight[i]; the same on every rank (the
    rows are replicated, only the classes are sharded). normalizer: with reduction="mean" only, the divisor of
    the summed rows (a number > 0 or a 0-d tensor on the logits' device), e.g. a count all-reduced over the
    data-parallel ranks (docs/distributed.md). weighting: "row" (default; class_weight weighs row i by
    class_weight[target_i]) or "element" (it weighs each class's term; each rank weighs its own classes), as in
    cbkernels.functional. target: class indices only: a dense (N, C) target raises a ValueError (it would be an
    N x C tensor on every rank, what sharding the classes avoids).
    Returns the same value on every rank as cbkernels.cb_softmax_cross_entropy on the gathered logits
    ("mean" divides by the number of non-ignored rows or the normalizer); the gradient flows to the local
    logits only.
    """
    return parallel_loss(losses.loss("softmax"), logits, target, class_weight, reduction, ignore_index,
                         {"label_smoothing": label_smoothing}, class_start, num_classes, group, logit_offset,
                         target_margin, sample_weight, normalizer, weighting)


def cb_focal_loss_parallel(logits, target, class_weight=None, gamma=0.5, reduction="mean", ignore_index=-100,
                           *, class_start=None, num_classes=None, group=None, logit_offset=None, sample_weight=None,
                           normalizer=None, weighting="row"):
    """Class-balanced sigmoid focal loss with the classes sharded across the ranks of `group`.

    Arguments as cb_softmax_cross_entropy_parallel; gamma >= 0 (0 is sigmoid cross entropy). The value is
    that of cbkernels.cb_focal_loss on the gathered logits, on every rank.
    """
    return parallel_loss(losses.loss("focal"), logits, target, class_weight, reduction, ignore_index,
                         {"gamma": gamma}, class_start, num_classes, group, logit_offset, None, sample_weight,
                         normalizer, weighting)


def cb_sigmoid_cross_entropy_parallel(logits, target, class_weight=None, reduction="mean", ignore_index=-100,
                                      *, class_start=None, num_classes=None, group=None, logit_offset=None,
                                      sample_weight=None, normalizer=None, weighting="row"):
    """Class-balanced sigmoid cross entropy, class-parallel: the focal loss with gamma = 0."""
    return parallel_loss(losses.loss("sigmoid"), logits, target, class_weight, reduction, ignore_index, {},
                         class_start, num_classes, group, logit_offset, None, sample_weight, normalizer, weighting)


def cb_softmax_focal_loss_parallel(logits, target, class_weight=None, gamma=2.0, reduction="mean",
                                   ignore_index=-100, label_smoothing=0.0, *, class_start=None, num_classes=None,
                                   group=None, logit_offset=None, target_margin=None, sample_weight=None,
                                   normalizer=None, weighting="row"):
    """Class-balanced softmax focal loss with the classes sharded across the ranks of `group`.

    Arguments as cb_softmax_cross_entropy_parallel, and gamma >= 0 (0 is the softmax cross entropy). The value
    is that of cbkernels.cb_softmax_focal_loss on the gathered logits, on every rank. With label_smoothing > 0
    one more all_reduce of (2, N) floats per call.
    """
    return parallel_loss(losses.loss("softmax_focal"), logits, target, class_weight, reduction, ignore_index,
                         {"gamma": gamma, "label_smoothing": label_smoothing}, class_start, num_classes, group,
                         logit_offset, target_margin, sample_weight, normalizer, weighting)


def global_class_counts(labels, num_classes, *, ignore_index=None, group=None):
    """Per-class sample counts (C,) int64 over every rank of a data-parallel group.

    Each rank passes the labels of its own part of the training set; the per-rank histograms are summed
    with one all_reduce, so class_balanced_weights(counts) is the same on every rank and matches the
    whole dataset (per-rank or per-batch counts would not). Labels equal to ignore_index are skipped; any
    other label outside [0, num_classes) raises (device-side check). The histogram always has exactly
    num_classes bins (a scatter_add, not bincount, whose length depends on the data), so the collective
    sees the same shape on every rank even for bad input.
    """
    group = _group(group)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ValueError("labels must be a 1-D tensor of class indices")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must hold integer class indices, got {labels.dtype}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if ignore_index is not None:
        ignore_index = _checks.check_ignore_index(ignore_index)
    valid = torch.ones_like(labels, dtype=torch.bool) if ignore_index is None else labels != ignore_index
    in_range = (labels >= 0) & (labels < num_classes)
    torch._assert_async((in_range | ~valid).all(),
                        "labels hold a class index outside [0, num_classes) that is not ignore_index")
    keep = valid & in_range
    safe = torch.where(keep, labels.long(), torch.zeros_like(labels, dtype=torch.int64))
    counts = torch.zeros(num_classes, dtype=torch.int64, device=labels.device)
    counts.scatter_add_(0, safe, keep.long())
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    return counts
