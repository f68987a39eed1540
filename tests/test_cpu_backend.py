"""The C++ CPU kernels (csrc/cpu/) against reference.py in float64, through the public API and the raw ops.

Loss/gradient comparisons go through tests/backend_cases.py (one tolerance table for every backend);
the rest checks what only this backend promises: its own target check, the ISA variants, opcheck and
torch.compile of the registered ops, NaN propagation, N = 0.
"""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch._dynamo.exc

import cbkernels
from cbkernels import _ops, reference

from backend_cases import assert_matches_reference, loss_and_grad, make_inputs, run_under_cpu_capability

pytestmark = pytest.mark.skipif(not _ops.extension_has_kernel("CPU"),
                                reason=f"cbkernels._C has no CPU kernels ({_ops._C_IMPORT_ERROR})")

ops = torch.ops.cbkernels
LOSSES = [("softmax", 0.0), ("softmax", 0.1), ("focal", 0.0), ("focal", 0.5), ("focal", 1.0), ("focal", 2.0),
          ("focal", 3.7)]
LOSS_IDS = [f"{name}-{param}" for name, param in LOSSES]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=["fused", "recompute"])
def strategy(request, monkeypatch):
    monkeypatch.setenv("CBKERNELS_BACKWARD", request.param)
    return request.param


