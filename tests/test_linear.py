"""cb_linear_loss / ClassBalancedLinearLoss against the unfused path: F.linear then reference.py in float64.

Every comparison draws random inputs from torch's global generator (seeded per test from its node id by
tests/conftest.py; a failure report shows the seed), includes ignored rows and targets at 0 and C-1, and uses
a random upstream gradient (not 1), so a wrong scale, a dropped chunk or a mis-ordered accumulation shows up.
Losses come from the registry (losses.LOSS_TYPES); kernel backends from the `backend` fixture (conftest.py).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import cbkernels
from cbkernels import _backends, losses, reference
from cbkernels.linear import ClassBalancedLinearLoss, auto_chunk_rows, cb_linear_loss
from cases import weighted_reduction_by_hand
from conftest import BACKEND_CASES, backend_params
from hand_losses import hand_rows

LOSS_TYPES = losses.LOSS_TYPES
REDUCTIONS = ("mean", "sum", "none")
GAMMA, SMOOTHING = 0.7, 0.1
# Tolerance relative to the largest reference value of each compared tensor. float64 end to end: only
# summation order differs. float32: fp32 matmuls and kernels vs float64 math (~1e-6 relative per value,
# sums of up to N*C terms). Half: the logits tile is rounded to the dtype once (2^-8 for bf16), then fp32.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 8e-3, torch.bfloat16: 3e-2}


def _inputs(n, h, c, dtype, *, bias=True, ignore_index=-100, seed=None):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())) if seed is None else seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(c, h, generator=g, dtype=torch.float64) / h**0.5 * 2).to(dtype)
    b = (torch.randn(c, generator=g, dtype=torch.float64)).to(dtype) if bias else None
    target = torch.randint(0, c, (n,), generator=g)
    target[0], target[-1] = 0, c - 1
    ignored = torch.rand(n, generator=g) < 0.2
    ignored[0] = ignored[-1] = False
    target = torch.where(ignored, torch.full_like(target, ignore_index), target)
    class_weight = torch.rand(c, generator=g) * 2 + 0.1
    return hidden, weight, b, target, class_weight


def _unfused(loss_type, hidden, weight, bias, target, class_weight, reduction, ignore_index=-100, weighting="row"):
    # cb_linear_loss takes gamma and label_smoothing for every loss, and each loss uses those it names.
    logits = F.linear(hidden, weight, bias)
    return losses.loss(loss_type).reference(logits, target, class_weight, reduction, ignore_index, gamma=GAMMA,
                                            label_smoothing=SMOOTHING, weighting=weighting)


def _weighted_unfused(loss_type, hidden, weight, bias, target, class_weight, sample_weight, reduction, normalizer,
                      ignore_index=-100, weighting="row"):
    """The unweighted rows of F.linear's logits, weighted and reduced by hand (cases.py)."""
    rows = _unfused(loss_type, hidden, weight, bias, target, class_weight, "none", ignore_index, weighting)
    return weighted_reduction_by_hand(rows, target, ignore_index, sample_weight, reduction, normalizer)


def _sample_weight(target, ignore_index):
    """Weights of either sign and a 0 (the ops use them as given), NaN on the ignored rows (which must stay 0).
    float32, the ops' type, so the float64 oracle sees the same values."""
    sample_weight = torch.randn(target.shape[0]) * 1.5
    sample_weight[1] = 0.0
    return torch.where(target == ignore_index, float("nan"), sample_weight)


def _value_and_grads(fn, params, upstream):
    leaves = [p.detach().clone().requires_grad_(True) if p is not None else None for p in params]
    out = fn(*leaves)
    wrt = [p for p in leaves if p is not None]
    grads = torch.autograd.grad(out, wrt, upstream.to(out.dtype).reshape(out.shape))
    return out.detach(), grads


