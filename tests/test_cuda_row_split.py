"""The CUDA backend's rows split into column chunks (csrc/cuda/split_kernels.cuh; the rule: launch.cu split_plan).
GPU only.

A call with fewer rows than the device has SMs (and, for the softmax with a gradient, fewer than two per SM when
one row per SM overflows half of L2) splits each long row into chunks: with the default launch table, rows of
65536 columns and more (512 threads a row, at least 64 elements a thread in each chunk). These tests run such
shapes through the public functions and the raw ops against the float64 reference: every loss of the registry,
the three storage dtypes, the targets at the chunks' edges, ignored rows, bad targets and NaN logits, forward
with and without the gradient and the backward op, and a narrower launch configuration
(CBKERNELS_CUDA_CONFIG, 64 threads a row: rows of 8192 columns split) so that short rows also cover many
chunks. Each test that expects the split asserts that its kernels ran (a profiler's kernel names), so none
passes on the unsplit kernels; the inputs that keep the unsplit kernels are checked the same way.
"""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from cases import (assert_grad_close, assert_loss_close, assert_matches_reference, family_hyperparameters,
                   loss_cases, make_inputs)
from cbkernels import _ops, losses

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
SPLIT_KERNELS = ("sigmoid_split_kernel", "softmax_split_stats_kernel")
# 64 threads a row, one row a block: chunks of at least 64 * 64 columns, so rows of 8192 columns split.
NARROW = "threads=64,rows=1"


@pytest.fixture(autouse=True)
def _needs_cuda_kernels():
    if not _ops.extension_has_kernel("CUDA"):
        pytest.fail("cbkernels._C has no CUDA kernels on a CUDA machine: build with CBKERNELS_BUILD_CUDA=1")


def sms() -> int:
    return torch.cuda.get_device_properties(DEVICE).multi_processor_count


