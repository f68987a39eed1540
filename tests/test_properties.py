"""Property tests: every available backend against reference.py (float64) on hypothesis-drawn inputs.

Drawn: shape (N <= 9, C <= 70; N <= 3, C <= 6 for Triton's slow CPU interpreter), dtype, loss and its
parameter (gamma or label smoothing), reduction, ignore_index and how many rows carry it (none, some,
all), class weights or none, int64/int32 targets, logit scale, upstream gradient scale, and the logits'
layout: contiguous, transposed (dense, column stride N) or sliced (every other column: not dense).
The budget is fixed and derandomized (the same examples every run), so CI time is bounded.

assert_matches_reference clones the logits, and clone() makes a non-dense view contiguous, so the
sliced layout is checked here through the view itself (same tolerance table).
"""
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cbkernels as cb
from backend_cases import GRAD_RTOL, LOSS_RTOL, assert_matches_reference, call, make_inputs

BACKENDS = cb.available_backends("cpu")
BUDGET = {"triton": 10}  # examples per test; the rest get DEFAULT_BUDGET
DEFAULT_BUDGET = 60
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def loss_cases(draw, tiny):
    n = draw(st.integers(1, 3 if tiny else 9))
    c = draw(st.integers(1, 6 if tiny else 70))
    loss = draw(st.sampled_from(["softmax", "focal"]))
    if loss == "softmax":
        param = draw(st.sampled_from([0.0, 0.0, 0.1, 1.0]) | st.floats(0.0, 1.0))
    else:
        param = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]) | st.floats(0.0, 5.0))
    dtype = draw(st.sampled_from(DTYPES))
    # fp16 gradients below 6.1e-5 are subnormal (spacing 2^-24) or flush to 0, where no relative
    # tolerance holds, and backend_cases' atol (relative to the largest entry) has no floor for them.
    # Large logits (e^-30) or a 1e-3 upstream gradient land there when C is small: fp32/bf16 only.
    fp16 = dtype == torch.float16
    scales = [0.01, 1.0, 3.0] if fp16 else [0.01, 1.0, 3.0, 30.0]
    upstream_scales = [None, 100.0] if fp16 else [None, 1e-3, 100.0]
    return dict(
        n=n, c=c, loss=loss, param=param, dtype=dtype,
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        ignore_index=draw(st.sampled_from([-100, -1, 0])),
        ignored=draw(st.sampled_from(["none", "some", "all"])),
        weighted=draw(st.booleans()),
        target_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
        scale=draw(st.sampled_from(scales)),
        upstream_scale=draw(st.sampled_from(upstream_scales)),
        layout=draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _inputs(case):
    logits, target, weight = make_inputs(
        case["n"], case["c"], case["dtype"], "cpu", scale=case["scale"],
        ignore_frac={"none": 0.0, "some": 0.4, "all": 0.0}[case["ignored"]], weighted=case["weighted"],
        target_dtype=case["target_dtype"], ignore_index=case["ignore_index"],
        noncontiguous=case["layout"] == "sliced", generator=torch.Generator().manual_seed(case["seed"]))
    if case["ignored"] == "all":
        target = torch.full_like(target, case["ignore_index"])
    if case["layout"] == "transposed":
        logits = logits.t().contiguous().t()
    return logits, target, weight


def _assert_view_matches_reference(backend, case, logits, target, weight):
    """assert_matches_reference for a non-dense view: gradients are taken w.r.t. the view itself."""
    kw = dict(reduction=case["reduction"], param=case["param"], ignore_index=case["ignore_index"])
    base = logits._base.detach().clone().requires_grad_(True)
    view = base[:, ::2]
    assert view.stride() == logits.stride() and torch.equal(view, logits)
    out = call(case["loss"], view, target, weight, backend=backend, **kw)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (grad,) = torch.autograd.grad(out, view, upstream)
    ref_x = logits.double().requires_grad_(True)
    ref = call(case["loss"], ref_x, target, None if weight is None else weight.double(), backend="reference", **kw)
    (ref_grad,) = torch.autograd.grad(ref, ref_x, upstream.double())
    scale = float(ref.detach().abs().max())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=LOSS_RTOL, atol=1e-6 * scale + 1e-30)
    rtol = GRAD_RTOL[logits.dtype]
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=rtol * float(ref_grad.abs().max()) + 1e-30)


def _check(backend, case):
    logits, target, weight = _inputs(case)
    if case["layout"] == "sliced":
        assert logits._base is not None  # a view into a wider tensor (contiguous only when C == 1)
        _assert_view_matches_reference(backend, case, logits, target, weight)
    else:
        assert_matches_reference(backend, case["loss"], logits, target, weight, reduction=case["reduction"],
                                 param=case["param"], ignore_index=case["ignore_index"],
                                 upstream_scale=case["upstream_scale"])


def _property_test(backend):
    tiny = backend == "triton"

    @settings(max_examples=BUDGET.get(backend, DEFAULT_BUDGET), deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow], print_blob=True)
    @given(case=loss_cases(tiny))
    def run(case):
        _check(backend, case)

    return run


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference_on_drawn_inputs(backend):
    _property_test(backend)()


def test_view_check_can_fail(monkeypatch):
    # The view comparison must notice a wrong kernel: here the backend call gets label smoothing 0.105
    # where the reference gets 0.1, a small realistic error, and it must be caught.
    case = dict(n=5, c=7, loss="softmax", param=0.1, dtype=torch.float32, reduction="none", ignore_index=-100,
                ignored="some", weighted=True, target_dtype=torch.int64, scale=3.0, upstream_scale=None,
                layout="sliced", seed=3)
    logits, target, weight = _inputs(case)
    original = call

    def skewed_call(loss, x, t, w, **kw):
        return original(loss, x, t, w, **dict(kw, param=0.1 if kw["backend"] == "reference" else 0.105))

    monkeypatch.setattr(sys.modules[__name__], "call", skewed_call)
    with pytest.raises(AssertionError):
        _assert_view_matches_reference(BACKENDS[-1], case, logits, target, weight)
