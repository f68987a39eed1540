"""logit_offset and target_margin (docs/long-tail.md) on every loss and backend pair, their helpers, the module
and the fused linear loss.

The oracle adjusts the logits by hand, z' = z + offset - margin[y] onehot(y), in float64, and evaluates the
loss's reference on z' without any adjustment: the kernels must give that loss, and d loss / d z = d loss / d z'.
So the test does not rely on reference.adjusted_logits, and a kernel that ignored the adjustments (or applied
the margin to the wrong column, or to ignored rows) fails it.
"""
import math

import pytest
import torch

import cbkernels as cb
from cases import DTYPES, REDUCTIONS, assert_grad_close, assert_loss_close, loss_and_grad, loss_cases, make_inputs
from cbkernels import losses

IGNORE = -100


def _adjust_by_hand(logits, target, offset, margin):
    z = logits.detach().double().cpu().clone()
    if offset is not None:
        z += offset.double().cpu()
    if margin is not None:
        for i, y in enumerate(target.tolist()):
            if y != IGNORE:
                z[i, y] -= float(margin[y])
    return z


def _adjustments(num_classes, device, with_margin, generator):
    offset = (torch.randn(num_classes, generator=generator) * 2).to(device)
    margin = (torch.rand(num_classes, generator=generator) * 3).to(device) if with_margin else None
    return offset, margin


def _check(backend, spec, hyper, dtype, reduction, *, with_offset=True, with_margin=True, num_classes=None):
    num_classes = num_classes or (31 if backend.max_elements < 10_000 else 1031)
    generator = torch.Generator().manual_seed(7)
    logits, target, weight = make_inputs(5, num_classes, dtype, backend.device, scale=2.0, generator=generator)
    offset, margin = _adjustments(num_classes, backend.device, with_margin, generator)
    offset = offset if with_offset else None
    kwargs = {"logit_offset": offset}
    if with_margin:
        kwargs["target_margin"] = margin
    upstream = torch.randn(5 if reduction == "none" else 1, generator=generator, dtype=torch.float64)
    x = logits.detach().requires_grad_(True)
    fn = getattr(cb, spec.function)
    out = fn(x, target, weight, reduction=reduction, backend=backend.name, **hyper, **kwargs)
    (grad,) = torch.autograd.grad(out, x, upstream.to(out.dtype).to(out.device).reshape(out.shape))
    z = _adjust_by_hand(logits, target.cpu(), offset, margin).requires_grad_(True)
    expected = spec.reference(z, target.cpu(), None if weight is None else weight.cpu().double(), reduction, IGNORE,
                              **hyper)
    (expected_grad,) = torch.autograd.grad(expected, z, upstream.reshape(expected.shape))
    what = f"{backend.id} {spec.name} {hyper} {dtype} {reduction} offset={with_offset} margin={with_margin}"
    assert_loss_close(out, expected.detach(), f"{what} loss")
    assert_grad_close(grad, expected_grad, dtype, f"{what} grad")


MARGIN_LOSSES = [loss for loss in losses.LOSSES if loss.family.takes_target_margin]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec,hyper", loss_cases())
def test_logit_offset_on_every_loss(backend, spec, hyper, dtype, reduction):
    _check(backend, spec, hyper, dtype, reduction, with_margin=False)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec,hyper", loss_cases(where=lambda spec, hyper: spec.family.takes_target_margin))
def test_target_margin_with_and_without_offset(backend, spec, hyper, dtype, reduction):
    _check(backend, spec, hyper, dtype, reduction, with_offset=False)
    _check(backend, spec, hyper, dtype, reduction)


@pytest.mark.parametrize("family", [f for f in losses.FAMILIES], ids=lambda f: f.name)
def test_every_op_takes_both_adjustments(backend, family):
    """The op contract: every family's ops take both (the sigmoid family's margin too, which the public API
    does not offer), forward and backward, against the reference on hand-adjusted logits."""
    if not backend.is_kernel:
        pytest.skip("the reference backend has no ops")
    ops = getattr(torch.ops, backend.record.namespace)
    generator = torch.Generator().manual_seed(3)
    logits, target, weight = make_inputs(4, 13, torch.float32, backend.device, generator=generator)
    offset, margin = _adjustments(13, backend.device, True, generator)
    hyper = tuple(h.test_values[1] for h in family.hyperparameters)
    grad_loss = torch.randn(4, generator=generator).to(backend.device)
    loss, grad = family.op(ops, "forward")(logits, target, weight, *hyper, IGNORE, True, offset, margin)
    back = family.op(ops, "backward")(logits, target, weight, grad_loss, *hyper, IGNORE, logit_offset=offset,
                                      target_margin=margin)
    z = _adjust_by_hand(logits, target.cpu(), offset, margin).requires_grad_(True)
    named = {h.name: v for h, v in zip(family.hyperparameters, hyper)}
    rows = family.reference_rows(z, target.cpu(), weight.cpu().double(), IGNORE, **named)
    (ref_grad,) = torch.autograd.grad(rows.sum(), z, retain_graph=True)
    (ref_back,) = torch.autograd.grad(rows, z, grad_loss.double().cpu())
    assert_loss_close(loss, rows.detach(), f"{backend.id} {family.name} op loss")
    assert_grad_close(grad, ref_grad, torch.float32, f"{backend.id} {family.name} op grad")
    assert_grad_close(back, ref_back, torch.float32, f"{backend.id} {family.name} op backward")


