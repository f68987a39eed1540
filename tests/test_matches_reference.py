"""Every backend matches the float64 reference: loss and gradient, every registered loss and hyperparameter
case, fp32/fp16/bf16, every reduction, a random and a unit upstream gradient.

Runs on each (backend, device) x strategy pair of conftest.BACKEND_CASES through the `backend` fixture:
CUDA pairs carry pytest.mark.gpu (tools/gpu_check.sh picks this file by that text), Triton pairs
pytest.mark.triton. The shapes come from the pair's budget: C = 301 is 18 full AVX-512 vectors and a
13-element tail (the target sometimes lands in the tail); Triton's CPU interpreter gets (4, 33), which
its forced small tile (16 columns, 2 rows per program) splits into 3 tiles, the last one partial, so C
spans several tiles and the softmax takes its two-pass path. The launch-configuration overrides of the
pair (Triton: small tiles, then its table, one tile per row at these C: the single-read softmax; CUDA: the
default table, then the streaming softmax) split the cases: reduction "none" runs under every override,
the other random-upstream cases under the first, the unit-upstream cases under the last.
Shapes, layouts, targets and extreme values are in test_backend_edges.py.
"""
import pytest

from cases import DTYPES, REDUCTIONS, check_on_configs, loss_cases, make_inputs

DEFAULT_SHAPE, TINY_SHAPE = (37, 301), (4, 33)


@pytest.mark.parametrize("spec,hyper", loss_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference(backend, spec, hyper, dtype, reduction):
    n, c = backend.pick(DEFAULT_SHAPE, TINY_SHAPE)
    logits, target, weight = make_inputs(n, c, dtype, backend.device)
    # Every override on "none" (a different upstream gradient per row), the first elsewhere.
    configs = "all" if reduction == "none" else "first"
    check_on_configs(backend, spec, hyper, logits, target, weight, reduction=reduction, configs=configs)


@pytest.mark.parametrize("spec,hyper", loss_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_unit_upstream_grad(backend, spec, hyper, dtype, reduction):
    # loss.backward(): the fused backward returns the forward's buffer unscaled ("mean" folded 1/count
    # into the class weights), so the forward alone must have written the final gradient.
    n, c = backend.pick(DEFAULT_SHAPE, TINY_SHAPE)
    logits, target, weight = make_inputs(n, c, dtype, backend.device)
    check_on_configs(backend, spec, hyper, logits, target, weight, reduction=reduction, unit_upstream=True,
                     configs="last")
