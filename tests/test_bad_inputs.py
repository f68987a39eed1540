"""Bad input gives a clear error naming the argument, and nothing is written.

Every public entry point (the functional loss of each registered loss and ClassBalancedLoss) on every
backend pair (the `backend` fixture of conftest.py; CUDA pairs carry pytest.mark.gpu), then the raw
torch.ops.cbkernels ops of the C++ extension (when built): they are reachable without functional.py's
checks, so they must re-check and raise, never crash or read out of bounds (tools/asan_check.sh runs
this file under AddressSanitizer). Out-of-range target VALUES raise a RuntimeError on CPU tensors only:
on a CUDA device they are a device-side assert that ends the CUDA context (docs/guarantees.md), so those
cases are left out on pairs whose BackendCase.bad_target_raises is False.

"Nothing written": the logits are a leaf whose .grad holds a sentinel before the call; after the error
the same .grad object holds the same values and no input tensor has changed.

Values of class_weight are not checked (that would read the tensor on the host: a sync on CUDA); what
NaN and negative weights give is pinned down at the end of this file and documented in docs/guarantees.md.
"""
import math

import pytest
import torch

import cbkernels as cb
from cases import assert_grad_close, assert_loss_close
from cbkernels import _ops, losses, reference

N, C = 4, 5


def _function(spec):
    fn = getattr(cb, spec.function)
    return lambda x, t, w=None, **k: fn(x, t, w, **k)


def _module(x, t, w=None, **k):
    device = x.device if isinstance(x, torch.Tensor) else "cpu"  # (a case hands it a list)
    return cb.ClassBalancedLoss([40, 20, 9, 3, 1], **k).to(device)(x, t)  # its default loss_type


# Each registered loss's public function (by loss name), and the module.
CALLERS = {**{spec.name: _function(spec) for spec in losses.LOSSES}, "module": _module}
FUNCTIONS = [spec.name for spec in losses.LOSSES]


def _inputs(dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=g).to(dtype).to(device).requires_grad_(True)
    x.grad = torch.full_like(x, 7.0)  # sentinel: a failing call must leave it alone
    return x, torch.tensor([0, 4, 2, 1], device=device), (torch.rand(C, generator=g) + 0.5).to(device)


def _assert_untouched(snapshots):
    for tensor, copy in snapshots:
        assert torch.equal(tensor, copy), "an input was modified by a failing call"


def _expect_error(fn, exc, match, x, t, w):
    grad_before = x.grad
    snapshots = [(v, v.detach().clone()) for v in (x, t, w, x.grad) if isinstance(v, torch.Tensor)]
    with pytest.raises(exc, match=match):
        fn()
    assert x.grad is grad_before, "x.grad was replaced by a failing call"
    _assert_untouched(snapshots)


def _on(x, values, dtype=torch.int64):
    """A target tensor on the logits' device."""
    return torch.tensor(values, dtype=dtype, device=x.device)


