"""Scale: N * C > 2^31 elements on the CPU backend, and one row of 10^6 classes on every backend pair (the
`backend` fixture: CUDA pairs carry pytest.mark.gpu; Triton's CPU interpreter skips it, over its budget).

The big case, bf16 logits of shape (2, 2^30 + 3), is 2^31 + 6 elements (4.3 GB, plus 4.3 GB of gradient):
any int32 offset, or an fp32 running sum that stops growing at 2^24, breaks it. The reference cannot
run at that size, so each row is constant and its loss and gradient have a closed form (float64, below;
checked against the reference at C = 1003 by test_closed_forms_at_small_size).
It runs with the "recompute" backward so that only one gradient buffer exists (about 9 GB in all).
"""
import math

import pytest
import torch

import cbkernels as cb
from cases import call, check_on_configs, loss_cases, make_inputs

HUGE_C = 2**30 + 3
ROW_VALUES = (0.5, -2.0)  # exact in bf16
TARGETS = (HUGE_C - 1, 123_456_789)  # the last column, and one far from both ends
UPSTREAM = (1.0, -0.5)


def _sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def _softplus(v):
    return max(v, 0.0) + math.log1p(math.exp(-abs(v)))


def _softmax_closed_form(a, num_classes, label_smoothing):
    """Constant row: every probability is 1/C, so loss = log C (the smoothing term eps (z_y - mean z) is 0)
    and grad = 1/C - (1 - eps) onehot - eps / C."""
    eps = label_smoothing
    return math.log(num_classes), (1.0 - eps) / num_classes, 1.0 / num_classes - (1.0 - eps) - eps / num_classes


def _focal_closed_form(a, num_classes, gamma):
    """Constant row a: the target's u = a, every negative's u = -a (docs/math.md)."""

    def term_and_slope(u):  # term(u) = (1 - p)^gamma softplus(-u) and d term / du
        p, q = _sigmoid(u), _sigmoid(-u)
        mod = q**gamma
        return mod * _softplus(-u), mod * (gamma * p * math.log(p) - q)

    target_term, target_slope = term_and_slope(a)
    negative_term, negative_slope = term_and_slope(-a)
    return target_term + (num_classes - 1) * negative_term, -negative_slope, target_slope


def _softmax_focal_closed_form(a, num_classes, gamma, label_smoothing):
    """Constant row: p = 1/C for every class, so each term is mod * log C with mod = (1 - 1/C)^gamma, and the
    loss is that (the q' sum to 1). docs/math.md 13.1: h = -mod (1 + gamma p l / q) is the same for every
    class, G = sum_c q'_c h = h, so grad_j = h (q'_j - 1/C)."""
    eps, p = label_smoothing, 1.0 / num_classes
    mod = (1.0 - p) ** gamma
    h = -mod * (1.0 + gamma * p * math.log(num_classes) / (1.0 - p))
    return mod * math.log(num_classes), h * (eps * p - p), h * (1.0 - eps + eps * p - p)


# Per kernel family: (row value, C, its hyperparameters by name) -> (loss, gradient of a negative class,
# gradient of the target class).
CLOSED_FORMS = {"softmax_ce": _softmax_closed_form, "sigmoid_focal": _focal_closed_form,
                "softmax_focal": _softmax_focal_closed_form}


def closed_form(spec, hyper, a, num_classes):
    assert spec.family.name in CLOSED_FORMS, f"write the closed form of family {spec.family.name!r} here"
    named = dict(zip((h.name for h in spec.family.hyperparameters), spec.kernel_hyperparameters(hyper)))
    return CLOSED_FORMS[spec.family.name](a, num_classes, **named)