def kernels_of(fn):
    """fn's result and the names of the CUDA kernels it launched."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    return out, [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def assert_split(names, expected=True):
    split = any(k in name for name in names for k in SPLIT_KERNELS)
    assert split == expected, f"split kernels {'not ' if expected else ''}run: {sorted(set(names))}"


def _splits(spec, hyper) -> bool:
    """Whether the CUDA backend splits this loss (launch.cu split_kernels_take, class-index targets without
    element weights): all but the softmax focal loss with label smoothing."""
    return not (spec.family.name == "softmax_focal" and hyper.get("label_smoothing", 0) and hyper.get("gamma", 0))


def _op(family, kind):
    return family.op(torch.ops.cbkernels, kind)


@pytest.mark.parametrize("spec,hyper", loss_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("strategy", ["fused", "recompute"])
def test_few_long_rows(spec, hyper, dtype, strategy, monkeypatch):
    monkeypatch.delenv("CBKERNELS_CUDA_CONFIG", raising=False)
    monkeypatch.setenv("CBKERNELS_BACKWARD", strategy)
    logits, target, weight = make_inputs(4, 65536, dtype, DEVICE)
    _, names = kernels_of(lambda: assert_matches_reference("cuda", spec, hyper, logits, target, weight,
                                                           reduction="none"))
    assert_split(names, _splits(spec, hyper))


@pytest.mark.parametrize("spec,hyper", loss_cases(full=False))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_of_a_quarter_million(spec, hyper, dtype, monkeypatch):
    """64 rows of 262144 columns (4 chunks a row on a 132-SM H200): split where the device has more than 64 SMs."""
    monkeypatch.delenv("CBKERNELS_CUDA_CONFIG", raising=False)
    logits, target, weight = make_inputs(64, 262144, dtype, DEVICE)
    _, names = kernels_of(lambda: assert_matches_reference("cuda", spec, hyper, logits, target, weight,
                                                           reduction="sum"))
    if 64 < sms():
        assert_split(names, _splits(spec, hyper))


@pytest.mark.parametrize("spec,hyper", loss_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [8192, 8195, 40003])
def test_targets_at_chunk_edges(spec, hyper, dtype, c, monkeypatch):
    """NARROW rows split into many chunks; the targets sit at both ends of the row, at the chunk boundaries of a
    row whose head is 0 (c = 8192) and around them (8195, 40003 shift each row's alignment), and at random."""
    monkeypatch.setenv("CBKERNELS_CUDA_CONFIG", NARROW)
    n = 6
    logits, _, weight = make_inputs(n, c, dtype, DEVICE)
    chunk = max(c // 16, 1)  # columns near the boundaries of any chunk count that divides 16
    target = torch.tensor([0, c - 1, chunk, chunk - 1, 7 * chunk + 3, int(torch.randint(0, c, ()))], device=DEVICE)
    _, names = kernels_of(lambda: assert_matches_reference("cuda", spec, hyper, logits, target, weight,
                                                           reduction="none"))
    assert_split(names, _splits(spec, hyper))


@pytest.mark.parametrize("family", [pytest.param(f, id=f.name) for f in losses.FAMILIES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ops_forward_backward_and_loss_only(family, dtype, monkeypatch):
    """The raw ops: forward with the gradient, without it (the softmax's loss-only finish launch), and backward,
    each against the reference rows; an ignored row gets a zero gradient, bad targets NaN rows."""
    monkeypatch.setenv("CBKERNELS_CUDA_CONFIG", NARROW)
    n, c = 6, 20000
    logits, target, weight = make_inputs(n, c, dtype, DEVICE, ignore_frac=0.0)
    target[1] = -100
    target[4] = c
    target[5] = -7
    params = tuple(0.0 if h.name == "label_smoothing" else v
                   for h, v in zip(family.hyperparameters, family_hyperparameters(family)))
    grad_loss = torch.randn(n, device=DEVICE)
    (rows, grad), names = kernels_of(lambda: _op(family, "forward")(logits, target, weight, *params, -100, True))
    assert_split(names)
    (rows_only, _), names = kernels_of(lambda: _op(family, "forward")(logits, target, weight, *params, -100, False))
    assert_split(names)
    scaled, names = kernels_of(lambda: _op(family, "backward")(logits, target, weight, grad_loss, *params, -100))
    assert_split(names)

    good = torch.tensor([0, 1, 2, 3])
    x = logits[good].detach().double().cpu().requires_grad_(True)
    spec = next(s for s in losses.LOSSES if s.family is family)
    ref = spec.reference_rows(x, target[good].cpu(), weight.double().cpu(), -100, params)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x)
    for out in (rows, rows_only):
        assert_loss_close(out[good], ref.detach(), "rows")
        assert torch.isnan(out[4:]).all(), "bad targets: NaN loss"
    assert_grad_close(grad[good], ref_grad, dtype, "forward grad")
    assert_grad_close(scaled[good], ref_grad * grad_loss.double().cpu()[good, None], dtype, "backward grad")
    for g in (grad, scaled):
        assert (g[1] == 0).all(), "ignored row: zero gradient"
        assert torch.isnan(g[4:]).all(), "bad targets: NaN gradient rows"


@pytest.mark.parametrize("family", [pytest.param(f, id=f.name) for f in losses.FAMILIES])
def test_nan_logits(family, monkeypatch):
    """A NaN logit in one chunk: the softmax's whole row is NaN (its statistics carry it to every chunk), the
    sigmoid family's only at that element; the other rows are untouched."""
    monkeypatch.setenv("CBKERNELS_CUDA_CONFIG", NARROW)
    logits, target, weight = make_inputs(4, 20000, torch.float32, DEVICE, ignore_frac=0.0)
    logits[1, 15000] = float("nan")
    params = tuple(0.0 if h.name == "label_smoothing" else v
                   for h, v in zip(family.hyperparameters, family_hyperparameters(family)))
    (rows, grad), names = kernels_of(lambda: _op(family, "forward")(logits, target, weight, *params, -100, True))
    assert_split(names)
    assert torch.isnan(rows[1]) and not torch.isnan(rows[[0, 2, 3]]).any()
    assert torch.isnan(grad[1, 15000])
    if family.name == "sigmoid_focal":
        assert torch.isnan(grad[1]).sum() == 1
    else:
        assert torch.isnan(grad[1]).all()
    assert not torch.isnan(grad[[0, 2, 3]]).any()


def test_split_is_deterministic(monkeypatch):
    """The chunks' parts are combined in a fixed order: two calls agree to the bit."""
    monkeypatch.setenv("CBKERNELS_CUDA_CONFIG", NARROW)
    logits, target, weight = make_inputs(3, 50000, torch.float32, DEVICE)
    for family in losses.FAMILIES:
        params = family_hyperparameters(family)
        params = tuple(0.0 if h.name == "label_smoothing" else v for h, v in zip(family.hyperparameters, params))
        first = _op(family, "forward")(logits, target, weight, *params, -100, True)
        second = _op(family, "forward")(logits, target, weight, *params, -100, True)
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1]), family.name


def test_unsplit_inputs_keep_the_row_kernels(monkeypatch):
    """Enough rows, short rows, and the smoothed softmax focal loss run the unsplit kernels."""
    monkeypatch.setenv("CBKERNELS_CUDA_CONFIG", NARROW)
    ce = losses.family("softmax_ce")
    focal = losses.family("softmax_focal")
    cases = [(ce, 2 * sms(), 20000, (0.0,)), (ce, 4, 4096, (0.0,)), (focal, 4, 20000, (2.0, 0.1))]
    for family, n, c, params in cases:
        logits, target, weight = make_inputs(n, c, torch.float32, DEVICE)
        _, names = kernels_of(lambda: _op(family, "forward")(logits, target, weight, *params, -100, True))
        assert_split(names, expected=False)
