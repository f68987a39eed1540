"""What only the C++ CPU kernels (csrc/cpu/) promise, beyond the shared property tests.

The loss/gradient comparisons with the float64 reference (every loss, dtype, reduction, shape, layout,
strategy) run for this backend with every other in test_matches_reference.py, test_backend_edges.py,
test_numerics.py, test_properties.py and test_compile.py (the `backend` fixture of conftest.py). Here:
the ops' own checks (the target check names row and value; argument checks), N = 0, the fused
backward's buffer reuse, opcheck and the eager/registered autograd equivalence, the instruction-set
variants (ATEN_CPU_CAPABILITY) and independence of the thread count.
"""
from __future__ import annotations

import textwrap

import pytest
import torch

from cases import FAMILY_PARAMS, call, family_hyperparameters, loss_cases, make_inputs, run_under_cpu_capability
from cbkernels import _ops, losses

pytestmark = pytest.mark.skipif(not _ops.extension_has_kernel("CPU"),
                                reason=f"cbkernels._C has no CPU kernels ({_ops.extension_error()})")

ops = torch.ops.cbkernels
FAMILIES = FAMILY_PARAMS


_hyper = family_hyperparameters


def _fwd_args(family, logits, target, weight):
    return (logits, target, weight, *_hyper(family), -100)


def _spec_of(family):
    return next(spec for spec in losses.LOSSES if spec.family is family)


# --- the ops' own checks -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32], ids=str)
def test_bad_target_raises_naming_row_and_value(family, target_dtype):
    logits = torch.randn(5, 7)
    for bad in (7, -3):
        target = torch.tensor([1, 2, bad, 0, -100], dtype=target_dtype)
        with pytest.raises(RuntimeError, match=rf"target\[2\] = {bad} .*\[0, 7\)"):
            family.op(ops, "forward")(*_fwd_args(family, logits, target, None), True)
        with pytest.raises(RuntimeError, match=rf"target\[2\] = {bad}"):
            family.op(ops, "backward")(logits, target, None, torch.ones(5), *_hyper(family), -100)


@pytest.mark.parametrize("spec,hyper", loss_cases(full=False))
def test_bad_target_raises_through_public_api(spec, hyper):
    with pytest.raises(RuntimeError, match=r"target\[1\] = 9"):
        call(spec, torch.randn(3, 9), torch.tensor([0, 9, 2]), backend="cpu", hyper=hyper)


@pytest.mark.parametrize("family", FAMILIES)
def test_op_argument_checks(family):
    fwd, bwd = family.op(ops, "forward"), family.op(ops, "backward")
    logits, target = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    params = _hyper(family)
    with pytest.raises(RuntimeError, match="logits must have shape"):
        fwd(logits[0], target, None, *params, -100, False)
    with pytest.raises(RuntimeError, match="logits must be float32"):
        fwd(logits.double(), target, None, *params, -100, False)
    with pytest.raises(RuntimeError, match="target must be int64 or int32"):
        fwd(logits, target.float(), None, *params, -100, False)
    with pytest.raises(RuntimeError, match=r"target must have shape \(N,\)"):
        fwd(logits, target[:3], None, *params, -100, False)
    with pytest.raises(RuntimeError, match=r"class_weight must have shape \(C,\)"):
        fwd(logits, target, torch.ones(5), *params, -100, False)
    with pytest.raises(RuntimeError, match="class_weight must be float32"):
        fwd(logits, target, torch.ones(6, dtype=torch.float64), *params, -100, False)
    with pytest.raises(RuntimeError, match=r"grad_loss must have shape \(N,\)"):
        bwd(logits, target, None, torch.ones(3), *params, -100)
    with pytest.raises(RuntimeError, match="grad_loss must be float32"):
        bwd(logits, target, None, torch.ones(4, dtype=torch.float64), *params, -100)
    for i, h in enumerate(family.hyperparameters):  # -1 is refused by every hyperparameter's check
        bad = params[:i] + (-1.0,) + params[i + 1:]
        with pytest.raises(RuntimeError, match=h.name):
            fwd(logits, target, None, *bad, -100, False)


# --- the fused backward's buffer ---------------------------------------------------------------------

@pytest.mark.parametrize("spec,hyper", loss_cases(full=False))
def test_fused_backward_allocates_no_logits_sized_tensor(spec, hyper, monkeypatch):
    """The fused backward scales the forward's gradient buffer in place and returns it: no N x C tensor is
    allocated in backward (neither the product nor a zero-filled gradient for the op's second output)."""
    monkeypatch.setenv("CBKERNELS_BACKWARD", "fused")
    logits, target, weight = make_inputs(64, 1000, torch.float32, "cpu")
    x = logits.clone().requires_grad_(True)
    out = call(spec, x, target, weight, backend="cpu", reduction="mean", hyper=hyper)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        (grad,) = torch.autograd.grad(out, x)
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert 0 < largest < logits.numel() * logits.element_size() // 4
    monkeypatch.setenv("CBKERNELS_BACKWARD", "recompute")
    (expected,) = torch.autograd.grad(call(spec, x, target, weight, backend="cpu", reduction="mean", hyper=hyper), x)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("spec,hyper", loss_cases(full=False))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_backward_of_unit_upstream_touches_no_logits_sized_tensor(spec, hyper, reduction, monkeypatch):
    """loss.backward() of "mean" or "sum": the forward already wrote the final gradient, so backward runs
    no op on an N x C tensor at all (forward + backward is one read of the logits, one write of the
    gradient). A random upstream gradient still gets its scaling pass (the shared tests check values)."""
    monkeypatch.setenv("CBKERNELS_BACKWARD", "fused")
    logits, target, weight = make_inputs(64, 1000, torch.float32, "cpu")

    def backward_input_shapes(upstream):
        x = logits.clone().requires_grad_(True)
        out = call(spec, x, target, weight, backend="cpu", reduction=reduction, hyper=hyper)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            torch.autograd.grad(out, x, upstream)
        return [shape for event in prof.events() for shape in event.input_shapes]

    assert list(logits.shape) not in backward_input_shapes(torch.tensor(1.0))
    assert list(logits.shape) in backward_input_shapes(torch.tensor(0.5))