def check_constant_rows(backend, spec, hyper, num_classes, targets):
    """Rows of constant logits ROW_VALUES (bf16) of width num_classes against the closed forms."""
    logits = torch.empty(2, num_classes, dtype=torch.bfloat16)
    for row, value in enumerate(ROW_VALUES):
        logits[row].fill_(value)
    logits.requires_grad_(True)
    target = torch.tensor(targets)
    rows = call(spec, logits, target, backend=backend, reduction="none", hyper=hyper)
    expected = [closed_form(spec, hyper, a, num_classes) for a in ROW_VALUES]
    rows.backward(torch.tensor(UPSTREAM))
    grad, rows = logits.grad, rows.detach()
    del logits
    g = torch.Generator().manual_seed(0)
    for row, (value, negative, on_target) in enumerate(expected):
        # fp32 sums over 2^30 terms: blocked or pairwise accumulation keeps ~1e-6; 1e-4 leaves headroom
        # while an accumulator that saturates (fp32 at 2^24) or wraps misses by orders of magnitude.
        assert math.isclose(float(rows[row]), value, rel_tol=1e-4), (row, float(rows[row]), value)
        y = targets[row]
        lo = max(0, num_classes - 2**20)
        columns = torch.cat([torch.tensor([0, 1, num_classes - 2, num_classes - 1, y - 1, y + 1]),
                             torch.randint(lo, num_classes, (64,), generator=g)])  # row 1: across offset 2^31
        columns = columns[(columns != y) & (columns >= 0) & (columns < num_classes)]
        got = grad[row, columns].double()
        want = torch.full_like(got, UPSTREAM[row] * negative)
        # One rounding to bf16 after fp32 math: 4 * 2^-8 relative.
        torch.testing.assert_close(got, want, rtol=4 * 2.0**-8, atol=0, msg=lambda m: f"row {row} negatives: {m}")
        assert math.isclose(float(grad[row, y]), UPSTREAM[row] * on_target, rel_tol=4 * 2.0**-8), (
            row, float(grad[row, y]), UPSTREAM[row] * on_target)


@pytest.mark.parametrize("spec,hyper", loss_cases(full=False))
def test_closed_forms_at_small_size(spec, hyper):
    """The closed forms of the big test, checked where the reference can run (C = 1003)."""
    check_constant_rows("reference", spec, hyper, 1003, (1002, 17))


@pytest.mark.slow
@pytest.mark.skipif("cpu" not in cb.available_backends("cpu"), reason="the C++ CPU kernels are not built")
@pytest.mark.parametrize("spec,hyper", loss_cases(full=False))
def test_more_than_2_pow_31_elements(spec, hyper, monkeypatch):
    monkeypatch.setenv("CBKERNELS_BACKWARD", "recompute")
    check_constant_rows("cpu", spec, hyper, HUGE_C, TARGETS)


@pytest.mark.parametrize("spec,hyper", loss_cases(full=False))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_row_of_a_million_classes(backend, spec, hyper, dtype):
    backend.require(1, 10**6)
    logits, target, weight = make_inputs(1, 10**6, dtype, backend.device)
    check_on_configs(backend, spec, hyper, logits, target, weight, configs="first", reduction="mean")


def test_int64_offsets_on_a_gpu(kernel_backend):
    """N * C > 2^31 elements (bf16: 4.3 GB each for logits and gradient): row offsets need int64. On a GPU
    only (the CPU kernels' case is test_more_than_2_pow_31_elements)."""
    if kernel_backend.device != "cuda":
        pytest.skip(f"{kernel_backend.id}: a GPU-sized case")
    ops = kernel_backend.record.ops
    n, c = 16400, 131072  # 2.15e9 elements
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * c * 2:
        pytest.skip(f"needs {3 * n * c * 2 / 2**30:.1f} GiB free on the GPU")
    logits = torch.zeros(n, c, dtype=torch.bfloat16, device="cuda")
    target = torch.zeros(n, dtype=torch.long, device="cuda")
    target[-1] = c - 1
    logits[-1, c - 1] = 5.0
    rows, grad = ops.softmax_ce_forward(logits, target, None, 0.0, -100, True)
    assert abs(rows[-1].item() - (math.log(c - 1 + math.exp(5.0)) - 5.0)) < 1e-4
    assert abs(rows[0].item() - math.log(c)) < 1e-4
    assert grad[-1, c - 1].float().item() < 0 < grad[-1, 0].float().item()
    del grad
    rows_f, _ = ops.sigmoid_focal_forward(logits, target, None, 0.0, -100, False)
    # row 0: C terms of softplus(0) = log 2; last row: C - 1 of them plus softplus(-5) for its true class
    torch.testing.assert_close(rows_f[[0, -1]].double().cpu(), torch.tensor(
        [c * math.log(2.0), (c - 1) * math.log(2.0) + math.log1p(math.exp(-5.0))], dtype=torch.float64),
        rtol=2e-5, atol=0)
