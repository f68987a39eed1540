"""The C++ backends' whole-call ops, `cbkernels::<family>_loss` (csrc/common/loss_function.h), which an eager
public call takes instead of functional.py's Python path: same rows, same gradients, bit for bit.

The Python path is spelled out here from functional.py's own pieces (check_inputs, kernel_rows, sum), as
torch.compile traces it, so that each comparison is against the path the op replaces, not against itself.
Tolerances are zero: the op calls the same kernels through the same ATen reductions in the same order.
Speed is the benchmark's business (`python -m cbkernels bench --preset overhead`), not a test's.
"""
from __future__ import annotations

import pytest
import torch

from cases import DTYPES, REDUCTIONS, call, loss_cases, make_inputs
from cbkernels import _backends, _checks, _ops, _reduction, functional

_C_BACKENDS = [pytest.param(name, marks=[pytest.mark.gpu] if name == "cuda" else [], id=name)
               for name in ("cpu", "cuda")]


def _require(name):
    reason = _backends.unavailable_reason(name, torch.device(name))
    if reason is not None:
        pytest.skip(reason)


def _python_path(spec, hyper, x, target, weight, reduction, strategy, sample_weight=None, normalizer=None,
                 weighting="row"):
    """functional.apply_loss after its whole-call shortcut, for a kernel backend."""
    record = _backends.get("cpu" if x.is_cpu else "cuda")
    target, weight = _checks.check_inputs(x, target, weight)
    weight, element_weight = _reduction.split_weighting(weight, weighting)
    with_grad = torch.is_grad_enabled() and x.requires_grad and strategy == "fused"
    rows = functional.kernel_rows(record, spec, x, target, weight, spec.kernel_hyperparameters(hyper), -100,
                                  reduction, with_grad, sample_weight=sample_weight, normalizer=normalizer,
                                  element_weight=element_weight)
    return rows if reduction == "none" else rows.sum()


def _loss_and_grads(fn, logits, upstreams):
    """The loss and d(upstream . loss)/d logits for each upstream, through one forward per upstream."""
    out = []
    for upstream in upstreams:
        x = logits.detach().requires_grad_(True)
        loss = fn(x)
        (grad,) = torch.autograd.grad(loss, x, upstream.reshape(loss.shape))
        out.append((loss.detach(), grad))
    return out


