"""Property tests: every backend pair (the `backend` fixture; CUDA pairs carry pytest.mark.gpu) against the
reference backend in float64 on hypothesis-drawn inputs.

Drawn: shape (N <= 9, C <= 70; N <= 3, C <= 6 on a pair whose budget is tiny: Triton's CPU interpreter),
dtype, a registered loss and its hyperparameters (one of the registry's test values, or any value in
[0, 5], brought into [0, 1] when the hyperparameter's own check refuses it), reduction, ignore_index
and how many rows carry it (none, some, all), class weights or none, int64/int32 targets, logit scale,
upstream gradient scale, and the logits' layout: contiguous, transposed (dense, column stride N) or
sliced (every other column: not dense). The budget is fixed and derandomized (the same examples every
run), so CI time is bounded.

assert_matches_reference takes gradients with respect to a detached alias of the logits (same strides),
and the sliced layout is also checked through the view of its base tensor (same tolerance table).
"""
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cases import DTYPES, REDUCTIONS, assert_grad_close, assert_loss_close, assert_matches_reference, call, make_inputs
from cbkernels import losses

TINY_BUDGET = 10  # examples per test on a tiny-budget pair (the interpreter)
DEFAULT_BUDGET = 60


def _hyperparameter_values(h):
    def valid(value):
        try:
            h.check(value)
            return True
        except ValueError:
            return False

    drawn = st.floats(0.0, 5.0).map(lambda v: v if valid(v) else v / 5.0)
    return st.sampled_from(h.test_values) | drawn


@st.composite
def loss_cases(draw, tiny):
    n = draw(st.integers(1, 3 if tiny else 9))
    c = draw(st.integers(1, 6 if tiny else 70))
    spec = draw(st.sampled_from(losses.LOSSES))
    hyper = {h.name: draw(_hyperparameter_values(h)) for h in spec.hyperparameters}
    dtype = draw(st.sampled_from(DTYPES))
    # fp16 gradients below 6.1e-5 are subnormal (spacing 2^-24) or flush to 0, where no relative
    # tolerance holds beyond the table's 2^-24 floor. Large logits (e^-30) or a 1e-3 upstream gradient
    # land there when C is small: fp32/bf16 only.
    fp16 = dtype == torch.float16
    scales = [0.01, 1.0, 3.0] if fp16 else [0.01, 1.0, 3.0, 30.0]
    upstream_scales = [None, 100.0] if fp16 else [None, 1e-3, 100.0]
    return dict(
        n=n, c=c, spec=spec, hyper=hyper, dtype=dtype,
        reduction=draw(st.sampled_from(REDUCTIONS)),
        ignore_index=draw(st.sampled_from([-100, -1, 0])),
        ignored=draw(st.sampled_from(["none", "some", "all"])),
        weighted=draw(st.booleans()),
        target_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
        scale=draw(st.sampled_from(scales)),
        upstream_scale=draw(st.sampled_from(upstream_scales)),
        layout=draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _inputs(case, device):
    logits, target, weight = make_inputs(
        case["n"], case["c"], case["dtype"], device, scale=case["scale"],
        ignore_frac={"none": 0.0, "some": 0.4, "all": 0.0}[case["ignored"]], weighted=case["weighted"],
        target_dtype=case["target_dtype"], ignore_index=case["ignore_index"],
        noncontiguous=case["layout"] == "sliced", generator=torch.Generator().manual_seed(case["seed"]))
    if case["ignored"] == "all":
        target = torch.full_like(target, case["ignore_index"])
    if case["layout"] == "transposed":
        logits = logits.t().contiguous().t()
    return logits, target, weight


def _assert_view_matches_reference(backend, case, logits, target, weight):
    """The comparison for a non-dense view, with gradients taken w.r.t. the view of its base tensor."""
    kw = dict(reduction=case["reduction"], hyper=case["hyper"], ignore_index=case["ignore_index"])
    base = logits._base.detach().clone().requires_grad_(True)
    view = base[:, ::2]
    assert view.stride() == logits.stride() and torch.equal(view, logits)
    out = call(case["spec"], view, target, weight, backend=backend, **kw)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (grad,) = torch.autograd.grad(out, view, upstream.to(out.device))
    ref_x = logits.double().cpu().requires_grad_(True)
    ref = call(case["spec"], ref_x, target.cpu(), None if weight is None else weight.double().cpu(),
               backend="reference", **kw)
    (ref_grad,) = torch.autograd.grad(ref, ref_x, upstream.double())
    assert_loss_close(out, ref, "view loss")
    assert_grad_close(grad, ref_grad, logits.dtype, "view grad")


def _check(backend, case):
    logits, target, weight = _inputs(case, backend.device)
    if case["layout"] == "sliced":
        assert logits._base is not None  # a view into a wider tensor (contiguous only when C == 1)
        _assert_view_matches_reference(backend, case, logits, target, weight)
    else:
        assert_matches_reference(backend, case["spec"], case["hyper"], logits, target, weight,
                                 reduction=case["reduction"], ignore_index=case["ignore_index"],
                                 upstream_scale=case["upstream_scale"])


def test_backend_matches_reference_on_drawn_inputs(backend):
    tiny = not backend.fits(9, 70)

    @settings(max_examples=TINY_BUDGET if tiny else DEFAULT_BUDGET, deadline=None, derandomize=True,
              database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
              print_blob=True)
    @given(case=loss_cases(tiny))
    def run(case):
        _check(backend, case)

    run()


def test_view_check_can_fail(monkeypatch):
    # The view comparison must notice a wrong kernel: here the backend call gets label smoothing 0.105
    # where the reference gets 0.1, a small realistic error, and it must be caught.
    spec = next(s for s in losses.LOSSES if "label_smoothing" in s.hyperparameter_names)
    case = dict(n=5, c=7, spec=spec, hyper={**spec.defaults(), "label_smoothing": 0.1}, dtype=torch.float32,
                reduction="none", ignore_index=-100, ignored="some", weighted=True, target_dtype=torch.int64,
                scale=3.0, upstream_scale=None, layout="sliced", seed=3)
    logits, target, weight = _inputs(case, "cpu")
    original = call

    def skewed_call(spec, x, t, w, **kw):
        skewed = dict(kw["hyper"], label_smoothing=0.1 if x.dtype == torch.float64 else 0.105)  # float64: the oracle
        return original(spec, x, t, w, **dict(kw, hyper=skewed))

    monkeypatch.setattr(sys.modules[__name__], "call", skewed_call)
    with pytest.raises(AssertionError):
        _assert_view_matches_reference("reference", case, logits, target, weight)