def assert_matches_unfused(backend, loss_type, reduction, dtype, *, n=29, h=12, c=37, bias=True, chunk_size=None,
                           ignore_index=-100, device="cpu", weighted=False, normalizer=None, weighting="row"):
    """weighted: with _sample_weight's weights; normalizer: None, a number or "tensor" (a 0-d tensor on device);
    weighting: how the class weights apply ("row" or "element"), for cb_linear_loss and the spec alike."""
    hidden, weight, b, target, cw = _inputs(n, h, c, dtype, bias=bias, ignore_index=ignore_index)
    target[2] = ignore_index  # an ignored row for every seed (a NaN weight when weighted)
    upstream = torch.randn(n if reduction == "none" else 1, dtype=torch.float64) * 1.7
    sample_weight = _sample_weight(target, ignore_index) if weighted else None
    if normalizer == "tensor":
        normalizer = torch.tensor(5.25, dtype=torch.float64)  # float64: must not change the loss's dtype

    def fused(x, w, bb):
        return cb_linear_loss(x, w, target.to(device), cw.to(device), bb, loss_type, GAMMA, reduction, ignore_index,
                              SMOOTHING, chunk_size, backend, sample_weight=_to(sample_weight, device),
                              normalizer=_to(normalizer, device), weighting=weighting)

    def unfused(x, w, bb):
        if weighted or normalizer is not None:
            return _weighted_unfused(loss_type, x, w, bb, target, cw.double(), sample_weight, reduction, normalizer,
                                     ignore_index, weighting)
        return _unfused(loss_type, x, w, bb, target, cw.double(), reduction, ignore_index, weighting)

    on_device = tuple(None if p is None else p.to(device) for p in (hidden, weight, b))
    out, grads = _value_and_grads(fused, on_device, upstream.to(device))
    out, grads = out.cpu(), [g.cpu() for g in grads]
    ref, ref_grads = _value_and_grads(unfused, tuple(None if p is None else p.double() for p in (hidden, weight, b)),
                                      upstream)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == ref.shape
    names = ("hidden", "weight", "bias")
    for name, grad, param in zip(names, grads, (hidden, weight, b)):
        assert grad.dtype == param.dtype and grad.shape == param.shape, name
    tol = TOL[dtype]
    for name, got, want in [("loss", out, ref), *zip(names, grads, ref_grads)]:
        scale = float(want.abs().max()) if want.numel() else 1.0
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale + 1e-30,
                                   msg=lambda m, name=name: f"{backend} {loss_type} {reduction} {name}: {m}")
    ignored = target == ignore_index
    assert (grads[0][ignored] == 0).all(), "ignored rows must get exactly zero hidden gradient"
    if reduction == "none":
        assert (out[ignored] == 0).all(), "ignored rows must have exactly zero loss"


def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _backend_shape(backend):
    """(n, h, c, chunk_size), chunks that do not divide N. On a GPU C = 3000 spans several 1024-wide blocks;
    on the CPU a mid-sized case; under the Triton interpreter (a few hundred elements per call) a tiny one that
    still has 3 chunks."""
    if backend.device == "cuda":
        return 130, 40, 3000, 48
    n, c = backend.pick((45, 70), (10, 9))
    return (n, 12, c, 16) if n == 45 else (n, 4, c, 4)


# --- the spec path (backend="reference", float64) ---------------------------------------------------