# (id, transform(x, t, w) -> (x, t, w, kwargs), exception, message must match); applies to every caller.
COMMON_CASES = [
    ("logits_rank1", lambda x, t, w: (x[0], t, w, {}), ValueError, r"logits must have shape \(N, C\)"),
    ("logits_rank3", lambda x, t, w: (x.unsqueeze(0), t, w, {}), ValueError, r"logits must have shape \(N, C\)"),
    ("logits_int", lambda x, t, w: (x.detach().int(), t, w, {}), TypeError, "logits must be float"),
    ("logits_not_tensor", lambda x, t, w: (x.tolist(), t, w, {}), TypeError, "logits must be a torch.Tensor"),
    ("target_rank2", lambda x, t, w: (x, t.unsqueeze(1), w, {}), ValueError, r"target must have shape \(N,\)"),
    ("n_mismatch", lambda x, t, w: (x, t[:3], w, {}), ValueError, r"target must have shape \(N,\) = \(4,\)"),
    ("target_float", lambda x, t, w: (x, t.float(), w, {}), TypeError, "target must hold class indices"),
    ("target_bool", lambda x, t, w: (x, t > 1, w, {}), TypeError, "target must hold class indices"),
    ("target_uint8", lambda x, t, w: (x, t.to(torch.uint8), w, {}), TypeError, "target must hold class indices"),
    ("target_meta", lambda x, t, w: (x, t.to("meta"), w, {}), ValueError, "target is on meta"),
    ("target_eq_C", lambda x, t, w: (x, _on(x, [0, 1, 2, C]), w, {}), RuntimeError, "target"),
    ("target_negative", lambda x, t, w: (x, _on(x, [0, -1, 2, 3]), w, {}), RuntimeError, "target"),
    ("target_below_ignore", lambda x, t, w: (x, _on(x, [0, -101, 2, 3]), w, {}), RuntimeError, "target"),
    ("target_huge_int64", lambda x, t, w: (x, _on(x, [0, 2**40, 2, 3]), w, {}), RuntimeError, "target"),
    ("target_int32_eq_C", lambda x, t, w: (x, _on(x, [C, 1, 2, 3], torch.int32), w, {}), RuntimeError, "target"),
    ("reduction_avg", lambda x, t, w: (x, t, w, {"reduction": "avg"}), ValueError, "reduction must be one of"),
    ("reduction_none_obj", lambda x, t, w: (x, t, w, {"reduction": None}), ValueError, "reduction must be one of"),
    ("backend_tpu", lambda x, t, w: (x, t, w, {"backend": "tpu"}), ValueError, "backend must be one of"),
    ("backend_upper", lambda x, t, w: (x, t, w, {"backend": "CPU"}), ValueError, "backend must be one of"),
    ("ignore_index_float", lambda x, t, w: (x, t, w, {"ignore_index": -1.0}), TypeError, "ignore_index must be an int"),
]
# Only for callers that take class_weight (the module builds its own).
WEIGHT_CASES = [
    ("weight_short", lambda x, t, w: (x, t, w[:4], {}), ValueError, r"class_weight must have shape \(C,\) = \(5,\)"),
    ("weight_long", lambda x, t, w: (x, t, torch.ones(C + 1, device=x.device), {}), ValueError,
     r"class_weight must have shape"),
    ("weight_rank2", lambda x, t, w: (x, t, w.unsqueeze(0), {}), ValueError, r"class_weight must have shape"),
    ("weight_int", lambda x, t, w: (x, t, w.long(), {}), TypeError, "class_weight must be a floating-point"),
    ("weight_meta", lambda x, t, w: (x, t, w.to("meta"), {}), ValueError, "class_weight is on meta"),
    ("weight_list", lambda x, t, w: (x, t, w.tolist(), {}), TypeError, "class_weight must be a torch.Tensor"),
    ("weight_requires_grad", lambda x, t, w: (x, t, w.clone().requires_grad_(True), {}), ValueError,
     "class_weight must not require grad"),
]


TARGET_VALUE_CASES = {case[0] for case in COMMON_CASES if case[2] is RuntimeError}


def _cases(caller, backend):
    cases = COMMON_CASES + (WEIGHT_CASES if caller != "module" else [])
    if not backend.bad_target_raises:  # a device-side assert would end the CUDA context
        cases = [case for case in cases if case[0] not in TARGET_VALUE_CASES]
    return cases


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_bad_input_names_the_argument_and_writes_nothing(backend, caller):
    for case_id, transform, exc, match in _cases(caller, backend):
        x, t, w = _inputs(device=backend.device)
        bx, bt, bw, kwargs = transform(x, t, w)
        kwargs.setdefault("backend", backend.name)
        try:
            _expect_error(lambda: CALLERS[caller](bx, bt, bw, **kwargs), exc, match, x, t, w)
        except (AssertionError, pytest.fail.Exception) as err:
            raise AssertionError(f"case {case_id!r}: {err}") from err


# Refused by every hyperparameter's check (gamma: finite >= 0; label_smoothing: in [0, 1]).
BAD_HYPERPARAMETER_VALUES = (-0.5, -1e-12, math.nan, math.inf, "2", True)


