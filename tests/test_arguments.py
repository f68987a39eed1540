"""Scalar arguments as users pass them, values that overflow the kernels' types, and non-dense logits.

Every number a loss takes (gamma, label_smoothing, ignore_index, chunk_size) accepts the real scalars a
user would have at hand: Python numbers, numpy scalars and 0-d CPU tensors, with the same result as the
Python number. bool is refused (True as a gamma or a class index is a mistake), as are values the
kernels' float32 / int64 cannot hold, each with an error naming the argument.
"""
import math

import numpy as np
import pytest
import torch

import cbkernels as cb
from cbkernels import losses
from cases import family_hyperparameters

GAMMA_FORMS = [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64),
               np.int64(2), torch.tensor(2)]


def _inputs(device="cpu"):
    logits = torch.randn(6, 5)
    target = torch.tensor([0, 4, 2, -100, 1, 3])
    return logits.to(device), target.to(device), (torch.rand(5) + 0.1).to(device)


@pytest.mark.parametrize("gamma", GAMMA_FORMS, ids=lambda g: f"{type(g).__name__}-{float(g):g}")
def test_gamma_of_any_real_scalar_type(gamma, backend):
    logits, target, weight = _inputs(backend.device)
    kw = dict(backend=backend.name, reduction="none")
    got = cb.cb_focal_loss(logits, target, weight, gamma=gamma, **kw)
    expected = cb.cb_focal_loss(logits, target, weight, gamma=float(gamma), **kw)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("eps", [np.float32(0.25), torch.tensor(0.25), np.float64(0.25)],
                         ids=lambda e: type(e).__name__)
def test_label_smoothing_of_any_real_scalar_type(eps):
    logits, target, weight = _inputs()
    got = cb.cb_softmax_cross_entropy(logits, target, weight, label_smoothing=eps)
    assert torch.equal(got, cb.cb_softmax_cross_entropy(logits, target, weight, label_smoothing=0.25))


@pytest.mark.parametrize("ignore_index", [np.int64(-100), np.int32(-100), torch.tensor(-100)],
                         ids=lambda i: type(i).__name__)
def test_ignore_index_of_any_integer_type(ignore_index):
    logits, target, weight = _inputs()
    for spec in losses.LOSSES:
        function = getattr(cb, spec.function)
        got = function(logits, target, weight, ignore_index=ignore_index, reduction="none")
        assert torch.equal(got, function(logits, target, weight, reduction="none")), spec.name
    module = cb.ClassBalancedLoss([4, 3, 2, 2, 1], ignore_index=ignore_index)
    assert module.ignore_index == -100 and type(module.ignore_index) is int


def test_chunk_size_of_numpy_type():
    hidden, weight = torch.randn(6, 3), torch.randn(5, 3)
    target = torch.tensor([0, 4, 2, 1, 1, 3])
    got = cb.cb_linear_loss(hidden, weight, target, chunk_size=np.int64(2))
    assert torch.allclose(got, cb.cb_linear_loss(hidden, weight, target, chunk_size=2))
    assert cb.ClassBalancedLinearLoss(3, [2] * 5, chunk_size=np.int64(4)).chunk_size == 4


@pytest.mark.parametrize("gamma", [True, np.bool_(True), torch.tensor(True), 1e39, np.float64(1e39), -1,
                                   math.nan, math.inf, "2", torch.tensor([0.5]), 1 + 0j],
                         ids=["bool", "np.bool_", "tensor-bool", "above-float32-max", "np-above-float32-max",
                              "negative", "nan", "inf", "str", "1-d-tensor", "complex"])
def test_bad_gamma_names_the_argument(gamma):
    logits, target, weight = _inputs()
    with pytest.raises(ValueError, match="gamma must be"):
        cb.cb_focal_loss(logits, target, weight, gamma=gamma)
    with pytest.raises(ValueError, match="gamma must be"):
        cb.ClassBalancedLoss([4, 3, 2, 2, 1], gamma=gamma)


@pytest.mark.gpu
def test_cuda_tensor_gamma_is_refused_without_a_sync():
    logits, target, weight = _inputs("cuda")
    with pytest.raises(ValueError, match="gamma must be a real number; a tensor must be 0-d, real and on the CPU"):
        cb.cb_focal_loss(logits, target, weight, gamma=torch.tensor(0.5, device="cuda"))


@pytest.mark.parametrize("value, error, match", [
    (2**70, ValueError, "ignore_index must fit int64"),
    (-(2**63) - 1, ValueError, "ignore_index must fit int64"),
    (True, TypeError, "ignore_index must be an int"),
    (np.bool_(False), TypeError, "ignore_index must be an int"),
    (np.float64(-100), TypeError, "ignore_index must be an int"),
    (torch.tensor(-100.0), TypeError, "ignore_index must be an int"),
])
def test_bad_ignore_index_names_the_argument(value, error, match):
    logits, target, weight = _inputs()
    with pytest.raises(error, match=match):
        cb.cb_softmax_cross_entropy(logits, target, weight, ignore_index=value)


def test_int64_extremes_of_ignore_index_are_accepted():
    logits, target, weight = _inputs()
    for value in (-(2**63), 2**63 - 1):
        ignored = torch.full_like(target, value)
        assert float(cb.cb_focal_loss(logits, ignored, weight, ignore_index=value)) == 0.0


@pytest.mark.parametrize("chunk_size", [0, -1, True, 2.0, np.float32(2)], ids=str)
def test_bad_chunk_size_names_the_argument(chunk_size):
    hidden, weight = torch.randn(6, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        cb.cb_linear_loss(hidden, weight, torch.zeros(6, dtype=torch.long), chunk_size=chunk_size)


@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr"])
def test_non_dense_logits_are_refused_by_name(layout, backend):
    logits, target, weight = _inputs(backend.device)
    sparse = logits.to_sparse() if layout == "sparse_coo" else logits.to_sparse_csr()
    for spec in losses.LOSSES:
        with pytest.raises(TypeError, match="logits must be a dense tensor"):
            getattr(cb, spec.function)(sparse, target, weight, backend=backend.name)


@pytest.mark.skipif("cpu" not in cb.available_backends("cpu"), reason="the C++ CPU kernels are not built")
def test_raw_cpu_ops_refuse_sparse_logits():
    logits, target, weight = _inputs()
    for family in losses.FAMILIES:
        op = family.op(torch.ops.cbkernels, "forward")
        with pytest.raises(RuntimeError, match="logits must be a dense tensor"):
            op(logits.to_sparse(), target, weight, *family_hyperparameters(family), -100, True)


@pytest.mark.parametrize("name, value", [("gamma", -1.0), ("gamma", 1e39), ("gamma", math.nan),
                                         ("label_smoothing", 2.0), ("label_smoothing", -0.1),
                                         ("label_smoothing", math.nan)])
def test_raw_ops_refuse_bad_hyperparameters(name, value, kernel_backend):
    """The ops are reachable without the public functions' checks: each refuses what the kernels cannot
    take, naming the hyperparameter, on every kernel backend (C++: RuntimeError, Triton: ValueError)."""
    logits, target, weight = _inputs(kernel_backend.device)
    family = next(f for f in losses.FAMILIES if name in [h.name for h in f.hyperparameters])
    forward = family.op(kernel_backend.record.ops, "forward")
    with pytest.raises((RuntimeError, ValueError), match=f"{name} must be"):
        forward(logits, target, weight, value, -100, True)
