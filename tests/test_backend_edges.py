"""Every backend matches the float64 reference at the edges: shapes (N = 1, C = 1, odd C, iNaturalist's
C = 8142, C > 65536 and C > 2^18 where the pair's budget allows), non-contiguous logits, int32 targets
without class weights, other ignore_index values, a large upstream gradient, |z| ~ 1e4, all-zero logits
(the branch point u = 0) and -inf class masks.

Runs on each (backend, device) x strategy pair through the `backend` fixture (conftest.py): CUDA pairs
carry pytest.mark.gpu, Triton pairs pytest.mark.triton; shapes beyond a pair's budget skip, saying so.
Shapes, layouts and extreme values run under the pair's first launch-configuration override (Triton on
the CPU: a forced small tile, so the tiny shapes it gets still span several tiles, where a row's maximum
or a stride could go wrong between tiles); what does not depend on the tiling (target dtype and weights,
ignore_index, the upstream scale, all-zero rows) under the last (Triton: its table, one tile per row,
a quarter of the interpreter's time).
"""
import pytest
import torch

from cases import (DTYPES, REDUCTIONS, assert_finite_means_right, assert_grad_close, check_on_configs, loss_and_grad,
                   loss_cases, make_inputs, reference_loss_and_grad)

EDGE_SHAPES = [(1, 1), (3, 7)]  # one class; a prime C below every vector width
# (N, C, dtype), for each loss at its defaults where the pair's budget allows: iNaturalist's C (rows not a
# multiple of 16 bytes: every row starts at another alignment), at a small and at a real batch, C > 65536
# (the streaming softmax), C > 2^18 (many vectors per thread).
LARGE_SHAPES = [(64, 8142, torch.float32), (1024, 8142, torch.bfloat16), (1024, 8142, torch.float32),
                (5, 70001, torch.float32), (2, 262147, torch.bfloat16)]


def check(backend, spec, hyper, logits, target, weight, configs="first", **kw):
    check_on_configs(backend, spec, hyper, logits, target, weight, configs=configs, **kw)


@pytest.mark.parametrize("spec,hyper", loss_cases())
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=str)
def test_shapes(backend, spec, hyper, shape):
    backend.require(*shape)
    logits, target, weight = make_inputs(*shape, torch.float32, backend.device)
    check(backend, spec, hyper, logits, target, weight, reduction="none")


@pytest.mark.parametrize("spec,hyper", loss_cases(full=False))
@pytest.mark.parametrize("n,c,dtype", LARGE_SHAPES, ids=str)
def test_large_shapes(backend, spec, hyper, n, c, dtype):
    backend.require(n, c)
    logits, target, weight = make_inputs(n, c, dtype, backend.device)
    check(backend, spec, hyper, logits, target, weight, reduction="mean")


@pytest.mark.parametrize("spec,hyper", loss_cases())
def test_int32_targets_unweighted(backend, spec, hyper):
    n, c = backend.pick((20, 53), (4, 33))
    logits, target, weight = make_inputs(n, c, torch.float32, backend.device, target_dtype=torch.int32,
                                         weighted=False)
    check(backend, spec, hyper, logits, target, weight, configs="last", reduction="mean")


@pytest.mark.parametrize("spec,hyper", loss_cases())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_large_upstream_grad(backend, spec, hyper, reduction):
    # a large upstream gradient: the per-row scale must reach every element of the row
    n, c = backend.pick((24, 97), (4, 33))
    logits, target, weight = make_inputs(n, c, torch.float32, backend.device)
    check(backend, spec, hyper, logits, target, weight, configs="last", reduction=reduction, upstream_scale=1e3)


@pytest.mark.parametrize("spec,hyper", loss_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_logits(backend, spec, hyper, dtype):
    # |z| up to ~4e4: exp(-z) of a naive sigmoid and exp(z) of a naive softmax overflow in fp32; the
    # probabilities are exactly 0 or 1.
    n, c = backend.pick((16, 333), (4, 33))
    logits, target, weight = make_inputs(n, c, dtype, backend.device, scale=1e4)
    check(backend, spec, hyper, logits, target, weight, reduction="none")


@pytest.mark.parametrize("spec,hyper", loss_cases())
def test_zero_logits(backend, spec, hyper):
    # u = 0 exactly: the branch point of |u| and max(u, 0); p = q = 1/2 on both sides.
    c = 40 if backend.fits(6, 40) else 17
    logits = torch.zeros(6, c, device=backend.device)
    target = torch.tensor([0, c - 1, 5, -100, c // 2, 3], device=backend.device)
    weight = torch.rand(c, device=backend.device) + 0.5
    check(backend, spec, hyper, logits, target, weight, configs="last", reduction="none")


@pytest.mark.parametrize("spec,hyper", loss_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noncontiguous_logits(backend, spec, hyper, dtype):
    n, c = backend.pick((19, 211), (4, 33))
    logits, target, weight = make_inputs(n, c, dtype, backend.device, noncontiguous=True)  # column stride 2
    assert logits.stride(1) != 1
    check(backend, spec, hyper, logits, target, weight, reduction="mean")
    logits, target, weight = make_inputs(2 * n, c, dtype, backend.device)
    rows, row_target = logits[::2], target[::2].clone()  # row stride 2 * C, column stride 1
    assert rows.stride() == (2 * c, 1)
    check(backend, spec, hyper, rows, row_target, weight, reduction="sum")


@pytest.mark.parametrize("spec,hyper", loss_cases())
@pytest.mark.parametrize("ignore_index", [-1, 4])
def test_ignore_index(backend, spec, hyper, ignore_index):
    # ignore_index = 4 is also a class index: rows with target 4 are ignored, not trained on class 4.
    n, c = backend.pick((30, 64), (6, 33))
    logits, target, weight = make_inputs(n, c, torch.float32, backend.device, ignore_index=ignore_index,
                                         ignore_frac=0.4)
    target[1] = ignore_index
    check(backend, spec, hyper, logits, target, weight, configs="last", reduction="mean", ignore_index=ignore_index)


@pytest.mark.parametrize("spec,hyper", loss_cases())
def test_masked_classes_minus_inf(backend, spec, hyper):
    """Classes masked with -inf: a whole leading block (1100 of 1500 classes: more than the CPU kernels'
    1024-element online log-sum-exp block; on the interpreter 24 of 40, more than its 16-column small tile)
    and one row's tail. Where the reference is finite the backend must give its value; where it is not
    (label smoothing puts target mass on the masked classes: +inf) the backend must not be finite either."""
    n, c, masked = (6, 1500, 1100) if backend.fits(6, 1500) else (4, 40, 24)
    logits, target, weight = make_inputs(n, c, torch.float32, backend.device, ignore_frac=0.0)
    logits[:, :masked] = float("-inf")
    logits[2, c - c // 8:] = float("-inf")
    target = masked + target % (c - masked - c // 8)
    upstream = torch.linspace(0.5, 1.5, n, dtype=torch.float64)
    with backend.configs()[0]:
        out, grad = loss_and_grad(spec, logits, target, weight, upstream.float().to(backend.device), backend=backend,
                                  reduction="none", hyper=hyper)
    ref_out, ref_grad = reference_loss_and_grad(spec, logits, target, weight, upstream, reduction="none",
                                                hyper=hyper)
    assert_finite_means_right(out, ref_out, f"{backend.id} masked loss")
    if torch.isfinite(ref_out).all():
        assert torch.isfinite(out).all(), "a -inf class mask must give the reference's finite loss"
        assert_grad_close(grad, ref_grad, torch.float32, f"{backend.id} masked grad")

