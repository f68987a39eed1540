"""Which backend and backward strategy a call gets (cbkernels/_backends.py), as README.md and the module promise:

- backend="auto" on CUDA tensors prefers "triton", then "cuda", then "reference"; on CPU tensors "cpu", then
  "reference" (never the Triton interpreter); float64 always goes to "reference". The choice logic is tested
  without a GPU by faking which backends are available (`_backends.unavailable_reason` is what it asks), and
  on a real device by a gpu-marked test.
- CBKERNELS_BACKEND forces the backend of every "auto" call; CBKERNELS_BACKWARD=fused|recompute forces the
  backward strategy, and any other value is a ValueError naming the variable.
"""
from __future__ import annotations

import types

import pytest
import torch

import cbkernels as cb
from cbkernels import _backends, losses

KERNEL_RECORDS = [record for record in (_backends.get(name) for name in _backends.BACKENDS if name != "auto")
                  if record.is_kernel]
LOSS_FUNCTIONS = [pytest.param(spec, id=spec.name) for spec in losses.LOSSES]
BAD_STRATEGIES = ["fast", "Fused", "RECOMPUTE", "fused ", "none", "1"]


def _ids(value):
    if isinstance(value, (set, frozenset)):
        return "available=" + ("+".join(sorted(value)) or "none")
    return None


def _fake_logits(device_type: str, dtype=torch.float32):
    """What resolve reads of the logits (device, dtype, is_cpu), for a device this machine may not have."""
    return types.SimpleNamespace(device=torch.device(device_type), dtype=dtype, is_cpu=device_type == "cpu")


@pytest.fixture
def fake_availability(monkeypatch):
    """set_available(names): only those backends (and "reference") count as available, on any device."""
    monkeypatch.delenv("CBKERNELS_BACKEND", raising=False)
    asked = []

    def set_available(names):
        def unavailable_reason(backend, device):
            name = backend.name if isinstance(backend, _backends.Backend) else backend
            asked.append((name, device.type))
            return None if name == "reference" or name in names else f"{name} faked unavailable"
        monkeypatch.setattr(_backends, "unavailable_reason", unavailable_reason)
        monkeypatch.setattr(_backends, "_AUTO_CHOICE", {})  # "auto" decides once per device type: anew here
        return asked

    return set_available


# --- "auto" ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", _backends.KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("available, expected", [
    ({"cuda", "triton", "cpu"}, "triton"),
    ({"cuda", "triton"}, "triton"),
    ({"cuda"}, "cuda"),
    ({"triton"}, "triton"),
    ({"cuda", "cpu"}, "cuda"),  # the CPU kernels never take CUDA tensors
    ({"cpu"}, "reference"),
    (set(), "reference"),
], ids=_ids)
def test_auto_on_cuda_prefers_triton_then_cuda_then_reference(fake_availability, available, expected, dtype):
    asked = fake_availability(available)
    record = _backends.resolve("auto", _fake_logits("cuda", dtype))
    assert record is _backends.get(expected)
    assert asked and all(device == "cuda" for _, device in asked)


@pytest.mark.parametrize("available, expected", [
    ({"cpu", "triton", "cuda"}, "cpu"),
    ({"triton", "cuda"}, "reference"),  # Triton on CPU tensors is the interpreter: tests only, never "auto"
    (set(), "reference"),
], ids=_ids)
def test_auto_on_cpu_prefers_cpu_then_reference(fake_availability, available, expected):
    fake_availability(available)
    assert _backends.resolve("auto", _fake_logits("cpu")) is _backends.get(expected)


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_auto_sends_float64_to_the_reference(fake_availability, device_type):
    fake_availability({"cpu", "cuda", "triton"})
    assert _backends.resolve("auto", _fake_logits(device_type, torch.float64)).name == "reference"


def test_cbkernels_backend_forces_the_auto_choice(fake_availability, monkeypatch):
    fake_availability({"cuda", "triton"})
    monkeypatch.setenv("CBKERNELS_BACKEND", "triton")
    assert _backends.resolve("auto", _fake_logits("cuda")).name == "triton"
    monkeypatch.setenv("CBKERNELS_BACKEND", "reference")
    assert _backends.resolve("auto", _fake_logits("cuda")).name == "reference"
    monkeypatch.setenv("CBKERNELS_BACKEND", "cpu")  # forced onto a device it cannot run on: an error, no fallback
    with pytest.raises(RuntimeError, match="backend 'cpu' is not available"):
        _backends.resolve("auto", _fake_logits("cuda"))
    monkeypatch.setenv("CBKERNELS_BACKEND", "auto")
    with pytest.raises(ValueError, match="CBKERNELS_BACKEND must be one of"):
        _backends.resolve("auto", _fake_logits("cuda"))
    monkeypatch.setenv("CBKERNELS_BACKEND", "triton")  # an explicit backend is not overridden
    assert _backends.resolve("cuda", _fake_logits("cuda")).name == "cuda"


