"""sample_weight (N,) and normalizer ("mean"'s divisor) on every loss and backend pair, the ops and the module.

The oracle is written from the definitions, not from reference.weighted_rows or _reduction.reduce_rows: the
loss's reference rows (reduction "none", float64, no sample weights) times sample_weight[i], then summed and
divided by hand: by the normalizer when one is given, else by the number of non-ignored rows (at least 1). Its
gradient comes from autograd through that expression, so a kernel that dropped the weight from the gradient,
applied it twice, or divided by the wrong count fails.
"""
import math

import pytest
import torch

import cbkernels as cb
from cases import (DTYPES, REDUCTIONS, assert_grad_close, assert_loss_close, loss_cases, make_inputs,
                   weighted_reduction_by_hand)
from cbkernels import losses

IGNORE = -100


def _expected(spec, hyper, logits, target, weight, sample_weight, reduction, normalizer, upstream):
    """(loss, d(upstream . loss)/d logits) from the definitions, in float64 on the CPU."""
    z = logits.detach().double().cpu().requires_grad_(True)
    target = target.cpu()
    rows = spec.reference(z, target, None if weight is None else weight.double().cpu(), "none", IGNORE, **hyper)
    out = weighted_reduction_by_hand(rows, target, IGNORE, sample_weight.cpu(), reduction, normalizer)
    (grad,) = torch.autograd.grad(out, z, upstream.double().cpu().reshape(out.shape))
    return out.detach(), grad


def _normalizers(reduction, device):
    """None, and for "mean" a number and a 0-d tensor on the logits' device."""
    return [None] if reduction != "mean" else [None, 2.5, torch.tensor(7.0, device=device)]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec,hyper", loss_cases(full=False))
def test_sample_weight_and_normalizer_on_every_loss(backend, spec, hyper, dtype, reduction):
    num_classes = 31 if backend.max_elements < 10_000 else 1031
    generator = torch.Generator().manual_seed(11)
    logits, target, weight = make_inputs(6, num_classes, dtype, backend.device, generator=generator)
    # Weights of either sign and 0 (a dropped row): the kernels use them as given.
    sample_weight = (torch.randn(6, generator=generator) * 2).to(backend.device)
    sample_weight[1] = 0.0
    upstream = torch.randn(6 if reduction == "none" else 1, generator=generator, dtype=torch.float64)
    fn = getattr(cb, spec.function)
    for normalizer in _normalizers(reduction, backend.device):
        x = logits.detach().requires_grad_(True)
        out = fn(x, target, weight, reduction=reduction, backend=backend.name, sample_weight=sample_weight,
                 normalizer=normalizer, **hyper)
        (grad,) = torch.autograd.grad(out, x, upstream.to(out.dtype).to(out.device).reshape(out.shape))
        expected, expected_grad = _expected(spec, hyper, logits, target, weight, sample_weight, reduction,
                                            normalizer, upstream)
        what = f"{backend.id} {spec.name} {dtype} {reduction} normalizer={normalizer}"
        assert_loss_close(out, expected, f"{what} loss")
        assert_grad_close(grad, expected_grad, dtype, f"{what} grad")


@pytest.mark.parametrize("spec,hyper", loss_cases(full=False))
def test_ignored_rows_stay_zero_and_nan_weights_give_nan(backend, spec, hyper):
    """An ignored row is exactly 0 in loss and gradient even with a NaN or inf weight; a NaN weight on a
    counted row makes that row NaN (NaN in, NaN out), never a silent 0."""
    logits, target, weight = make_inputs(4, 9, torch.float32, backend.device, ignore_frac=0.0)
    target[1] = target[2] = IGNORE
    sample_weight = torch.tensor([1.5, float("nan"), float("inf"), float("nan")], device=backend.device)
    x = logits.detach().requires_grad_(True)
    out = getattr(cb, spec.function)(x, target, weight, reduction="none", backend=backend.name,
                                     sample_weight=sample_weight, **hyper)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert out[1] == 0 and out[2] == 0 and (grad[1:3] == 0).all()
    assert torch.isfinite(out[0]) and torch.isnan(out[3])


def test_every_op_takes_sample_weight(backend):
    """The op contract: the forward and backward ops of every family take sample_weight (N,) after the logit
    adjustments, and multiply the row's loss and gradient by it."""
    if not backend.is_kernel:
        pytest.skip("the reference backend has no ops")
    ops = getattr(torch.ops, backend.record.namespace)
    generator = torch.Generator().manual_seed(3)
    logits, target, weight = make_inputs(4, 13, torch.float32, backend.device, generator=generator)
    sample_weight = (torch.rand(4, generator=generator) * 3).to(backend.device)
    grad_loss = torch.randn(4, generator=generator).to(backend.device)
    for family in losses.FAMILIES:
        hyper = tuple(h.test_values[1] for h in family.hyperparameters)
        loss, grad = family.op(ops, "forward")(logits, target, weight, *hyper, IGNORE, True,
                                               sample_weight=sample_weight)
        back = family.op(ops, "backward")(logits, target, weight, grad_loss, *hyper, IGNORE, None, None,
                                          sample_weight)
        z = logits.detach().double().cpu().requires_grad_(True)
        named = {h.name: v for h, v in zip(family.hyperparameters, hyper)}
        rows = family.reference_rows(z, target.cpu(), weight.cpu().double(), IGNORE, **named)
        rows = rows * sample_weight.double().cpu()
        (ref_grad,) = torch.autograd.grad(rows.sum(), z, retain_graph=True)
        (ref_back,) = torch.autograd.grad(rows, z, grad_loss.double().cpu())
        assert_loss_close(loss, rows.detach(), f"{backend.id} {family.name} op loss")
        assert_grad_close(grad, ref_grad, torch.float32, f"{backend.id} {family.name} op grad")
        assert_grad_close(back, ref_back, torch.float32, f"{backend.id} {family.name} op backward")