def test_margin_on_a_confident_row_and_an_ignored_row(backend):
    """LDAM's use: the margin lowers a confident target logit; an ignored row stays exactly 0 whatever the
    offsets (its margin index would be out of range)."""
    logits = torch.tensor([[30.0, 0.0, -1.0, 2.0], [1.0, 2.0, 3.0, 4.0]], device=backend.device)
    target = torch.tensor([0, IGNORE], device=backend.device)
    offset = torch.tensor([0.5, -0.5, 1.0, -1.0], device=backend.device)
    margin = torch.tensor([2.0, 1.0, 0.5, 0.25], device=backend.device)
    for spec in MARGIN_LOSSES:
        loss, grad = loss_and_grad(spec, logits, target, None, torch.ones(2, device=backend.device), backend=backend,
                                   reduction="none")
        adjusted, adjusted_grad = (t.detach() for t in _call_adjusted(backend, spec, logits, target, offset, margin))
        assert adjusted[1] == 0 and (adjusted_grad[1] == 0).all()
        assert adjusted[0] > loss[0], "a margin on the target logit must raise the loss"


def _call_adjusted(backend, spec, logits, target, offset, margin):
    x = logits.detach().requires_grad_(True)
    fn = getattr(cb, spec.function)
    out = fn(x, target, reduction="none", backend=backend.name, logit_offset=offset, target_margin=margin)
    (grad,) = torch.autograd.grad(out.sum(), x)
    return out, grad


# --- helpers ---------------------------------------------------------------------------------------------

def test_logit_adjustment_offsets_from_the_formula():
    counts = [500, 120, 7, 1]
    total = sum(counts)
    for tau in (1.0, 0.5, 0.0):
        expected = torch.tensor([tau * math.log(n / total) for n in counts], dtype=torch.float32)
        got = cb.logit_adjustment_offsets(counts, tau=tau)
        assert got.dtype == torch.float32 and got.shape == (4,)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_ldam_margins_from_the_formula():
    counts = [500, 120, 7, 1]
    fourth = [n ** -0.25 for n in counts]
    expected = torch.tensor([30.0 * 0.5 * f / max(fourth) for f in fourth], dtype=torch.float32)
    got = cb.ldam_margins(counts)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert float(got[-1]) == 15.0  # the rarest class gets scale * max_margin
    torch.testing.assert_close(cb.ldam_margins(counts, max_margin=1.0, scale=1.0), expected / 15.0)


@pytest.mark.parametrize("helper", [cb.logit_adjustment_offsets, cb.ldam_margins])
def test_helpers_refuse_empty_classes_and_bad_counts(helper):
    with pytest.raises(ValueError, match=r"classes \[1\] have 0 samples"):
        helper([3, 0, 2])
    with pytest.raises(ValueError, match="non-negative"):
        helper([3, -1, 2])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        helper([])


def test_helpers_refuse_bad_numbers():
    with pytest.raises(ValueError, match="tau must be a finite number >= 0"):
        cb.logit_adjustment_offsets([3, 2], tau=-1.0)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        cb.ldam_margins([3, 2], scale=0.0)
    with pytest.raises(TypeError, match="max_margin must be a real number"):
        cb.ldam_margins([3, 2], max_margin="0.5")


# --- bad inputs ---------------------------------------------------------------------------------------------