def test_auto_on_this_machine_matches_available_backends(monkeypatch):
    monkeypatch.delenv("CBKERNELS_BACKEND", raising=False)
    x = torch.randn(3, 4)
    expected = "cpu" if "cpu" in cb.available_backends("cpu") else "reference"
    assert _backends.resolve("auto", x).name == expected


@pytest.mark.gpu
@pytest.mark.parametrize("spec", LOSS_FUNCTIONS)
def test_auto_on_a_real_cuda_device(monkeypatch, spec):
    monkeypatch.delenv("CBKERNELS_BACKEND", raising=False)
    monkeypatch.delenv("CBKERNELS_BACKWARD", raising=False)
    available = cb.available_backends("cuda")
    expected = next((name for name in ("triton", "cuda") if name in available), "reference")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, 37, generator=g).cuda()
    t = torch.randint(0, 37, (16,), generator=g).cuda()
    w = (torch.rand(37, generator=g) + 0.5).cuda()
    assert _backends.resolve("auto", x).name == expected
    assert _backends.resolve("auto", x.double()).name == "reference"
    fn = getattr(cb, spec.function)
    torch.testing.assert_close(fn(x, t, w, backend="auto"), fn(x, t, w, backend=expected), rtol=0, atol=0)


# --- CBKERNELS_BACKWARD ---------------------------------------------------------------------------------

@pytest.mark.parametrize("record", KERNEL_RECORDS, ids=lambda r: r.name)
def test_backward_strategy_default_and_forced(monkeypatch, record):
    monkeypatch.delenv("CBKERNELS_BACKWARD", raising=False)
    assert record.strategy() == record.default_strategy and record.default_strategy in _backends.STRATEGIES
    for strategy in _backends.STRATEGIES:
        monkeypatch.setenv("CBKERNELS_BACKWARD", strategy)
        assert record.strategy() == strategy
    monkeypatch.setenv("CBKERNELS_BACKWARD", "")  # empty is unset
    assert record.strategy() == record.default_strategy


@pytest.mark.parametrize("record", KERNEL_RECORDS, ids=lambda r: r.name)
def test_backward_strategy_under_torch_compile(monkeypatch, record):
    """Traced, the GPU backends default to "recompute" (the traced fused backward cannot skip its scaling
    pass: four passes over N x C against three); the CPU keeps "fused"; CBKERNELS_BACKWARD still wins."""
    monkeypatch.delenv("CBKERNELS_BACKWARD", raising=False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    expected = {"cpu": "fused", "cuda": "recompute", "triton": "recompute"}[record.name]
    assert record.strategy() == expected
    monkeypatch.setenv("CBKERNELS_BACKWARD", "fused")
    assert record.strategy() == "fused"


@pytest.mark.parametrize("record", KERNEL_RECORDS, ids=lambda r: r.name)
@pytest.mark.parametrize("value", BAD_STRATEGIES)
def test_bad_backward_strategy_is_a_clear_error(monkeypatch, record, value):
    monkeypatch.setenv("CBKERNELS_BACKWARD", value)
    with pytest.raises(ValueError, match=r"CBKERNELS_BACKWARD must be one of \('fused', 'recompute'\)") as info:
        record.strategy()
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("spec", LOSS_FUNCTIONS)
def test_bad_backward_strategy_through_the_public_losses(kernel_backend, monkeypatch, spec):
    """A training call (logits that need a gradient) on each kernel backend reads the variable and refuses a
    bad value before any kernel runs; the module does the same."""
    monkeypatch.setenv("CBKERNELS_BACKWARD", "fast")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, generator=g).to(kernel_backend.device).requires_grad_(True)
    t = torch.tensor([0, 1, 4, -100], device=kernel_backend.device)
    with pytest.raises(ValueError, match="CBKERNELS_BACKWARD must be one of") as info:
        getattr(cb, spec.function)(x, t, backend=kernel_backend.name)
    assert "'fast'" in str(info.value)
    module = cb.ClassBalancedLoss([3, 1, 4, 1, 5], loss_type=spec.name, backend=kernel_backend.name)
    with pytest.raises(ValueError, match="CBKERNELS_BACKWARD"):
        module.to(kernel_backend.device)(x, t)
    assert x.grad is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a CUDA device")
def test_no_backend_but_reference_on_cuda_without_a_cuda_device():
    # Under TRITON_INTERPRET=1 (set by conftest.py here) Triton runs on CPU tensors, not on a CUDA device.
    assert cb.available_backends("cuda") == ["reference"]