# --- the registration ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(family, dtype):
    logits, target, weight = make_inputs(5, 19, dtype, "cpu")
    for with_grad in (True, False):
        for w in (weight, None):
            x = logits.clone().requires_grad_(True)
            torch.library.opcheck(family.op(ops, "forward").default, _fwd_args(family, x, target, w) + (with_grad,))
    grad_loss = torch.randn(5)
    torch.library.opcheck(family.op(ops, "backward").default,
                          (logits, target, weight, grad_loss, *_hyper(family), -100))
    # the optional inputs by name (sample_weight after the logit adjustments)
    sample_weight = torch.rand(5)
    torch.library.opcheck(family.op(ops, "forward").default,
                          _fwd_args(family, logits.clone().requires_grad_(True), target, weight) + (False,),
                          {"sample_weight": sample_weight})
    torch.library.opcheck(family.op(ops, "backward").default,
                          (logits, target, weight, grad_loss, *_hyper(family), -100), {"sample_weight": sample_weight})
    # dense targets (the logits' dtype) and element weights
    dense = torch.rand(5, 19).to(dtype)
    for with_grad in (True, False):
        torch.library.opcheck(family.op(ops, "forward").default,
                              _fwd_args(family, logits.clone().requires_grad_(True), dense, weight) + (with_grad,),
                              {"element_weight": weight})
    torch.library.opcheck(family.op(ops, "backward").default,
                          (logits, dense, None, grad_loss, *_hyper(family), -100), {"element_weight": weight})


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("with_grad", [True, False], ids=["fused", "recompute"])
def test_eager_function_equals_registered_autograd(family, with_grad):
    """functional.py's eager path (_ops.loss_forward: an autograd.Function calling the kernel below the
    Autograd key) and a direct call of the registered op (torch.library's autograd, what torch.compile and
    opcheck use) share one formula: same rows, same gradient, bit for bit, for a random upstream gradient."""
    logits, target, weight = make_inputs(9, 41, torch.float32, "cpu")
    upstream = torch.randn(9)
    results = []
    eager = lambda *args: _ops.loss_forward("cbkernels", family, *args[:3], args[3:-2], *args[-2:])  # noqa: E731
    registered = family.op(ops, "forward")
    for fn in (eager, registered):
        x = logits.clone().requires_grad_(True)
        rows, _ = fn(*_fwd_args(family, x, target, weight), with_grad)
        (grad,) = torch.autograd.grad(rows, x, upstream)
        results.append((rows.detach(), grad))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


# --- instruction-set variants ----------------------------------------------------------------------

_ISA_SCRIPT = """
import torch
from cases import assert_matches_reference, make_inputs
from cbkernels import losses
for spec in losses.LOSSES:
    for hyper in {cases}:
        for dtype in {dtypes}:
            logits, target, weight = make_inputs(9, 77, dtype, "cpu", generator=torch.Generator().manual_seed(1))
            assert_matches_reference("cpu", spec, hyper, logits, target, weight, reduction="none")
        logits, target, weight = make_inputs(4, 50, torch.float32, "cpu", scale=1e4,
                                             generator=torch.Generator().manual_seed(2))
        assert_matches_reference("cpu", spec, hyper, logits, target, weight, reduction="sum")
"""


def test_isa_variant_smoke():
    """The generic (non-vector) build, chosen through ATen's own override, on one case per loss in fp32 and
    bf16: the default run's guard. The full runs over every variant are slow-marked (below)."""
    run_under_cpu_capability(textwrap.dedent(_ISA_SCRIPT.format(
        cases="spec.test_cases()[-1:]", dtypes="(torch.float32, torch.bfloat16)")), "default")


@pytest.mark.slow
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_isa_variants(capability):
    """Each compiled instruction-set variant matches the reference on every loss case and dtype."""
    run_under_cpu_capability(textwrap.dedent(_ISA_SCRIPT.format(
        cases="spec.test_cases()", dtypes="(torch.float32, torch.bfloat16, torch.float16)")), capability)


# --- threads ---------------------------------------------------------------------------------------

_BITS = {2: torch.int16, 4: torch.int32}


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("strategy", ["fused", "recompute"])
@pytest.mark.parametrize("spec,hyper", loss_cases(full=False))
def test_thread_count_does_not_change_a_bit(spec, hyper, strategy, restore_threads, monkeypatch):
    """The kernels split work by whole rows (or, for one huge row, in fixed blocks): the thread count must
    not change any row's arithmetic."""
    monkeypatch.setenv("CBKERNELS_BACKWARD", strategy)
    for n, c in [(64, 1000), (1, 200_003), (3, 70_001), (2048, 37)]:
        for dtype in (torch.float32, torch.bfloat16):
            logits, target, weight = make_inputs(n, c, dtype, "cpu")
            upstream = torch.linspace(-1.0, 2.0, n)
            results = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                x = logits.clone().requires_grad_(True)
                out = call(spec, x, target, weight, backend="cpu", reduction="none", hyper=hyper)
                (grad,) = torch.autograd.grad(out, x, upstream)
                results.append((out.detach(), grad))
            for one, two in zip(*results):
                bits = _BITS[one.element_size()]
                assert torch.equal(one.view(bits), two.view(bits)), (
                    f"cpu {spec.name} {strategy} ({n}, {c}) {dtype}: 1 vs 2 threads differ bitwise")