def test_bad_scalars_name_the_argument(backend):
    x, t, w = _inputs(device=backend.device)
    checked = 0
    for spec in losses.LOSSES:
        for h in spec.hyperparameters:
            for value in BAD_HYPERPARAMETER_VALUES:
                _expect_error(lambda: CALLERS[spec.name](x, t, w, backend=backend.name, **{h.name: value}),
                              ValueError, h.name, x, t, w)
                checked += 1
    assert checked, "no registered loss has a hyperparameter"


@pytest.mark.parametrize("caller", FUNCTIONS)
def test_kernel_backend_rejects_float64_logits(kernel_backend, caller):
    x, t, w = _inputs(torch.float64, kernel_backend.device)
    _expect_error(lambda: CALLERS[caller](x, t, w, backend=kernel_backend.name), TypeError, "float64", x, t, w)


COUNTS = [40, 20, 9, 3, 1]
MODULE_CASES = [
    ({"samples_per_class": [40, -2, 9, 3, 1]}, "samples_per_class must be non-negative"),
    ({"samples_per_class": []}, "samples_per_class must be a non-empty 1-D"),
    ({"samples_per_class": [[40, 20], [9, 3]]}, "samples_per_class must be a non-empty 1-D"),
    ({"samples_per_class": [40, math.nan, 9, 3, 1]}, "samples_per_class must be finite"),
    ({"samples_per_class": [40, math.inf, 9, 3, 1]}, "samples_per_class must be finite"),
    ({"beta": 1.5}, "beta must lie in"),
    ({"beta": -0.1}, "beta must lie in"),
    ({"beta": [0.9, 0.9]}, "beta must be a scalar or have one value per class"),
    ({"loss_type": "hinge"}, "loss_type must be one of"),
    ({"backend": "tpu"}, "backend must be one of"),
    ({"reduction": "avg"}, "reduction must be one of"),
    ({"gamma": -1.0}, "gamma"),
    ({"label_smoothing": 2.0}, "label_smoothing"),
    ({"empty_classes": "skip"}, "empty_classes must be"),
]


def test_class_balanced_loss_constructor_errors():
    for override, match in MODULE_CASES:
        kwargs = {"samples_per_class": COUNTS, **override}
        with pytest.raises(ValueError, match=match):
            cb.ClassBalancedLoss(**kwargs)


def test_class_balanced_loss_empty_class_error_names_the_argument():
    # A zero count has no finite weight under empty_classes="error" (the default); the error must say
    # which argument and which classes, and how to opt into weight 0.
    with pytest.raises(ValueError, match=r"samples_per_class.*classes \[1, 3\] have 0 samples.*empty_classes='zero'"):
        cb.ClassBalancedLoss([40, 0, 9, 0, 1])


def test_class_balanced_loss_wrong_number_of_classes(backend):
    loss = cb.ClassBalancedLoss(COUNTS[:4], backend=backend.name).to(backend.device)
    x, t, _ = _inputs(device=backend.device)
    _expect_error(lambda: loss(x, t), ValueError, r"shape \(C,\) = \(5,\)", x, t, None)


# --- class_weight values: not checked (no host read); NaN propagates to its class's rows, never silently.

@pytest.mark.parametrize("caller", FUNCTIONS)
def test_nan_class_weight_poisons_exactly_its_rows(backend, caller):
    x, t, w = _inputs(device=backend.device)
    w[4] = math.nan  # rows whose target is 4: row 1 only
    xk = x.detach().clone().requires_grad_(True)
    loss = CALLERS[caller](xk, t, w, reduction="none", backend=backend.name)
    (grad,) = torch.autograd.grad(loss.sum(), xk)
    loss, grad = loss.detach().cpu(), grad.cpu()
    assert torch.isnan(loss[1]), "a NaN weight must give a NaN loss for its rows, not a silent number"
    assert torch.isnan(grad[1]).all() and torch.isfinite(grad[[0, 2, 3]]).all()
    ref = CALLERS[caller](x.detach().double().cpu(), t.cpu(), w.double().cpu(), reduction="none", backend="reference")
    assert_loss_close(loss[[0, 2, 3]], ref[[0, 2, 3]], f"{backend.id} {caller}")