@pytest.mark.parametrize("loss,param", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_matches_reference(loss, param, dtype, reduction, strategy):
    # C = 301: 18 full AVX-512 vectors and a 13-element tail; the target sometimes lands in the tail.
    logits, target, weight = make_inputs(37, 301, dtype, "cpu")
    assert_matches_reference("cpu", loss, logits, target, weight, reduction=reduction, param=param)


@pytest.mark.parametrize("loss,param", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_unit_upstream_grad(loss, param, dtype, reduction, strategy):
    # loss.backward(): the fused backward returns the forward's buffer unscaled ("mean" folded 1/count
    # into the class weights), so the forward alone must have written the final gradient.
    logits, target, weight = make_inputs(37, 301, dtype, "cpu")
    assert_matches_reference("cpu", loss, logits, target, weight, reduction=reduction, param=param,
                             unit_upstream=True)


@pytest.mark.parametrize("loss,param", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (64, 8142), (5, 70001)], ids=str)
def test_shapes(loss, param, shape):
    logits, target, weight = make_inputs(*shape, torch.float32, "cpu")
    if loss == "softmax" and shape[1] == 1:
        # One class: the loss and gradient are identically 0 (lse = z_y, p_y = 1). The kernel gives exact
        # zeros; the float64 reference gives ~1e-17 of roundoff, which the helper's purely relative
        # tolerance (scaled by max |reference| ~ 1e-17) cannot absorb, so compare with zero here.
        out, grad = loss_and_grad(loss, logits, target, weight, torch.ones(1), backend="cpu", reduction="none",
                                  param=param)
        assert (out == 0).all() and (grad == 0).all()
        return
    assert_matches_reference("cpu", loss, logits, target, weight, reduction="none", param=param)


@pytest.mark.parametrize("loss,param", LOSSES, ids=LOSS_IDS)
def test_int32_targets_unweighted(loss, param):
    logits, target, weight = make_inputs(20, 53, torch.float32, "cpu", target_dtype=torch.int32, weighted=False)
    assert_matches_reference("cpu", loss, logits, target, weight, reduction="mean", param=param)


@pytest.mark.parametrize("loss,param", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_upstream_grad(loss, param, reduction, strategy):
    logits, target, weight = make_inputs(24, 97, torch.float32, "cpu")
    assert_matches_reference("cpu", loss, logits, target, weight, reduction=reduction, param=param,
                             upstream_scale=7.5)


@pytest.mark.parametrize("loss,param", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extreme_logits(loss, param, dtype, strategy):
    # |z| up to ~4e4: exp(-z) of a naive sigmoid and exp(z) of a naive softmax overflow in fp32.
    logits, target, weight = make_inputs(16, 333, dtype, "cpu", scale=1e4)
    assert_matches_reference("cpu", loss, logits, target, weight, reduction="none", param=param)


@pytest.mark.parametrize("loss,param", LOSSES, ids=LOSS_IDS)
def test_zero_logits(loss, param):
    # u = 0 exactly: the branch point of |u| and max(u, 0); p = q = 1/2 on both sides.
    logits = torch.zeros(6, 40)
    target = torch.tensor([0, 39, 5, -100, 17, 3])
    assert_matches_reference("cpu", loss, logits, target, torch.rand(40) + 0.5, reduction="none", param=param)


@pytest.mark.parametrize("loss,param", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noncontiguous_logits(loss, param, dtype, strategy):
    logits, target, weight = make_inputs(19, 211, dtype, "cpu", noncontiguous=True)  # column stride 2
    assert logits.stride(1) != 1
    assert_matches_reference("cpu", loss, logits, target, weight, reduction="mean", param=param)
    logits, target, weight = make_inputs(40, 211, dtype, "cpu")
    rows, row_target = logits[::2], target[::2].clone()  # row stride 2 * C, column stride 1: read in place
    assert rows.stride() == (422, 1)
    assert_matches_reference("cpu", loss, rows, row_target, weight, reduction="sum", param=param)


@pytest.mark.parametrize("loss,param", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("ignore_index", [-1, 4])
def test_ignore_index(loss, param, ignore_index):
    # ignore_index = 4 is also a class index: rows with target 4 are ignored, not trained on class 4.
    logits, target, weight = make_inputs(30, 64, torch.float32, "cpu", ignore_index=ignore_index, ignore_frac=0.4)
    assert (target == ignore_index).any()
    assert_matches_reference("cpu", loss, logits, target, weight, reduction="mean", param=param,
                             ignore_index=ignore_index)


@pytest.mark.parametrize("loss,param", LOSSES, ids=LOSS_IDS)
def test_all_rows_ignored(loss, param, strategy):
    logits = torch.randn(4, 9, requires_grad=True)
    target = torch.full((4,), -100)
    out = _call(loss, param, logits, target, reduction="mean")
    out.backward()
    assert out.item() == 0.0 and (logits.grad == 0).all()


def _call(loss, param, logits, target, weight=None, reduction="none"):
    if loss == "softmax":
        return cbkernels.cb_softmax_cross_entropy(logits, target, weight, reduction, label_smoothing=param,
                                                  backend="cpu")
    return cbkernels.cb_focal_loss(logits, target, weight, param, reduction, backend="cpu")


@pytest.mark.parametrize("loss,param", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_row_gives_nan_row(loss, param, dtype, strategy):
    logits, target, weight = make_inputs(6, 50, dtype, "cpu", ignore_frac=0.0)
    target[4] = -100
    logits[1, 7] = float("nan")  # a valid row: NaN loss and NaN gradient throughout the row
    logits[2, 0] = float("nan")  # the first element: must survive the running maximum
    logits[4, 3] = float("nan")  # an ignored row: loss 0 and gradient 0 regardless
    x = logits.clone().requires_grad_(True)
    out = _call(loss, param, x, target, weight)
    out.backward(torch.ones_like(out))
    nan_rows = torch.tensor([False, True, True, False, False, False])
    assert torch.isnan(out[nan_rows]).all()
    if loss == "softmax":  # every p_c depends on every logit through lse
        assert torch.isnan(x.grad[nan_rows].float()).all()
    else:  # the C binary terms are independent: as in the reference, only the NaN entries' gradients are NaN
        assert torch.equal(torch.isnan(x.grad[nan_rows].float()), torch.isnan(logits[nan_rows].float()))
    assert out[4] == 0 and (x.grad[4] == 0).all()
    clean = ~nan_rows
    assert torch.isfinite(out[clean]).all() and torch.isfinite(x.grad[clean].float()).all()


@pytest.mark.parametrize("family", ["sigmoid_focal", "softmax_ce"])
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32], ids=str)
def test_bad_target_raises_naming_row_and_value(family, target_dtype):
    logits = torch.randn(5, 7)
    for bad in (7, -3):
        target = torch.tensor([1, 2, bad, 0, -100], dtype=target_dtype)
        with pytest.raises(RuntimeError, match=rf"target\[2\] = {bad} .*\[0, 7\)"):
            getattr(ops, f"{family}_forward")(logits, target, None, 0.5 if family == "sigmoid_focal" else 0.0,
                                              -100, True)
        with pytest.raises(RuntimeError, match=rf"target\[2\] = {bad}"):
            getattr(ops, f"{family}_backward")(logits, target, None, torch.ones(5), 0.0, -100)


def test_bad_target_raises_through_public_api():
    with pytest.raises(RuntimeError, match=r"target\[1\] = 9"):
        cbkernels.cb_focal_loss(torch.randn(3, 9), torch.tensor([0, 9, 2]), backend="cpu")


def _fwd_args(family, logits, target, weight):
    return (logits, target, weight, 0.5 if family == "sigmoid_focal" else 0.1, -100)


@pytest.mark.parametrize("family", ["sigmoid_focal", "softmax_ce"])
def test_op_argument_checks(family):
    fwd = getattr(ops, f"{family}_forward")
    bwd = getattr(ops, f"{family}_backward")
    logits, target = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    param = 0.5 if family == "sigmoid_focal" else 0.1
    with pytest.raises(RuntimeError, match="logits must have shape"):
        fwd(logits[0], target, None, param, -100, False)
    with pytest.raises(RuntimeError, match="logits must be float32"):
        fwd(logits.double(), target, None, param, -100, False)
    with pytest.raises(RuntimeError, match="target must be int64 or int32"):
        fwd(logits, target.float(), None, param, -100, False)
    with pytest.raises(RuntimeError, match=r"target must have shape \(N,\)"):
        fwd(logits, target[:3], None, param, -100, False)
    with pytest.raises(RuntimeError, match=r"class_weight must have shape \(C,\)"):
        fwd(logits, target, torch.ones(5), param, -100, False)
    with pytest.raises(RuntimeError, match="class_weight must be float32"):
        fwd(logits, target, torch.ones(6, dtype=torch.float64), param, -100, False)
    with pytest.raises(RuntimeError, match=r"grad_loss must have shape \(N,\)"):
        bwd(logits, target, None, torch.ones(3), param, -100)
    with pytest.raises(RuntimeError, match="grad_loss must be float32"):
        bwd(logits, target, None, torch.ones(4, dtype=torch.float64), param, -100)
    bad_param = (r"gamma must be a finite number >= 0", -1.0) if family == "sigmoid_focal" else \
        (r"label_smoothing must be in \[0, 1\]", 1.5)
    with pytest.raises(RuntimeError, match=bad_param[0]):
        fwd(logits, target, None, bad_param[1], -100, False)


@pytest.mark.parametrize("family", ["sigmoid_focal", "softmax_ce"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_batch(family, dtype):
    logits, target = torch.empty(0, 5, dtype=dtype), torch.empty(0, dtype=torch.long)
    loss, grad = getattr(ops, f"{family}_forward")(*_fwd_args(family, logits, target, None), True)
    assert loss.shape == (0,) and loss.dtype == torch.float32 and grad.shape == (0, 5) and grad.dtype == dtype
    loss, grad = getattr(ops, f"{family}_forward")(*_fwd_args(family, logits, target, None), False)
    assert loss.shape == (0,) and grad.shape == (0,) and grad.dtype == dtype
    grad = getattr(ops, f"{family}_backward")(logits, target, None, torch.empty(0), 0.0, -100)
    assert grad.shape == (0, 5)
    x = logits.clone().requires_grad_(True)
    out = _call("softmax" if family == "softmax_ce" else "focal", 0.0, x, target, reduction="sum")
    out.backward()
    assert out.item() == 0.0 and x.grad.shape == (0, 5)


def test_forward_without_grad_writes_no_gradient():
    logits, target, weight = make_inputs(4, 10, torch.bfloat16, "cpu")
    for family in ("sigmoid_focal", "softmax_ce"):
        loss, grad = getattr(ops, f"{family}_forward")(*_fwd_args(family, logits, target, weight), False)
        assert loss.shape == (4,) and grad.shape == (0,) and grad.dtype == torch.bfloat16


@pytest.mark.parametrize("loss,param", [("softmax", 0.0), ("focal", 0.5)])
def test_fused_backward_allocates_no_logits_sized_tensor(loss, param, monkeypatch):
    """The fused backward scales the forward's gradient buffer in place and returns it: no N x C tensor is
    allocated in backward (neither the product nor a zero-filled gradient for the op's second output)."""
    monkeypatch.setenv("CBKERNELS_BACKWARD", "fused")
    logits, target, weight = make_inputs(64, 1000, torch.float32, "cpu")
    x = logits.clone().requires_grad_(True)
    out = _call(loss, param, x, target, weight, reduction="mean")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        (grad,) = torch.autograd.grad(out, x)
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert 0 < largest < logits.numel() * logits.element_size() // 4
    monkeypatch.setenv("CBKERNELS_BACKWARD", "recompute")
    (expected,) = torch.autograd.grad(_call(loss, param, x, target, weight, reduction="mean"), x)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("loss,param", [("softmax", 0.0), ("focal", 0.5)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_backward_of_unit_upstream_touches_no_logits_sized_tensor(loss, param, reduction, monkeypatch):
    """loss.backward() of "mean" or "sum": the forward already wrote the final gradient, so backward runs
    no op on an N x C tensor at all (forward + backward is one read of the logits, one write of the
    gradient). A random upstream gradient still gets its scaling pass (test_upstream_grad checks values)."""
    monkeypatch.setenv("CBKERNELS_BACKWARD", "fused")
    logits, target, weight = make_inputs(64, 1000, torch.float32, "cpu")

    def backward_input_shapes(upstream):
        x = logits.clone().requires_grad_(True)
        out = _call(loss, param, x, target, weight, reduction=reduction)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            torch.autograd.grad(out, x, upstream)
        return [shape for event in prof.events() for shape in event.input_shapes]

    assert list(logits.shape) not in backward_input_shapes(torch.tensor(1.0))
    assert list(logits.shape) in backward_input_shapes(torch.tensor(0.5))


def test_fused_backward_twice_raises_recompute_allows_it(monkeypatch):
    logits, target, weight = make_inputs(8, 30, torch.float32, "cpu")
    for strategy_name in ("fused", "recompute"):
        monkeypatch.setenv("CBKERNELS_BACKWARD", strategy_name)
        x = logits.clone().requires_grad_(True)
        out = _call("focal", 0.5, x, target, weight, reduction="sum")
        out.backward(retain_graph=True)
        first = x.grad.clone()
        if strategy_name == "fused":
            with pytest.raises(RuntimeError, match="CBKERNELS_BACKWARD=recompute"):
                out.backward()
            torch.testing.assert_close(x.grad, first, rtol=0, atol=0)  # the first gradient is untouched
        else:
            out.backward()
            torch.testing.assert_close(x.grad, 2 * first)


@pytest.mark.parametrize("family", ["sigmoid_focal", "softmax_ce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(family, dtype):
    logits, target, weight = make_inputs(5, 19, dtype, "cpu")
    for with_grad in (True, False):
        for w in (weight, None):
            x = logits.clone().requires_grad_(True)
            torch.library.opcheck(getattr(ops, f"{family}_forward").default,
                                  _fwd_args(family, x, target, w) + (with_grad,))
    grad_loss = torch.randn(5)
    torch.library.opcheck(getattr(ops, f"{family}_backward").default,
                          (logits, target, weight, grad_loss, 0.5 if family == "sigmoid_focal" else 0.1, -100))


@pytest.mark.parametrize("family", ["sigmoid_focal", "softmax_ce"])
@pytest.mark.parametrize("with_grad", [True, False], ids=["fused", "recompute"])
def test_eager_function_equals_registered_autograd(family, with_grad):
    """functional.py's eager path (_ops.loss_forward: an autograd.Function calling the kernel below the
    Autograd key) and a direct call of the registered op (torch.library's autograd, what torch.compile and
    opcheck use) share one formula: same rows, same gradient, bit for bit, for a random upstream gradient."""
    logits, target, weight = make_inputs(9, 41, torch.float32, "cpu")
    upstream = torch.randn(9)
    results = []
    for call in (_ops.loss_forward, lambda ns, fam, *args: getattr(getattr(torch.ops, ns), f"{fam}_forward")(*args)):
        x = logits.clone().requires_grad_(True)
        rows, _ = call("cbkernels", family, *_fwd_args(family, x, target, weight), with_grad)
        (grad,) = torch.autograd.grad(rows, x, upstream)
        results.append((rows.detach(), grad))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def _model_losses(model, x, target, weight):
    z = model(x)
    return torch.stack([
        cbkernels.cb_focal_loss(z, target, weight, 0.5, backend="cpu"),
        cbkernels.cb_sigmoid_cross_entropy(z, target, weight, backend="cpu"),
        cbkernels.cb_softmax_cross_entropy(z, target, weight, label_smoothing=0.1, backend="cpu"),
    ])


@pytest.mark.slow
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend, strategy):
    torch.manual_seed(0)
    model = torch.nn.Linear(12, 10)
    x = torch.randn(8, 12)
    target = torch.tensor([0, 9, 3, -100, 4, 4, 7, 1])
    weight = torch.rand(10) + 0.5
    compiled = torch.compile(_model_losses, fullgraph=True, backend=compile_backend)
    grads = []
    for fn in (_model_losses, compiled):
        model.zero_grad()
        losses = fn(model, x, target, weight)
        losses.sum().backward()
        grads.append((losses.detach(), model.weight.grad.clone(), model.bias.grad.clone()))
    for eager, comp in zip(*grads):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)


def test_torch_compile_fullgraph_quick():
    # The not-slow guard: tracing through the fake kernels and the autograd formula without a graph break.
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5)
    x, target = torch.randn(4, 6), torch.tensor([0, 4, -100, 2])
    compiled = torch.compile(_model_losses, fullgraph=True, backend="aot_eager")
    losses = compiled(model, x, target, None)
    losses.sum().backward()
    torch.testing.assert_close(losses.detach(), _model_losses(model, x, target, None).detach())


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_isa_variants(capability):
    """Each compiled instruction-set variant, chosen through ATen's own override, matches the reference."""
    run_under_cpu_capability(textwrap.dedent("""
        from backend_cases import assert_matches_reference, make_inputs
        for loss, param in [("softmax", 0.1), ("focal", 0.0), ("focal", 0.5), ("focal", 3.7)]:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                logits, target, weight = make_inputs(9, 77, dtype, "cpu")
                assert_matches_reference("cpu", loss, logits, target, weight, reduction="none", param=param)
            logits, target, weight = make_inputs(4, 50, torch.float32, "cpu", scale=1e4)
            assert_matches_reference("cpu", loss, logits, target, weight, reduction="sum", param=param)
    """), capability)


def test_reference_cross_check_for_confident_softmax():
    # p_y within 1e-7 of 1: the target column's gradient is expm1(z_y - lse), not a rounded p_y - 1.
    logits = torch.zeros(2, 50)
    logits[0, 3] = 25.0
    logits[1, 49] = 18.0
    target = torch.tensor([3, 49])
    x = logits.clone().requires_grad_(True)
    cbkernels.cb_softmax_cross_entropy(x, target, reduction="sum", backend="cpu").backward()
    xr = logits.double().requires_grad_(True)
    reference.cb_softmax_cross_entropy(xr, target, reduction="sum").backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=0)


@pytest.mark.parametrize("loss,param", LOSSES, ids=LOSS_IDS)
def test_masked_classes_minus_inf(loss, param):
    # Classes masked with -inf, including a whole leading block of the online log-sum-exp (1024 elements).
    logits, target, weight = make_inputs(6, 1500, torch.float32, "cpu", ignore_frac=0.0)
    logits[:, :1100] = float("-inf")
    logits[2, 1400:] = float("-inf")
    target = 1100 + target % 400
    target[2] = 1200
    if loss == "softmax" and param > 0:  # smoothing puts mass on the -inf classes: the loss is +inf
        out = _call(loss, param, logits, target, weight)
        assert torch.isinf(out).all() and (out > 0).all()
        return
    x = logits.clone().requires_grad_(True)
    out = _call(loss, param, x, target, weight)
    out.backward(torch.ones_like(out))
    xr = logits.double().requires_grad_(True)
    ref = (reference.cb_softmax_cross_entropy(xr, target, weight.double(), "none") if loss == "softmax"
           else reference.cb_focal_loss(xr, target, weight.double(), param, "none"))
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=0)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-7)