@pytest.mark.parametrize("name", _C_BACKENDS)
@pytest.mark.parametrize("strategy", ["fused", "recompute"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighted", [True, False], ids=["weights", "no_weights"])
@pytest.mark.parametrize("spec, hyper", loss_cases(full=False))
def test_whole_call_equals_python_path_bit_for_bit(name, strategy, reduction, dtype, weighted, spec, hyper,
                                                   monkeypatch):
    _require(name)
    monkeypatch.setenv("CBKERNELS_BACKWARD", strategy)
    logits, target, weight = make_inputs(13, 37, dtype, name, weighted=weighted)
    n = logits.shape[0]
    # An upstream gradient of exactly 1 (loss.backward(): the fused backward's skip), and a random one.
    upstreams = [torch.ones(n if reduction == "none" else (), device=name),
                 torch.rand(n if reduction == "none" else (), device=name) + 0.5]
    whole = _loss_and_grads(lambda x: call(spec, x, target, weight, backend=name, reduction=reduction,
                                           hyper=hyper), logits, upstreams)
    python = _loss_and_grads(lambda x: _python_path(spec, hyper, x, target, weight, reduction, strategy),
                             logits, upstreams)
    for (loss_w, grad_w), (loss_p, grad_p) in zip(whole, python):
        assert loss_w.dtype == loss_p.dtype and grad_w.dtype == grad_p.dtype
        torch.testing.assert_close(loss_w, loss_p, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(grad_w, grad_p, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", _C_BACKENDS)
@pytest.mark.parametrize("strategy", ["fused", "recompute"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("spec, hyper", loss_cases(full=False))
def test_whole_call_with_sample_weight_and_normalizer_bit_for_bit(name, strategy, reduction, spec, hyper,
                                                                  monkeypatch):
    """The same with sample weights and, for "mean", a number as normalizer (the op's `float? normalizer`)."""
    _require(name)
    monkeypatch.setenv("CBKERNELS_BACKWARD", strategy)
    logits, target, weight = make_inputs(13, 37, torch.float32, name)
    sample_weight = torch.rand(13, device=name) * 3 - 1
    normalizer = 6.5 if reduction == "mean" else None
    upstreams = [torch.ones(13 if reduction == "none" else (), device=name),
                 torch.rand(13 if reduction == "none" else (), device=name) + 0.5]
    fn = getattr(functional, spec.function)
    whole = _loss_and_grads(lambda x: fn(x, target, weight, reduction=reduction, backend=name,
                                         sample_weight=sample_weight, normalizer=normalizer, **hyper),
                            logits, upstreams)
    python = _loss_and_grads(lambda x: _python_path(spec, hyper, x, target, weight, reduction, strategy,
                                                    sample_weight, normalizer), logits, upstreams)
    for (loss_w, grad_w), (loss_p, grad_p) in zip(whole, python):
        torch.testing.assert_close(loss_w, loss_p, rtol=0, atol=0)
        torch.testing.assert_close(grad_w, grad_p, rtol=0, atol=0)


@pytest.mark.parametrize("name", _C_BACKENDS)
@pytest.mark.parametrize("strategy", ["fused", "recompute"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("spec, hyper", loss_cases(full=False))
def test_whole_call_with_dense_targets_and_element_weighting_bit_for_bit(name, strategy, reduction, spec, hyper,
                                                                         monkeypatch):
    """The same with dense (N, C) targets and weighting="element" (the op's element_weight), with and without
    class weights: the "mean" folding into the element weights included."""
    _require(name)
    monkeypatch.setenv("CBKERNELS_BACKWARD", strategy)
    logits, index, weight = make_inputs(13, 37, torch.float32, name)
    soft = torch.rand(13, 37, device=name)
    fn = getattr(functional, spec.function)
    upstreams = [torch.ones(13 if reduction == "none" else (), device=name),
                 torch.rand(13 if reduction == "none" else (), device=name) + 0.5]
    for target in (soft, index):
        for weighting in ("row", "element"):
            for w in (weight, None):
                whole = _loss_and_grads(lambda x: fn(x, target, w, reduction=reduction, backend=name,
                                                     weighting=weighting, **hyper), logits, upstreams)
                python = _loss_and_grads(lambda x: _python_path(spec, hyper, x, target, w, reduction, strategy,
                                                                weighting=weighting), logits, upstreams)
                for (loss_w, grad_w), (loss_p, grad_p) in zip(whole, python):
                    torch.testing.assert_close(loss_w, loss_p, rtol=0, atol=0)
                    torch.testing.assert_close(grad_w, grad_p, rtol=0, atol=0)


def test_eager_call_takes_the_whole_call_op(monkeypatch):
    """The shortcut is taken (the test above would pass vacuously if apply_loss never reached the op)."""
    calls = []
    ops = dict(_ops.LOSS_OPS)
    for family_name, op in ops.items():
        monkeypatch.setitem(_ops.LOSS_OPS, family_name, lambda *args, _op=op: calls.append(args) or _op(*args))
    logits, target, weight = make_inputs(4, 9, torch.float32, "cpu")
    for spec, hyper in [p.values for p in loss_cases(full=False)]:
        call(spec, logits, target, weight, backend="cpu", hyper=hyper)
        getattr(functional, spec.function)(logits, target, weight, backend="cpu", sample_weight=torch.rand(4),
                                           normalizer=2, **hyper)
        getattr(functional, spec.function)(logits, torch.rand(4, 9), weight, backend="cpu", weighting="element",
                                           **hyper)
    assert len(calls) == 3 * len(loss_cases(full=False))


@pytest.mark.parametrize("spec, hyper", loss_cases(full=False))
def test_whole_call_without_autograd(spec, hyper):
    """No graph to build (no_grad, inference mode, an input that needs no grad): the same loss."""
    logits, target, weight = make_inputs(6, 11, torch.float32, "cpu")
    expected = call(spec, logits.clone().requires_grad_(True), target, weight, backend="cpu", hyper=hyper).detach()
    with torch.no_grad():
        no_grad = call(spec, logits.clone().requires_grad_(True), target, weight, backend="cpu", hyper=hyper)
    with torch.inference_mode():
        inference = call(spec, logits.clone(), target.clone(), weight.clone(), backend="cpu", hyper=hyper)
    plain = call(spec, logits, target, weight, backend="cpu", hyper=hyper)
    for got in (no_grad, inference, plain):
        assert not got.requires_grad
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("spec, hyper", loss_cases(full=False))
def test_fused_second_backward_raises_and_recompute_allows_it(spec, hyper, monkeypatch):
    logits, target, weight = make_inputs(5, 7, torch.float32, "cpu")
    for strategy in ("fused", "recompute"):
        monkeypatch.setenv("CBKERNELS_BACKWARD", strategy)
        x = logits.clone().requires_grad_(True)
        loss = call(spec, x, target, weight, backend="cpu", hyper=hyper)
        (first,) = torch.autograd.grad(loss, x, retain_graph=True)
        if strategy == "fused":
            with pytest.raises(RuntimeError, match="CBKERNELS_BACKWARD=recompute"):
                torch.autograd.grad(loss, x)
        else:
            (second,) = torch.autograd.grad(loss, x)
            torch.testing.assert_close(second, first, rtol=0, atol=0)


def _op_args(family, x, target, weight, reduction, fused):
    hyper = tuple(h.test_values[-1] for h in family.hyperparameters)
    return (x, target, weight, *hyper, -100, reduction, fused)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family_name", sorted(_ops.LOSS_OPS) or ["(extension not built)"])
def test_opcheck_whole_call_ops(family_name, dtype, reduction):
    if family_name not in _ops.LOSS_OPS:
        pytest.skip("the C++ extension is not built")
    from cbkernels.losses import family as family_named
    family = family_named(family_name)
    logits, target, weight = make_inputs(5, 19, dtype, "cpu")
    for fused in (True, False):
        for w in (weight, None):
            x = logits.clone().requires_grad_(True)
            torch.library.opcheck(family.op(torch.ops.cbkernels, "loss").default,
                                  _op_args(family, x, target, w, reduction, fused))
        x = logits.clone().requires_grad_(True)  # the optional inputs: sample weights, the normalizer
        extra = {"sample_weight": torch.rand(5), "normalizer": 3.0 if reduction == "mean" else None}
        torch.library.opcheck(family.op(torch.ops.cbkernels, "loss").default,
                              _op_args(family, x, target, weight, reduction, fused), extra)
        x = logits.clone().requires_grad_(True)  # dense targets and element weights
        torch.library.opcheck(family.op(torch.ops.cbkernels, "loss").default,
                              _op_args(family, x, torch.rand(5, 19, dtype=dtype), weight, reduction, fused),
                              {"element_weight": weight})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(5,), ()], ids=["per_row", "one_value"])
def test_opcheck_scale_rows_unless_one(dtype, shape):
    if not _ops.LOSS_OPS:
        pytest.skip("the C++ extension is not built")
    grad = torch.randn(5, 19, dtype=dtype)
    torch.library.opcheck(torch.ops.cbkernels.scale_rows_unless_one_.default, (grad, torch.rand(shape) + 0.5))


@pytest.mark.parametrize("name", _C_BACKENDS)
@pytest.mark.parametrize("c", [10, 8143], ids=["C=10", "C=8143"])  # 8143: no row starts 16-byte aligned
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_rows_unless_one_is_torch_mul_rounded_once(name, c, dtype):
    """grad[i] *= g[i] as torch.mul(grad, g[:, None], out=grad) forms it: fp32 product, one rounding; a
    factor of exactly 1 leaves its row as it is, a NaN factor reaches it."""
    _require(name)
    grad = torch.randn(6, c, dtype=dtype, device=name)
    for factor in (torch.rand(6) * 3, torch.tensor(0.37), torch.tensor(1.0),
                   torch.tensor([1.0, 2.0, 1.0, float("nan"), 1.0, -1.0])):
        factor = factor.to(name)
        expected = torch.mul(grad, factor.reshape(-1, 1)).to(dtype)
        got = grad.clone()
        torch.ops.cbkernels.scale_rows_unless_one_(got, factor)
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