@pytest.mark.parametrize("caller", FUNCTIONS)
def test_negative_class_weight_is_applied_as_given(backend, caller):
    # Documented behaviour: a negative alpha_y flips the sign of its rows' loss and gradient (the
    # reference's value); it is the caller's responsibility, like F.cross_entropy's weight.
    x, t, w = _inputs(device=backend.device)
    w[4] = -2.0
    xk = x.detach().clone().requires_grad_(True)
    loss = CALLERS[caller](xk, t, w, reduction="none", backend=backend.name)
    (gk,) = torch.autograd.grad(loss.sum(), xk)
    xr = x.detach().double().cpu().requires_grad_(True)
    ref = CALLERS[caller](xr, t.cpu(), w.double().cpu(), reduction="none", backend="reference")
    (gr,) = torch.autograd.grad(ref.sum(), xr)
    assert loss[1] < 0
    assert_loss_close(loss, ref, f"{backend.id} {caller}")
    assert_grad_close(gk, gr, torch.float32, f"{backend.id} {caller}")


# --- the raw C++ ops: their own checks, reached without functional.py's.

needs_cpu_ops = pytest.mark.skipif(not _ops.extension_has_kernel("CPU"), reason="the C++ CPU kernels are not built")
# family -> its float hyperparameters in schema order (each at its largest test value)
FAMILIES = {family.name: tuple(max(h.test_values) for h in family.hyperparameters) for family in losses.FAMILIES}


def _raw_args():
    g = torch.Generator().manual_seed(1)
    return dict(logits=torch.randn(N, C, generator=g), target=torch.tensor([0, 4, -100, 1]),
                class_weight=torch.rand(C, generator=g) + 0.5, grad_loss=torch.rand(N, generator=g))


RAW_CASES = [  # (id, argument name the error must mention, changes to the arguments)
    ("target_eq_C", "target", {"target": torch.tensor([0, C, 2, 1])}),
    ("target_negative", "target", {"target": torch.tensor([0, -1, 2, 1])}),
    ("target_huge", "target", {"target": torch.tensor([0, 2**40, 2, 1])}),
    ("target_min_int64", "target", {"target": torch.tensor([0, -2**63, 2, 1])}),
    ("target_int32_eq_C", "target", {"target": torch.tensor([0, C, 2, 1], dtype=torch.int32)}),
    ("target_float", "target", {"target": torch.tensor([0.0, 4.0, 2.0, 1.0])}),
    ("target_int16", "target", {"target": torch.tensor([0, 4, 2, 1], dtype=torch.int16)}),
    ("target_short", "target", {"target": torch.tensor([0, 4, 2])}),
    ("target_long", "target", {"target": torch.tensor([0, 4, 2, 1, 3])}),
    ("target_rank2", "target", {"target": torch.tensor([[0, 4, 2, 1]])}),
    ("logits_rank1", "logits", {"logits": torch.randn(N * C)}),
    ("logits_rank3", "logits", {"logits": torch.randn(1, N, C)}),
    ("logits_float64", "logits", {"logits": torch.randn(N, C, dtype=torch.float64)}),
    ("logits_int", "logits", {"logits": torch.ones(N, C, dtype=torch.int32)}),
    ("logits_no_class", "logits|target", {"logits": torch.randn(N, 0)}),
    ("weight_short", "class_weight", {"class_weight": torch.rand(C - 1)}),
    ("weight_long", "class_weight", {"class_weight": torch.rand(C + 3)}),
    ("weight_float64", "class_weight", {"class_weight": torch.rand(C, dtype=torch.float64)}),
    ("weight_rank2", "class_weight", {"class_weight": torch.rand(1, C)}),
]
RAW_BACKWARD_CASES = [
    ("grad_loss_short", "grad_loss", {"grad_loss": torch.rand(N - 1)}),
    ("grad_loss_long", "grad_loss", {"grad_loss": torch.rand(N + 100)}),
    ("grad_loss_float64", "grad_loss", {"grad_loss": torch.rand(N, dtype=torch.float64)}),
    ("grad_loss_rank2", "grad_loss", {"grad_loss": torch.rand(N, 1)}),
]