@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_size", [7, 16, None])  # 7 and 16 do / do not divide N = 32 resp. 29
def test_reference_backend_matches_unfused(loss_type, reduction, bias, chunk_size):
    n = 32 if chunk_size == 16 else 29
    assert_matches_unfused("reference", loss_type, reduction, torch.float64, n=n, bias=bias, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_reference_backend_low_precision(dtype, loss_type):
    assert_matches_unfused("reference", loss_type, "mean", dtype, chunk_size=8)


def test_other_ignore_index_and_int32_target():
    assert_matches_unfused("reference", "focal", "sum", torch.float64, chunk_size=5, ignore_index=3)
    hidden, weight, b, target, cw = _inputs(9, 4, 6, torch.float64)
    a = cb_linear_loss(hidden, weight, target.int(), cw, b, "softmax", backend="reference", chunk_size=4)
    torch.testing.assert_close(a, cb_linear_loss(hidden, weight, target, cw, b, "softmax", backend="reference"))


# --- the kernel-op glue, on a Python model of docs/op-contract.md (runs without any built backend) ---

class _ContractOps:
    """The ops of docs/op-contract.md, two per kernel family of the registry, written with the families'
    reference rows: tests linear.py's use of the contract (the family's hyperparameters in schema order,
    with_grad, the empty grad, *_backward's scaled gradient, fp32 loss, grad in the logits' dtype)."""

    @staticmethod
    def _rows(family, z, target, cw, hyperparameters, ii, offset, margin, sample_weight, element_weight):
        assert len(hyperparameters) == len(family.hyperparameters), (family.name, hyperparameters)
        # The op sees only its tile's rows: one weight per row, float32 contiguous (the contract); the element
        # weights are per class, (C,) float32 contiguous for every tile.
        assert sample_weight is None or (sample_weight.shape == target.shape and sample_weight.is_contiguous()
                                         and sample_weight.dtype == torch.float32)
        assert element_weight is None or (element_weight.shape == z.shape[1:] and element_weight.is_contiguous()
                                          and element_weight.dtype == torch.float32)
        named = {h.name: v for h, v in zip(family.hyperparameters, hyperparameters)}
        rows = family.reference_rows(reference.adjusted_logits(z, target, ii, offset, margin), target, cw, ii, **named,
                                     element_weight=element_weight)
        return reference.weighted_rows(rows, target, ii, sample_weight)

    def __getattr__(self, name):
        family_name, kind = name.rsplit("_", 1)
        family = losses.family(family_name)

        def forward(logits, target, cw, *scalars_and_optional_inputs):
            *hyperparameters, ii, with_grad, offset, margin, sample_weight, element_weight = scalars_and_optional_inputs
            z = logits.detach().requires_grad_(True)
            with torch.enable_grad():
                rows = self._rows(family, z, target, cw, hyperparameters, ii, offset, margin, sample_weight,
                                  element_weight)
                grad = torch.autograd.grad(rows.sum(), z)[0] if with_grad else logits.new_empty((0,))
            return rows.detach().float(), grad

        def backward(logits, target, cw, grad_loss, *scalars_and_optional_inputs):
            *hyperparameters, ii, offset, margin, sample_weight, element_weight = scalars_and_optional_inputs
            assert grad_loss.dtype == torch.float32 and grad_loss.is_contiguous()
            z = logits.detach().requires_grad_(True)
            with torch.enable_grad():
                rows = self._rows(family, z, target, cw, hyperparameters, ii, offset, margin, sample_weight,
                                  element_weight)
                return torch.autograd.grad(rows, z, grad_loss.to(rows.dtype))[0]

        return forward if kind == "forward" else backward


@dataclasses.dataclass(frozen=True)
class _ContractBackend(_backends.Backend):
    """A kernel backend record whose ops are _ContractOps (instead of a torch.ops namespace)."""

    @property
    def ops(self):
        return _ContractOps()


CONTRACT = _ContractBackend("contract", "contract", checks_targets=False, default_strategy="fused",
                            dtypes=_backends.KERNEL_DTYPES)


@pytest.fixture
def contract_backend(monkeypatch):
    calls = []

    def resolve(backend, tensor):
        calls.append(backend)
        return CONTRACT

    monkeypatch.setattr(_backends, "resolve", resolve)
    yield "contract"
    assert calls, "cb_linear_loss did not ask _backends.resolve for its backend"


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kernel_glue_matches_unfused(contract_backend, loss_type, reduction):
    assert_matches_unfused(contract_backend, loss_type, reduction, torch.float32, chunk_size=6)


# --- real kernel backends (every pair of the `backend` fixture: reference, cpu, triton, cuda) --------------

def _skip_unless(backend):
    reason = _backends.unavailable_reason(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable here: {reason}")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backend_matches_unfused(backend, loss_type, reduction, dtype):
    n, h, c, chunk_size = _backend_shape(backend)
    assert_matches_unfused(backend.name, loss_type, reduction, dtype, n=n, h=h, c=c, chunk_size=chunk_size,
                           device=backend.device)


def test_compile_fullgraph_cpu_backend():
    _skip_unless("cpu")
    hidden, weight, b, target, cw = _inputs(20, 8, 11, torch.float32)

    def f(x, w, bb):
        return cb_linear_loss(x, w, target, cw, bb, "focal", chunk_size=8, backend="cpu")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    upstream = torch.tensor(0.7)
    out, grads = _value_and_grads(compiled, (hidden, weight, b), upstream)
    ref, ref_grads = _value_and_grads(f, (hidden, weight, b), upstream)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


# --- sample weights and the normalizer -------------------------------------------------------------

# (reduction, normalizer): the default divisors, and for "mean" a number and a 0-d tensor, neither of them N or
# the number of non-ignored rows (a dropped normalizer shows up).
NORMALIZED = [("none", None), ("sum", None), ("mean", None), ("mean", 7.5), ("mean", "tensor")]
NORMALIZED_IDS = [f"{r}-{n}" for r, n in NORMALIZED]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("reduction, normalizer", NORMALIZED, ids=NORMALIZED_IDS)
def test_sample_weight_and_normalizer_reference_backend(loss_type, reduction, normalizer):
    assert_matches_unfused("reference", loss_type, reduction, torch.float64, chunk_size=7, weighted=True,
                           normalizer=normalizer)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("reduction, normalizer", NORMALIZED, ids=NORMALIZED_IDS)
def test_sample_weight_and_normalizer_kernel_glue(contract_backend, loss_type, reduction, normalizer):
    """Each chunk's slice of the weights reaches the op (forward and, for "none", *_backward)."""
    assert_matches_unfused(contract_backend, loss_type, reduction, torch.float32, chunk_size=6, weighted=True,
                           normalizer=normalizer)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("reduction, normalizer", [("none", None), ("mean", "tensor")], ids=["none", "mean-tensor"])
def test_sample_weight_and_normalizer_backends(backend, loss_type, reduction, normalizer):
    """The real ops: "none" recomputes through *_backward, "mean" forms the gradient in forward."""
    n, h, c, chunk_size = _backend_shape(backend)
    assert_matches_unfused(backend.name, loss_type, reduction, torch.float32, n=n, h=h, c=c, chunk_size=chunk_size,
                           device=backend.device, weighted=True, normalizer=normalizer)


@pytest.mark.parametrize("reduction, normalizer", NORMALIZED, ids=NORMALIZED_IDS)
def test_sample_weight_and_normalizer_without_grad(backend, reduction, normalizer):
    """No parameter needs a gradient: the losses-only path and its reduction take them too."""
    n, h, c, chunk_size = _backend_shape(backend)
    dtype = torch.float32 if backend.is_kernel else torch.float64
    hidden, weight, b, target, cw = _inputs(n, h, c, dtype)
    target[2] = -100
    sample_weight = _sample_weight(target, -100)
    if normalizer == "tensor":
        normalizer = torch.tensor(5.25)
    on = backend.device
    got = cb_linear_loss(hidden.to(on), weight.to(on), target.to(on), cw.to(on), b.to(on), "softmax_focal", GAMMA,
                         reduction, label_smoothing=SMOOTHING, chunk_size=chunk_size, backend=backend.name,
                         sample_weight=sample_weight.to(on), normalizer=_to(normalizer, on))
    want = _weighted_unfused("softmax_focal", hidden.double(), weight.double(), b.double(), target, cw.double(),
                             sample_weight, reduction, normalizer)
    tol = TOL[dtype]
    torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol * float(want.abs().max()))


def test_module_sample_weight_and_normalizer_match_linear_plus_loss():
    """ClassBalancedLinearLoss.forward(hidden, target, sample_weight, normalizer) = nn.Linear followed by
    ClassBalancedLoss(...)(logits, target, sample_weight, normalizer)."""
    counts = [50, 20, 9, 4, 1, 30, 7]
    kw = dict(loss_type="softmax", beta=0.99, label_smoothing=SMOOTHING, backend="reference")
    fused = ClassBalancedLinearLoss(6, counts, chunk_size=5, dtype=torch.float64, **kw)
    linear = torch.nn.Linear(6, len(counts), dtype=torch.float64)
    linear.load_state_dict({k: v for k, v in fused.state_dict().items() if k != "class_weight"})
    loss = cbkernels.ClassBalancedLoss(counts, **kw)
    hidden, _, _, target, _ = _inputs(13, 6, len(counts), torch.float64)
    sample_weight = _sample_weight(target, -100)
    normalizer = torch.tensor(4.0)
    fused(hidden, target, sample_weight, normalizer).backward()
    loss(linear(hidden), target, sample_weight, normalizer).backward()
    torch.testing.assert_close(fused.weight.grad, linear.weight.grad)
    torch.testing.assert_close(fused.bias.grad, linear.bias.grad)


@pytest.mark.parametrize("backend", backend_params([case for case in BACKEND_CASES if case.device == "cuda"],
                                                   kernels_only=True), indirect=True)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_host_sync_with_sample_weight_and_normalizer(backend, reduction):
    """The weights and a 0-d tensor normalizer stay on the device: forward and backward never wait for it."""
    n, h, c = 256, 64, 3000
    hidden, weight, b, target, cw = (t.to("cuda") for t in _inputs(n, h, c, torch.bfloat16))
    sample_weight = _sample_weight(target.cpu(), -100).to("cuda")
    normalizer = torch.tensor(100.0, device="cuda") if reduction == "mean" else None
    params = tuple(p.requires_grad_(True) for p in (hidden, weight, b))
    upstream = torch.ones(n if reduction == "none" else (), device="cuda")

    def step(loss_type):
        out = cb_linear_loss(hidden, weight, target, cw, b, loss_type, reduction=reduction, chunk_size=64,
                             backend=backend.name, sample_weight=sample_weight, normalizer=normalizer)
        torch.autograd.grad(out, params, upstream)

    for loss_type in LOSS_TYPES:
        step(loss_type)  # warm-up outside the sync check: Triton compiles on the first call
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(loss_type)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()


# --- weighting="element" ----------------------------------------------------------------------------
# Every loss (GAMMA and SMOOTHING: the softmax losses run with label smoothing), every reduction, with and without
# sample weights and the normalizer, against the spec with weighting="element" (losses.Loss.reference).

WEIGHTED_NORMALIZED = [(False, "none", None), (False, "sum", None), (False, "mean", None),
                       *[(True, r, n) for r, n in NORMALIZED]]
WEIGHTED_NORMALIZED_IDS = [f"{'weighted-' if w else ''}{r}-{n}" for w, r, n in WEIGHTED_NORMALIZED]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("weighted, reduction, normalizer", WEIGHTED_NORMALIZED, ids=WEIGHTED_NORMALIZED_IDS)
def test_element_weighting_reference_backend(loss_type, weighted, reduction, normalizer):
    assert_matches_unfused("reference", loss_type, reduction, torch.float64, chunk_size=7, weighted=weighted,
                           normalizer=normalizer, weighting="element")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("weighted, reduction, normalizer", WEIGHTED_NORMALIZED, ids=WEIGHTED_NORMALIZED_IDS)
def test_element_weighting_kernel_glue(contract_backend, loss_type, weighted, reduction, normalizer):
    """The class weights reach the op as its element_weight input (whole rows: (C,) for every chunk), forward
    and, for "none", *_backward; its class_weight input is then None."""
    assert_matches_unfused(contract_backend, loss_type, reduction, torch.float32, chunk_size=6, weighted=weighted,
                           normalizer=normalizer, weighting="element")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("weighted, reduction, normalizer", [(False, "none", None), (False, "sum", None),
                                                             (True, "mean", "tensor"), (True, "none", None)],
                         ids=["none", "sum", "weighted-mean-tensor", "weighted-none"])
def test_element_weighting_backends(backend, loss_type, weighted, reduction, normalizer):
    """The real ops' element_weight input: "none" through *_backward, "mean"/"sum" with the gradient from forward."""
    n, h, c, chunk_size = _backend_shape(backend)
    assert_matches_unfused(backend.name, loss_type, reduction, torch.float32, n=n, h=h, c=c, chunk_size=chunk_size,
                           device=backend.device, weighted=weighted, normalizer=normalizer, weighting="element")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_element_weighting_without_grad(backend, reduction):
    """No parameter needs a gradient: the losses-only path passes the element weights too."""
    n, h, c, chunk_size = _backend_shape(backend)
    dtype = torch.float32 if backend.is_kernel else torch.float64
    hidden, weight, b, target, cw = _inputs(n, h, c, dtype)
    on = backend.device
    got = cb_linear_loss(hidden.to(on), weight.to(on), target.to(on), cw.to(on), b.to(on), "softmax_focal", GAMMA,
                         reduction, label_smoothing=SMOOTHING, chunk_size=chunk_size, backend=backend.name,
                         weighting="element")
    want = _unfused("softmax_focal", hidden.double(), weight.double(), b.double(), target, cw.double(), reduction,
                    weighting="element")
    tol = TOL[dtype]
    torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol * float(want.abs().max()))