BAD_ADJUSTMENTS = [
    (dict(logit_offset=torch.zeros(4)), ValueError, r"logit_offset must have shape \(C,\) = \(3,\)"),
    (dict(logit_offset=torch.zeros(3, dtype=torch.int64)), TypeError, "logit_offset must be a floating-point tensor"),
    (dict(logit_offset=[0.0, 1.0, 2.0]), TypeError, "logit_offset must be a torch.Tensor"),
    (dict(logit_offset=torch.zeros(3, requires_grad=True)), ValueError, "logit_offset must not require grad"),
    (dict(target_margin=torch.zeros(2)), ValueError, r"target_margin must have shape \(C,\) = \(3,\)"),
    (dict(target_margin=torch.zeros(3, dtype=torch.bool)), TypeError, "target_margin must be a floating-point"),
    (dict(logit_offset=torch.zeros(3, device="meta")), ValueError, "logit_offset is on meta but logits are on cpu"),
]


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
@pytest.mark.parametrize("kwargs,error,message", BAD_ADJUSTMENTS)
def test_bad_adjustments_are_refused_by_name(backend_name, kwargs, error, message):
    if backend_name not in cb.available_backends("cpu"):
        pytest.skip("the C++ extension is not built")
    logits, target, _ = make_inputs(2, 3, torch.float32, "cpu")
    with pytest.raises(error, match=message):
        cb.cb_softmax_cross_entropy(logits, target, backend=backend_name, **kwargs)


def test_target_margin_is_refused_for_the_sigmoid_losses():
    logits, target, _ = make_inputs(2, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match="target_margin applies to the softmax losses"):
        cb.ClassBalancedLoss([3, 2, 1], loss_type="focal", target_margin=torch.zeros(3))
    with pytest.raises(ValueError, match="target_margin applies to the softmax losses"):
        cb.cb_linear_loss(torch.randn(2, 4), torch.randn(3, 4), target, loss_type="sigmoid",
                          target_margin=torch.zeros(3))
    assert "target_margin" not in cb.cb_focal_loss.__code__.co_varnames


# --- module, fused linear ------------------------------------------------------------------------------------

def test_module_holds_the_adjustments_as_buffers_and_switches_beta():
    counts = [400, 60, 9, 2]
    offset, margin = cb.logit_adjustment_offsets(counts), cb.ldam_margins(counts, scale=4.0)
    module = cb.ClassBalancedLoss(counts, loss_type="softmax_focal", beta=0.0, logit_offset=offset,
                                  target_margin=margin, backend="reference")
    assert set(module.state_dict()) == {"class_weight", "logit_offset", "target_margin"}
    torch.testing.assert_close(module.class_weight, torch.ones(4))  # beta = 0: the plain loss
    logits, target, _ = make_inputs(6, 4, torch.float32, "cpu", ignore_frac=0.0)
    expected = cb.cb_softmax_focal_loss(logits, target, torch.ones(4), logit_offset=offset, target_margin=margin,
                                        backend="reference")
    torch.testing.assert_close(module(logits, target), expected)
    weight_buffer = module.class_weight
    module.set_beta(0.999)  # deferred re-weighting: the class-balanced weights from now on, in the same buffer
    assert module.class_weight is weight_buffer and module.beta == 0.999
    torch.testing.assert_close(module.class_weight, cb.class_balanced_weights(counts, 0.999))
    expected = cb.cb_softmax_focal_loss(logits, target, cb.class_balanced_weights(counts, 0.999), logit_offset=offset,
                                        target_margin=margin, backend="reference")
    torch.testing.assert_close(module(logits, target), expected)
    assert "logit_offset=(C,)" in repr(module) and "target_margin=(C,)" in repr(module)


def test_module_without_adjustments_keeps_its_state_dict():
    module = cb.ClassBalancedLoss([3, 2, 1], loss_type="softmax")
    assert set(module.state_dict()) == {"class_weight"}
    module.to(torch.float16)
    module.set_beta(0.9)  # the counts are kept in float64 whatever .to() did to the buffers
    torch.testing.assert_close(module.class_weight, cb.class_balanced_weights([3, 2, 1], 0.9).half())


@pytest.mark.parametrize("loss_type", ["softmax", "softmax_focal", "focal"])
def test_fused_linear_applies_the_adjustments(loss_type):
    backend = "cpu" if "cpu" in cb.available_backends("cpu") else "reference"
    generator = torch.Generator().manual_seed(5)
    hidden, weight, bias = (torch.randn(9, 6, generator=generator), torch.randn(11, 6, generator=generator),
                            torch.randn(11, generator=generator))
    target = torch.randint(0, 11, (9,), generator=generator)
    offset = torch.randn(11, generator=generator)
    margin = torch.rand(11, generator=generator) if loss_type != "focal" else None
    params = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    fused = cb.cb_linear_loss(*params[:2], target, None, params[2], loss_type, chunk_size=4, backend=backend,
                              logit_offset=offset, target_margin=margin)
    fused.backward()
    plain = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    spec = losses.loss(loss_type)
    extra = {} if margin is None else {"target_margin": margin}
    unfused = getattr(cb, spec.function)(torch.nn.functional.linear(*plain), target, backend=backend,
                                         logit_offset=offset, **extra)
    unfused.backward()
    torch.testing.assert_close(fused, unfused)
    for a, b in zip(params, plain):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