def _call_raw(family, op, a):
    ops = torch.ops.cbkernels
    params = FAMILIES[family]
    if op == "forward":
        return getattr(ops, f"{family}_forward")(a["logits"], a["target"], a["class_weight"], *params, -100, True)
    return getattr(ops, f"{family}_backward")(a["logits"], a["target"], a["class_weight"], a["grad_loss"], *params,
                                              -100)


@needs_cpu_ops
@pytest.mark.parametrize("op", ["forward", "backward"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_raw_ops_reject_bad_arguments(family, op):
    cases = RAW_CASES + (RAW_BACKWARD_CASES if op == "backward" else [])
    for case_id, name, change in cases:
        args = {**_raw_args(), **change}
        snapshots = [(v, v.clone()) for v in args.values()]
        with pytest.raises((RuntimeError, ValueError, TypeError, IndexError), match=name) as info:
            _call_raw(family, op, args)
        assert info.type is not SystemError, case_id
        _assert_untouched(snapshots)


@needs_cpu_ops
@pytest.mark.parametrize("op", ["forward", "backward"])
def test_raw_ops_reject_bad_scalars(op, monkeypatch):
    for family in losses.FAMILIES:
        good = FAMILIES[family.name]
        for i, h in enumerate(family.hyperparameters):
            for value in (-0.5, math.nan, math.inf):  # refused by every hyperparameter's check
                monkeypatch.setitem(FAMILIES, family.name, good[:i] + (value,) + good[i + 1:])
                with pytest.raises(RuntimeError, match=h.name):
                    _call_raw(family.name, op, _raw_args())


@needs_cpu_ops
@pytest.mark.parametrize("op", ["forward", "backward"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_raw_ops_strided_inputs_are_read_correctly_or_refused(family, op):
    # The contract allows any logits strides; class_weight and grad_loss are promised contiguous by
    # functional.py, so a raw call with strided ones must either be read correctly or be refused:
    # never read with the wrong stride.
    base = _raw_args()
    g = torch.Generator().manual_seed(2)
    strided = {
        "logits": torch.randn(N, 2 * C, generator=g)[:, ::2],
        "class_weight": (torch.rand(2 * C, generator=g) + 0.5)[::2],
        "grad_loss": torch.rand(2 * N, generator=g)[::2],
        "target": torch.tensor([0, 0, 4, 0, -100, 0, 1, 0])[::2],
    }
    for name, value in strided.items():
        if name == "grad_loss" and op == "forward":
            continue
        args = {**base, name: value}
        try:
            out = _call_raw(family, op, args)
        except (RuntimeError, ValueError) as err:
            assert name in str(err), f"strided {name} refused without naming it: {err}"
            continue
        dense = _call_raw(family, op, {k: v.contiguous() for k, v in args.items()})
        as_tuple = (lambda v: v if isinstance(v, tuple) else (v,))
        for got, want in zip(as_tuple(out), as_tuple(dense)):
            assert torch.equal(got, want), f"strided {name} read wrongly by {family}_{op}"


@needs_cpu_ops
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_raw_ops_bad_target_in_a_large_batch_is_refused(family):
    # The bad target sits past the first parallel chunk: a kernel that validates inside its parallel
    # loop must still refuse (and must not have read logits[i, target] out of bounds meanwhile).
    g = torch.Generator().manual_seed(3)
    for bad in (C, -7, 2**31, -2**31 - 1):
        args = _raw_args()
        args["logits"] = torch.randn(4099, C, generator=g)
        args["target"] = torch.randint(0, C, (4099,), generator=g)
        args["target"][4000] = bad
        with pytest.raises(RuntimeError, match="target"):
            _call_raw(family, "forward", args)


def test_reference_rows_also_refuse_bad_targets():
    # reference.py is the float64 spec and the fallback backend: it must refuse too, not gather garbage.
    x, _, w = _inputs(torch.float64)
    with pytest.raises(RuntimeError, match="target"):
        reference.softmax_rows(x, torch.tensor([0, 1, 2, C]), w)