def test_element_weighting_differs_from_row():
    """With label smoothing the two weightings give different losses (a dropped `weighting` would show up)."""
    hidden, weight, b, target, cw = _inputs(13, 4, 6, torch.float64)
    kw = dict(class_weight=cw, bias=b, loss_type="softmax", label_smoothing=0.3, backend="reference")
    row = cb_linear_loss(hidden, weight, target, **kw)
    element = cb_linear_loss(hidden, weight, target, weighting="element", **kw)
    assert not torch.allclose(row, element)
    torch.testing.assert_close(row, cb_linear_loss(hidden, weight, target, weighting="row", **kw))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_module_element_weighting_matches_linear_plus_loss(loss_type):
    """ClassBalancedLinearLoss(weighting="element") = nn.Linear followed by ClassBalancedLoss(weighting="element")."""
    counts = [50, 20, 9, 4, 1, 30, 7]
    kw = dict(loss_type=loss_type, beta=0.99, gamma=GAMMA, label_smoothing=SMOOTHING, backend="reference",
              weighting="element")
    fused = ClassBalancedLinearLoss(6, counts, chunk_size=5, dtype=torch.float64, **kw)
    assert fused.weighting == "element" and "weighting='element'" in repr(fused)
    linear = torch.nn.Linear(6, len(counts), dtype=torch.float64)
    linear.load_state_dict({k: v for k, v in fused.state_dict().items() if k != "class_weight"})
    loss = cbkernels.ClassBalancedLoss(counts, **kw)
    hidden, _, _, target, _ = _inputs(13, 6, len(counts), torch.float64)
    sample_weight = _sample_weight(target, -100)
    fused(hidden, target, sample_weight, 4.0).mul(1.3).backward()
    loss(linear(hidden), target, sample_weight, 4.0).mul(1.3).backward()
    torch.testing.assert_close(fused.weight.grad, linear.weight.grad)
    torch.testing.assert_close(fused.bias.grad, linear.bias.grad)
    assert "weighting" not in repr(ClassBalancedLinearLoss(6, counts))  # the default stays unsaid