def test_normalizer_replaces_the_row_count_and_ones_change_nothing(backend):
    """With weights of 1 and the normalizer set to the default divisor, the result is the plain mean's; a
    normalizer d scales the mean by count / d."""
    logits, target, weight = make_inputs(8, 17, torch.float32, backend.device)
    count = int((target != IGNORE).sum())
    plain = cb.cb_focal_loss(logits, target, weight, backend=backend.name)
    ones = torch.ones(8, device=backend.device)
    same = cb.cb_focal_loss(logits, target, weight, backend=backend.name, sample_weight=ones, normalizer=count)
    torch.testing.assert_close(same, plain, rtol=1e-6, atol=0)
    halved = cb.cb_focal_loss(logits, target, weight, backend=backend.name, normalizer=2 * count)
    torch.testing.assert_close(halved, plain / 2, rtol=1e-6, atol=0)


def test_module_forward_takes_sample_weight_and_normalizer():
    counts = [40, 12, 3]
    module = cb.ClassBalancedLoss(counts, loss_type="softmax", beta=0.99, backend="reference")
    logits, target, _ = make_inputs(5, 3, torch.float32, "cpu")
    sample_weight = torch.rand(5) + 0.5
    normalizer = torch.tensor(4.0)
    expected = cb.cb_softmax_cross_entropy(logits, target, module.class_weight, sample_weight=sample_weight,
                                           normalizer=normalizer, backend="reference")
    torch.testing.assert_close(module(logits, target, sample_weight=sample_weight, normalizer=normalizer), expected)
    torch.testing.assert_close(module(logits, target, sample_weight), cb.cb_softmax_cross_entropy(
        logits, target, module.class_weight, sample_weight=sample_weight, backend="reference"))


def test_a_device_normalizer_stays_a_tensor_under_compile():
    """A 0-d tensor normalizer is divided by on its device, never read on the host: a fullgraph compile of the
    call (which a host read would break) gives the eager result, and a new value needs no recompile."""
    backend = "cpu" if "cpu" in cb.available_backends("cpu") else "reference"
    logits, target, weight = make_inputs(6, 11, torch.float32, "cpu")
    sample_weight = torch.rand(6)

    def step(x, normalizer):
        return cb.cb_softmax_focal_loss(x, target, weight, backend=backend, sample_weight=sample_weight,
                                        normalizer=normalizer)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for value in (3.0, 5.0):
        normalizer = torch.tensor(value)
        torch.testing.assert_close(compiled(logits, normalizer), step(logits, normalizer))


# --- bad inputs ---------------------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    (dict(sample_weight=torch.ones(3)), ValueError, r"sample_weight must have shape \(N,\) = \(2,\)"),
    (dict(sample_weight=torch.ones(2, dtype=torch.int64)), TypeError, "sample_weight must be a floating-point"),
    (dict(sample_weight=[1.0, 2.0]), TypeError, "sample_weight must be a torch.Tensor"),
    (dict(sample_weight=torch.ones(2, requires_grad=True)), ValueError, "sample_weight must not require grad"),
    (dict(sample_weight=torch.ones(2, device="meta")), ValueError, "sample_weight is on meta but logits are on cpu"),
    (dict(normalizer=2.0, reduction="sum"), ValueError, "normalizer applies to reduction='mean' only"),
    (dict(normalizer=2.0, reduction="none"), ValueError, "normalizer applies to reduction='mean' only"),
    (dict(normalizer=0.0), ValueError, "normalizer must be a finite number > 0"),
    (dict(normalizer=-3), ValueError, "normalizer must be a finite number > 0"),
    (dict(normalizer=math.nan), ValueError, "normalizer must be a finite number > 0"),
    (dict(normalizer=math.inf), ValueError, "normalizer must be a finite number > 0"),
    (dict(normalizer=True), ValueError, "normalizer must be a finite number > 0"),
    (dict(normalizer="2"), ValueError, "normalizer must be a finite number > 0"),
    (dict(normalizer=torch.ones(1)), ValueError, "normalizer must be a number or a 0-d real tensor"),
    (dict(normalizer=torch.tensor(True)), ValueError, "normalizer must be a number or a 0-d real tensor"),
    (dict(normalizer=torch.tensor(2.0, requires_grad=True)), ValueError, "normalizer must not require grad"),
    (dict(normalizer=torch.tensor(2.0, device="meta")), ValueError, "normalizer is on meta but logits are on cpu"),
]


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
@pytest.mark.parametrize("kwargs,error,message", BAD_ARGUMENTS)
def test_bad_sample_weight_and_normalizer_are_refused_by_name(backend_name, kwargs, error, message):
    if backend_name not in cb.available_backends("cpu"):
        pytest.skip("the C++ extension is not built")
    logits, target, _ = make_inputs(2, 3, torch.float32, "cpu")
    with pytest.raises(error, match=message):
        cb.cb_sigmoid_cross_entropy(logits, target, backend=backend_name, **kwargs)