# --- behaviour ---------------------------------------------------------------------------------------

class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op returns and the logits shapes the kernel ops receive."""

    def __init__(self, kernel_namespace=None):
        super().__init__()
        self.largest = 0
        self.kernel_namespace = kernel_namespace
        self.tiles = []  # (op name, shape of its logits argument) of every kernel op call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.kernel_namespace is not None and func.namespace == self.kernel_namespace:
            self.tiles.append((func.name(), tuple(args[0].shape)))
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_n_by_c_tensor(backend, loss_type, reduction):
    """No op (matmul, kernel, reduction, autograd) ever returns more than one (rows, C) tile, forward or
    backward: on the reference, and on the kernel backends, whose ops each see at most chunk_size rows.
    N * C is 8x a tile and larger than every (N, H) and (C, H) tensor."""
    n, h, c, rows = (64, 4, 50, 8) if backend.fits(8, 50) else (12, 2, 9, 3)
    dtype = torch.float32 if backend.is_kernel else torch.float64
    hidden, weight, b, target, cw = (None if t is None else t.to(backend.device) for t in _inputs(n, h, c, dtype))
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    record = backend.record
    with _LargestTensor(record.namespace) as mode:
        out = cb_linear_loss(hidden, weight, target, cw, b, loss_type, reduction=reduction, chunk_size=rows,
                             backend=backend.name)
        out.sum().backward()
    assert n * c > max(rows * c, n * h, c * h)
    assert mode.largest == rows * c, f"largest tensor has {mode.largest} elements, a tile has {rows * c}"
    if record.is_kernel:
        ops = {name for name, _ in mode.tiles}
        family = losses.loss(loss_type).family.name
        assert f"{record.namespace}::{family}_forward" in ops, ops
        if reduction == "none":  # backward recomputes each tile through *_backward
            assert f"{record.namespace}::{family}_backward" in ops, ops
        assert all(shape[0] <= rows and shape[1] == c for _, shape in mode.tiles), mode.tiles
        forward_rows = sum(shape[0] for name, shape in mode.tiles if name.endswith("_forward"))
        assert forward_rows == n, f"the forward tiles cover {forward_rows} rows, not N = {n}"


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_mean_divides_by_non_ignored_rows_hand_written(backend, loss_type):
    """"mean" = (sum of the rows' losses) / (rows whose target is not ignore_index), with the rows and the
    logits written out here (tests/hand_losses.py), over chunks that do not divide N."""
    spec = losses.loss(loss_type)
    n, h, c, ignore_index = 11, 3, 5, 2  # ignore_index is a class index too: the rows of class 2 are ignored
    g = torch.Generator().manual_seed(21)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(c, h, generator=g)
    bias = torch.randn(c, generator=g)
    target = torch.tensor([0, 2, 4, 1, 2, 3, 0, 2, 4, 1, 3])  # 3 ignored rows, 8 counted
    cw = torch.rand(c, generator=g) + 0.5
    logits = [[math.fsum(float(hidden[i, k]) * float(weight[j, k]) for k in range(h)) + float(bias[j])
               for j in range(c)] for i in range(n)]
    counted = sum(1 for y in target.tolist() if y != ignore_index)
    assert counted == 8
    on = backend.device
    for hyper in spec.test_cases():
        kw = dict(loss_type=loss_type, ignore_index=ignore_index, chunk_size=4, backend=backend.name, **hyper)
        total = math.fsum(hand_rows(spec, logits, target, cw, ignore_index, hyper))
        for needs_grad in (False, True):  # the losses-only path, and the autograd.Function's chunked forward
            args = (hidden.detach().to(on).requires_grad_(needs_grad), weight.to(on), target.to(on), cw.to(on), bias.to(on))
            got_mean = cb_linear_loss(*args, reduction="mean", **kw).item()
            got_sum = cb_linear_loss(*args, reduction="sum", **kw).item()
            assert got_mean == pytest.approx(total / counted, rel=1e-5), (hyper, needs_grad)
            assert got_sum == pytest.approx(total, rel=1e-5), (hyper, needs_grad)
        assert total / counted != pytest.approx(total / n, rel=1e-2)  # the two conventions differ here


def test_all_rows_ignored_mean_is_zero():
    hidden, weight, b, target, cw = _inputs(6, 4, 5, torch.float64)
    target = torch.full_like(target, -100)
    weight.requires_grad_(True)
    out = cb_linear_loss(hidden, weight, target, cw, b, "focal", backend="reference", chunk_size=4)
    out.backward()
    assert out.item() == 0.0 and (weight.grad == 0).all()


def test_partial_requires_grad_and_no_grad():
    hidden, weight, b, target, cw = _inputs(11, 4, 7, torch.float64)
    weight.requires_grad_(True)  # frozen features and bias
    out = cb_linear_loss(hidden, weight, target, cw, b, "sigmoid", backend="reference", chunk_size=3)
    (gw,) = torch.autograd.grad(out, weight)
    w2 = weight.detach().clone().requires_grad_(True)
    ref = _unfused("sigmoid", hidden, w2, b, target, cw.double(), "mean")
    torch.testing.assert_close(gw, torch.autograd.grad(ref, w2)[0])
    with torch.no_grad():
        torch.testing.assert_close(cb_linear_loss(hidden, weight, target, cw, b, "sigmoid", backend="reference"),
                                   ref.detach())


def test_backward_twice_with_retain_graph():
    hidden, weight, b, target, cw = _inputs(10, 4, 6, torch.float64)
    weight.requires_grad_(True)
    out = cb_linear_loss(hidden, weight, target, cw, b, "focal", backend="reference", chunk_size=4) * 3.0
    first = torch.autograd.grad(out, weight, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(out, weight)[0], first)


def test_auto_chunk_rows_rule():
    # Tiles get max(4*C*H, 256 MiB) bytes: H/2 rows in fp32, H rows in bf16 for big heads (docs/linear.md).
    assert auto_chunk_rows(4096, 512, 32768, torch.float32) == 1024  # the floor: 2 * 1024 * C * 4 = 256 MiB
    assert auto_chunk_rows(8192, 2048, 131072, torch.bfloat16) == 2048
    assert auto_chunk_rows(10**5, 1024, 10**6, torch.float32) == 512
    assert auto_chunk_rows(100, 512, 32768, torch.float32) == 100  # never more than N
    assert auto_chunk_rows(10**6, 1, 10**8, torch.float32) == 1  # tiles never below one row
    assert auto_chunk_rows(10**6, 8, 10**7, torch.float32) == 4  # H / 2 rows whatever C
    assert auto_chunk_rows(10**6, 8, 10, torch.float32) % 16 == 0


# --- the module ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_module_matches_linear_plus_loss(loss_type, bias):
    counts = [50, 20, 9, 4, 1, 30, 7]
    kw = dict(loss_type=loss_type, beta=0.99, gamma=GAMMA, label_smoothing=SMOOTHING)
    fused = ClassBalancedLinearLoss(6, counts, bias=bias, chunk_size=5, backend="reference", dtype=torch.float64,
                                    **kw)
    linear = torch.nn.Linear(6, len(counts), bias=bias, dtype=torch.float64)
    loss = cbkernels.ClassBalancedLoss(counts, backend="reference", **kw)
    linear.load_state_dict({k: v for k, v in fused.state_dict().items() if k != "class_weight"})
    assert set(fused.state_dict()) == {"weight", "class_weight"} | ({"bias"} if bias else set())
    torch.testing.assert_close(fused.class_weight, loss.class_weight)
    assert [name for name, _ in fused.named_parameters()] == ["weight"] + (["bias"] if bias else [])

    hidden, _, _, target, _ = _inputs(13, 6, len(counts), torch.float64)
    fused(hidden, target).mul(1.3).backward()
    loss(linear(hidden), target).mul(1.3).backward()
    torch.testing.assert_close(fused.weight.grad, linear.weight.grad)
    if bias:
        torch.testing.assert_close(fused.bias.grad, linear.bias.grad)


def test_module_init_like_linear():
    torch.manual_seed(3)
    a = ClassBalancedLinearLoss(16, [5] * 9)
    torch.manual_seed(3)
    b = torch.nn.Linear(16, 9)
    torch.testing.assert_close(a.weight, b.weight)
    torch.testing.assert_close(a.bias, b.bias)


# --- errors -------------------------------------------------------------------------------------------

def _call(**over):
    hidden, weight, b, target, cw = _inputs(5, 4, 6, torch.float32)
    kw = dict(hidden=hidden, weight=weight, target=target, class_weight=cw, bias=b, backend="reference")
    kw.update(over)
    return cb_linear_loss(**kw)


@pytest.mark.parametrize("over, error, match", [
    (dict(hidden=torch.zeros(5)), ValueError, "hidden must have shape"),
    (dict(hidden=[[0.0]]), TypeError, "hidden must be a torch.Tensor"),
    (dict(weight=torch.zeros(6, 3)), ValueError, r"weight must have shape \(C, H\) = \(\?, 4\)"),
    (dict(weight=torch.zeros(6, 4, dtype=torch.float64)), TypeError,
     r"weight must have the dtype of hidden, torch.float32, got torch.float64"),
    (dict(weight=torch.zeros(0, 4)), ValueError, "weight must have at least one class"),
    (dict(bias=torch.zeros(5)), ValueError, r"bias must have shape \(C,\) = \(6,\)"),
    (dict(target=torch.zeros(4, dtype=torch.long)), ValueError, r"target must have shape \(N,\) = \(5,\)"),
    (dict(target=torch.zeros(5)), TypeError, "target must hold class indices as int64 or int32"),
    (dict(class_weight=torch.ones(5)), ValueError, r"class_weight must have shape \(C,\) = \(6,\)"),
    (dict(class_weight=torch.ones(6, requires_grad=True)), ValueError, "class_weight must not require grad"),
    (dict(loss_type="hinge"), ValueError, "loss_type must be one of"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
    (dict(gamma=-1.0), ValueError, "gamma must be"),
    (dict(backend="tpu"), ValueError, "backend must be one of"),
    (dict(target=torch.tensor([0, 1, 2, 6, 1])), RuntimeError, "outside"),
    (dict(sample_weight=torch.ones(4)), ValueError, r"sample_weight must have shape \(N,\) = \(5,\)"),
    (dict(sample_weight=torch.ones(5, 1)), ValueError, "sample_weight must have shape"),
    (dict(sample_weight=torch.ones(5, dtype=torch.long)), TypeError, "sample_weight must be a floating"),
    (dict(sample_weight=torch.ones(5, requires_grad=True)), ValueError, "sample_weight must not require grad"),
    (dict(reduction="sum", normalizer=2.0), ValueError, "normalizer applies to reduction='mean' only"),
    (dict(reduction="none", normalizer=torch.tensor(2.0)), ValueError, "normalizer applies to reduction='mean'"),
    (dict(normalizer=0.0), ValueError, "normalizer must be a finite number > 0"),
    (dict(normalizer=torch.ones(2)), ValueError, "normalizer must be a number or a 0-d real tensor"),
    (dict(weighting="elementwise"), ValueError, r"weighting must be one of \('row', 'element'\), got 'elementwise'"),
    (dict(weighting=None), ValueError, "weighting must be one of .* got None"),
    # A dense (N, C) target (multi-hot, soft, mixup): refused with the memory reason, before any other check.
    (dict(target=torch.rand(5, 6)), ValueError,
     r"cb_linear_loss takes class-index targets \(N,\) only: a dense \(N, C\) target would be one more N x C tensor"),
    (dict(target=torch.rand(5, 6), weighting="element"), ValueError, "which is what it exists to avoid"),
    (dict(target=torch.zeros(5, 6, dtype=torch.long)), ValueError, "cb_linear_loss takes class-index targets"),
])
def test_bad_input_errors(over, error, match):
    with pytest.raises(error, match=match):
        _call(**over)


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="loss_type"):
        ClassBalancedLinearLoss(4, [1, 2], loss_type="hinge")
    with pytest.raises(ValueError, match="in_features"):
        ClassBalancedLinearLoss(0, [1, 2])
    with pytest.raises(ValueError, match="chunk_size"):
        ClassBalancedLinearLoss(4, [1, 2], chunk_size=-3)
    with pytest.raises(ValueError, match="0 samples"):
        ClassBalancedLinearLoss(4, [1, 0])
    with pytest.raises(ValueError, match="weighting must be one of .* got 'rows'"):
        ClassBalancedLinearLoss(4, [1, 2], weighting="rows")


def test_module_refuses_dense_target():
    head = ClassBalancedLinearLoss(4, [3, 2, 1], backend="reference")
    with pytest.raises(ValueError, match="cb_linear_loss takes class-index targets .* N x C tensor"):
        head(torch.randn(5, 4), torch.rand(5, 3))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(reduction):
    hidden, weight, b, target, cw = _inputs(3, 4, 5, torch.float64)
    hidden, target = hidden[:0].requires_grad_(True), target[:0]
    weight.requires_grad_(True)
    out = cb_linear_loss(hidden, weight, target, cw, b, "softmax", reduction=reduction, backend="reference")
    assert out.shape == ((0,) if reduction == "none" else ())
    gh, gw = torch.autograd.grad(out.sum(), (hidden, weight))
    assert gh.shape == (0, 4) and (gw == 0).all()
