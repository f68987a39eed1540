"""What only the C++/CUDA backend (csrc/cuda/) promises, beyond the shared property tests. GPU only.

The loss/gradient comparisons with the float64 reference (every loss, dtype, reduction, shape up to
C > 2^18, layout, strategy), NaN/inf rules, determinism, no host sync, CUDA graphs and torch.compile run
for this backend with every other through the `backend` fixture of conftest.py (test_matches_reference.py,
test_backend_edges.py, test_numerics.py, test_properties.py, test_determinism.py, test_compile.py ...).
Here: launch configurations forced through CBKERNELS_CUDA_CONFIG (read per call by bindings.cpp) so small
shapes also run the paths the default table reserves for large rows: the streaming softmax (two reads),
several rows per block, 8-byte and one-element accesses. Misaligned and row-strided logits exercise the
per-row vector head/tail split and the fall-back to narrower vectors when logits and gradient rows cannot
share an alignment. Bad targets are fed to the ops directly: the public functions also raise a device-side
assert for them, which would end the process's CUDA context.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cases import (DTYPES, FAMILY_PARAMS, TESTS_DIR, assert_grad_close, assert_loss_close,
                   assert_matches_reference, family_hyperparameters, loss_cases, make_inputs)
from cbkernels import _ops, losses

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
FAMILIES = FAMILY_PARAMS
SOFTMAX_CE = losses.family("softmax_ce")
# None: the default table (cached softmax, 16-byte vectors at these sizes). The others: two-pass softmax
# with small rows per block; three 32-thread rows per block with 8-byte vectors; one element per access.
CONFIGS = [None, "threads=64,rows=2,cache=0", "threads=96,rows=3,vec=8", "threads=32,rows=1,vec=1"]


@pytest.fixture(autouse=True)
def _needs_cuda_kernels():
    if not _ops.extension_has_kernel("CUDA"):
        pytest.fail("cbkernels._C has no CUDA kernels on a CUDA machine: build with CBKERNELS_BUILD_CUDA=1")


@pytest.fixture(params=CONFIGS, ids=lambda c: c or "default")
def launch(request, monkeypatch):
    if request.param is None:
        monkeypatch.delenv("CBKERNELS_CUDA_CONFIG", raising=False)
    else:
        monkeypatch.setenv("CBKERNELS_CUDA_CONFIG", request.param)
    return request.param


# Launch configurations crossed with backward strategies: each configuration once, each strategy on
# the default configuration and on others (the strategy changes which kernels run: forward with the
# gradient, or forward without it plus the backward op), without the full product.
LAUNCH_STRATEGY = [(None, "fused"), (None, "recompute"), (CONFIGS[1], "recompute"), (CONFIGS[2], "fused"),
                   (CONFIGS[3], "recompute")]


@pytest.fixture(params=LAUNCH_STRATEGY, ids=lambda p: f"{p[0] or 'default'}-{p[1]}")
def launch_strategy(request, monkeypatch):
    config, strategy_name = request.param
    if config is None:
        monkeypatch.delenv("CBKERNELS_CUDA_CONFIG", raising=False)
    else:
        monkeypatch.setenv("CBKERNELS_CUDA_CONFIG", config)
    monkeypatch.setenv("CBKERNELS_BACKWARD", strategy_name)
    return request.param


_hyper = family_hyperparameters


def _op(family, kind):
    return family.op(torch.ops.cbkernels, kind)


def check_ops_in_place(spec, hyper, logits, target, weight):
    """The ops called on `logits` exactly as laid out (no copy that would realign it): forward with and
    without the gradient, and backward, against the float64 reference rows."""
    family, values = spec.family, spec.kernel_hyperparameters(hyper)
    grad_loss = torch.randn(logits.shape[0], device=DEVICE)
    rows, grad = _op(family, "forward")(logits, target, weight, *values, -100, True)
    rows_only, _ = _op(family, "forward")(logits, target, weight, *values, -100, False)
    scaled = _op(family, "backward")(logits, target, weight, grad_loss, *values, -100)
    x = logits.detach().double().cpu().requires_grad_(True)
    ref = spec.reference_rows(x, target.cpu(), weight.double().cpu(), -100, values)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x)
    ref = ref.detach()
    for out in (rows, rows_only):
        assert_loss_close(out, ref, "rows")
    assert_grad_close(grad, ref_grad, logits.dtype, "forward grad")
    assert_grad_close(scaled, ref_grad * grad_loss.double().cpu()[:, None], logits.dtype, "backward grad")


# ---------------------------------------------------------------- launch configurations

@pytest.mark.parametrize("spec,hyper", loss_cases(full=False))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c", [(1, 1), (3, 7), (37, 1000)])
def test_matches_reference_under_launch_configs(spec, hyper, dtype, n, c, launch_strategy):
    # (1, 1) with logits ~ N(0, 1), not N(0, 9): a lone focal gradient of a confident logit (z > 7) is
    # below float16's normal range, where its rounding exceeds any relative tolerance
    logits, target, weight = make_inputs(n, c, dtype, DEVICE, scale=1.0 if n * c == 1 else 3.0)
    assert_matches_reference("cuda", spec, hyper, logits, target, weight, reduction="none")


@pytest.mark.parametrize("spec,hyper", loss_cases(where=lambda spec, _: spec.family is SOFTMAX_CE))
@pytest.mark.parametrize("config", [None, "threads=64,rows=1,cache=0"], ids=["cached", "stream"])
@pytest.mark.parametrize("strategy", ["fused", "recompute"])
def test_softmax_cached_and_streaming(spec, hyper, config, strategy, monkeypatch):
    monkeypatch.setenv("CBKERNELS_BACKWARD", strategy)
    if config:
        monkeypatch.setenv("CBKERNELS_CUDA_CONFIG", config)
    logits, target, weight = make_inputs(64, 333, torch.float32, DEVICE)
    assert_matches_reference("cuda", spec, hyper, logits, target, weight, reduction="sum")


@pytest.mark.parametrize("spec,hyper", loss_cases(full=False))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_logits_under_launch_configs(spec, hyper, dtype, launch_strategy):
    # |z| ~ 1e4: exp(-|u|) underflows, softplus is linear, probabilities are exactly 0 or 1
    logits, target, weight = make_inputs(9, 300, dtype, DEVICE, scale=1e4)
    assert_matches_reference("cuda", spec, hyper, logits, target, weight, reduction="none")


@pytest.mark.parametrize("spec,hyper", loss_cases(full=False))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [70, 8192, 8193])
def test_target_in_every_part_of_the_row(spec, hyper, dtype, c, launch):
    """The kernels' body loops skip the 16-byte vector holding the target, which the row's edge step
    computes with the head and tail (row_io.cuh: edge_column). C = 70 shifts each row's alignment and puts
    the target at every column of some row: head, tail, each lane of a body vector. C = 8192 is the
    largest row the default configuration's cached softmax holds (64 elements a thread), 8193 streams; their
    targets sit at both ends of the row and in between."""
    if c == 70:
        n = 2 * c
        target = torch.arange(n, device=DEVICE) % c
    else:
        n = 40
        ends = torch.arange(12, device=DEVICE)
        target = torch.cat([ends, c - 1 - ends, torch.randint(0, c, (16,), device=DEVICE)])
    logits, _, weight = make_inputs(n, c, dtype, DEVICE)
    assert_matches_reference("cuda", spec, hyper, logits, target, weight, reduction="none")


def _misaligned(n, c, dtype, offset):
    """(n, c) logits starting `offset` elements into their storage (not 16-byte aligned)."""
    logits, target, weight = make_inputs(n, c, dtype, DEVICE)
    flat = torch.empty(n * c + offset, dtype=dtype, device=DEVICE)
    shifted = flat[offset:].view(n, c)
    shifted.copy_(logits)
    assert shifted.data_ptr() % 16 != 0
    return shifted, target, weight


@pytest.mark.parametrize("spec,hyper", loss_cases(full=False))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("offset", [1, 2])
def test_misaligned_logits(spec, hyper, dtype, offset, launch):
    logits, target, weight = _misaligned(33, 1003, dtype, offset)
    check_ops_in_place(spec, hyper, logits, target, weight)


@pytest.mark.parametrize("spec,hyper", loss_cases(full=False))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cols", [slice(3, 1006), slice(0, 1003), slice(None, None, 2)], ids=str)
def test_strided_logits(spec, hyper, dtype, cols, launch):
    """Column slices of a wider tensor: row stride != C, read in place (rows aligned unlike the gradient's
    and unlike each other); a column stride of 2 takes the documented copy."""
    wide = (torch.randn(40, 2020, device=DEVICE) * 3).to(dtype)
    logits = wide[:, cols][:, :1003]
    _, target, weight = make_inputs(40, 1003, dtype, DEVICE)
    check_ops_in_place(spec, hyper, logits, target, weight)


# ---------------------------------------------------------------- the op contract directly


@pytest.mark.parametrize("family", FAMILIES)
def test_nan_logits_bad_targets_and_ignored_rows(family, launch):
    """NaN in a row -> NaN loss, NaN gradient where the reference has it (softmax: the whole row);
    a target outside [0, C) -> NaN loss and gradient row, no out-of-bounds read; an ignored row -> 0
    whatever its logits hold. Row 1's NaN sits after its max, in a later vector than the max."""
    logits, target, weight = make_inputs(6, 1000, torch.float32, DEVICE, ignore_frac=0.0)
    target[3] = -100
    logits[1, 700] = float("nan")
    logits[1, 2] = 50.0
    logits[3, 4] = float("nan")
    logits[3, 5] = float("inf")
    target[4] = 1000
    target[5] = -7
    params = _hyper(family)
    rows, grad = _op(family, "forward")(logits, target, weight, *params, -100, True)
    back = _op(family, "backward")(logits, target, weight, torch.ones(6, device=DEVICE), *params, -100)
    for g in (grad, back):
        assert torch.isnan(g[1, 700])
        if family is SOFTMAX_CE:
            assert torch.isnan(g[1]).all(), "softmax: every gradient entry of the NaN row is NaN"
        else:
            assert torch.isnan(g[1]).sum() == 1, "sigmoid family: only the NaN element's gradient"
        assert (g[3] == 0).all(), "ignored row with NaN/inf logits: gradient exactly 0"
        assert torch.isnan(g[4:6]).all(), "out-of-range target: NaN gradient row"
        assert torch.isfinite(g[[0, 2]]).all()
    assert torch.isnan(rows[[1, 4, 5]]).all() and rows[3] == 0 and torch.isfinite(rows[[0, 2]]).all()


_BAD_ARGUMENTS = {  # name: (call, environment, expected message)
    "logits_dtype": ("fwd(logits.double(), target, weight, 0.0, -100, True)", {},
                     "logits must be float32, float16 or bfloat16"),
    "target_shape": ("fwd(logits, target[:2], weight, 0.0, -100, True)", {}, "target must have shape"),
    "weight_dtype": ("fwd(logits, target, weight.double(), 0.0, -100, True)", {}, "class_weight must be float32"),
    "target_device": ("fwd(logits, target.cpu(), weight, 0.0, -100, True)", {}, "target must be on the logits' device"),
    "gamma": ("fwd(logits, target, weight, -1.0, -100, True)", {}, "gamma must be a finite number"),
    "grad_loss_shape": ("bwd(logits, target, weight, torch.ones(2, device='cuda'), 0.0, -100)", {},
                        "grad_loss must have shape"),
    "label_smoothing": ("bwd(logits, target, weight, torch.ones(3, device='cuda'), 1.5, -100)", {},
                        r"label_smoothing must be in"),
    "config_threads": ("fwd(logits, target, weight, 0.0, -100, True)", {"CBKERNELS_CUDA_CONFIG": "threads=48"},
                       "threads per block must be a multiple of 32"),
    "config_key": ("fwd(logits, target, weight, 0.0, -100, True)", {"CBKERNELS_CUDA_CONFIG": "blocks=4"},
                   "CBKERNELS_CUDA_CONFIG keys are"),
}
# The child imports `cases` through PYTHONPATH (set below): no edit of the import path in the script.
_BAD_ARGUMENT_SCRIPT = """
import torch, cbkernels
from cases import make_inputs
logits, target, weight = make_inputs(3, 7, torch.float32, "cuda")
fwd = torch.ops.cbkernels.sigmoid_focal_forward
bwd = torch.ops.cbkernels.softmax_ce_backward
try:
    {call}
except RuntimeError as error:
    print("RAISED:", error)
else:
    print("NO ERROR")
"""


@pytest.mark.parametrize("name", list(_BAD_ARGUMENTS))
def test_bad_arguments_name_the_argument(name):
    """Each bad call in its own process: a build whose CUDA ops crash when a TORCH_CHECK message formats a
    number (seen once, tools/gpu_check.sh says how the compiler is chosen against it) then fails this case
    alone instead of ending the test run. (The public API checks these arguments in Python before any op
    is called.)"""
    call_text, env, match = _BAD_ARGUMENTS[name]
    env = {**os.environ, **env,
           "PYTHONPATH": os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, "-c", _BAD_ARGUMENT_SCRIPT.format(call=call_text)], capture_output=True,
                         text=True, timeout=180, cwd=Path(__file__).resolve().parents[1], env=env)
    assert out.returncode == 0, f"the op crashed the process (exit {out.returncode}): {out.stderr[-3000:]}"
    assert "RAISED:" in out.stdout and re.search(match, out.stdout), out.stdout


def test_opcheck():
    """Schema, fake kernel, autograd registration and AOT dispatch of the ops of every family."""
    logits, target, weight = make_inputs(64, 1000, torch.bfloat16, DEVICE)
    grad_loss = torch.randn(64, device=DEVICE)
    for family in losses.FAMILIES:
        for values in (_hyper(family), tuple(min(h.test_values) for h in family.hyperparameters)):
            cases = [
                (_op(family, "forward"), (logits, target, weight, *values, -100, True)),
                (_op(family, "forward"), (logits.clone().requires_grad_(), target, None, *values, -100, False)),
                (_op(family, "backward"), (logits, target, weight, grad_loss, *values, -100)),
                # the optional inputs: logit_offset, target_margin, sample_weight
                (_op(family, "forward"), (logits, target, weight, *values, -100, True, None, None, grad_loss.abs())),
                # dense targets (the logits' dtype) and element weights
                (_op(family, "forward"), (logits, torch.rand_like(logits), weight, *values, -100, True, None, None,
                                          None, weight)),
                (_op(family, "backward"), (logits, torch.rand_like(logits), None, grad_loss, *values, -100, None,
                                           None, None, weight)),
            ]
            for op, args in cases:
                torch.library.opcheck(op, args)


# ---------------------------------------------------------------- the per-element fast math (device_math.cuh)
# The kernels evaluate exp as ex2.approx.ftz, 1/x as rcp.approx.ftz, sqrt as sqrt.approx.ftz and log1p(e)
# as a 7-term atanh series (csrc/cuda/device_math.cuh, with the error analysis). These tests hold each
# element, not only each row, to the bound derived there, on inputs that sweep every regime of each
# approximation: |z| up to 80 (e = exp(-|z|) down to 1.8e-35, still a normal float), both signs of u, and
# values around 0 where log1p(e) and 1 / (1 + e) sit near their largest. Rows hold C = 64 equal logits,
# so the body-vector loop computes them (16 aligned fp32 vectors) and the row loss is a sum of positive
# terms of the same regime (its relative error is at most its terms'). Entries below 2^-110 in the
# float64 reference are outside fp32's useful range (the ftz instructions flush results below 2^-126):
# there the kernel must only be that small too.
_U = 2.0**-24
_TINY = 2.0**-110


def _equal_logit_rows(values, c=64):
    z = torch.tensor(values, dtype=torch.float32)
    return z[:, None].expand(-1, c).contiguous().to(DEVICE)


def _sweep_values(limit):
    dense = torch.linspace(-limit, limit, 2001).tolist()
    near_zero = [s * 10.0**-k for k in range(1, 9) for s in (1, -1)] + [0.0]
    return dense + near_zero


def _assert_elementwise(got, ref, bound, what):
    """|got - ref| <= bound * |ref| entry by entry where |ref| >= _TINY; |got| <= 2 * _TINY elsewhere."""
    got, ref, bound = got.double().cpu(), ref.double().cpu(), bound.double().cpu().expand_as(ref)
    big = ref.abs() >= _TINY
    error = (got - ref).abs()
    bad = (big & ~(error <= bound * ref.abs())) | (~big & ~(got.abs() <= 2 * _TINY))
    if bad.any():
        i = tuple(int(k) for k in torch.nonzero(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} entries outside the bound; first at {i}: got "
                             f"{float(got[i])!r}, ref {float(ref[i])!r}, relative error "
                             f"{float(error[i] / max(ref[i].abs(), 1e-300)):.3g} > {float(bound[i]):.3g}")


@pytest.mark.parametrize("gamma,limit", [(0.0, 80.0), (0.5, 80.0), (1.0, 80.0), (2.0, 80.0), (3.7, 18.0)])
def test_sigmoid_family_element_math_within_its_bound(gamma, limit):
    """Loss terms and gradients of the sigmoid family, element by element, within (32 + 2 (1 + gamma) |z|) u
    of the float64 value (u = 2^-24). From device_math.cuh: e = exp(-|u|) within 4u + |u| u / 2, 1/(1+e)
    within 2.5u, log1p(e) within about 10u + |u| u / 2, and the focal modulator adds its exponent's
    condition number, about gamma |u| u (hence a general gamma is swept over |z| <= 18, the range whose
    ~75 ulp docs/guarantees.md states). Twice the derived error, so a failure means a wrong derivation or
    a wrong kernel, not noise."""
    family = losses.family("sigmoid_focal")
    logits = _equal_logit_rows(_sweep_values(limit))
    n, c = logits.shape
    target = torch.zeros(n, dtype=torch.int64, device=DEVICE)  # column 0 positive, the other 63 negative
    rows, grad = _op(family, "forward")(logits, target, None, gamma, -100, True)
    x = logits.double().cpu().requires_grad_(True)
    ref_rows = family.reference_rows(x, target.cpu(), None, -100, gamma=gamma)
    (ref_grad,) = torch.autograd.grad(ref_rows.sum(), x)
    z_abs = logits.abs().double().cpu()
    bound = (32 + 2 * (1 + gamma) * z_abs) * _U
    _assert_elementwise(grad, ref_grad, bound, f"gradient, gamma {gamma}")
    _assert_elementwise(rows, ref_rows.detach(), bound[:, 0], f"row loss, gamma {gamma}")


@pytest.mark.parametrize("config", [None, "threads=256,rows=1,cache=0"], ids=["cached", "stream"])
@pytest.mark.parametrize("offset", [0.0, 1e4, -3e5])
def test_softmax_element_math_within_its_bound(config, offset, monkeypatch):
    """Softmax gradients element by element within (64 + |z - m|) u of the float64 value wherever
    |z - m| <= 80 (the rest are below exp(-80) of the row's largest and below fp32's concern), at C = 8142
    (the cached kernel's registers, or the streaming kernel's two reads). exp(z - m) is ex2.approx of
    (z - m) log2 e with z - m formed first (device_math.cuh, kernels.cuh): its error does not grow with
    the logits' offset |m|, unlike an exp of z log2 e - m log2 e would (|m| u: 2e-2 at 3e5). The rest of
    the bound is the fp32 sums over the row. eps = 0: with label smoothing an entry p_c - eps/C can cancel
    to 0 and no relative bound holds."""
    if config:
        monkeypatch.setenv("CBKERNELS_CUDA_CONFIG", config)
    torch.manual_seed(7)
    n, c = 64, 8142
    logits = (torch.randn(n, c) * 3 + offset).to(DEVICE)
    logits[: n // 4, 5] += 30.0  # confident rows: 1 - p_y ~ 1e-9 rides on sr / s, not on s - e_y
    target = torch.full((n,), 5, dtype=torch.int64, device=DEVICE)
    target[n // 2:] = torch.randint(0, c, (n - n // 2,), device=DEVICE)
    family = SOFTMAX_CE
    rows, grad = _op(family, "forward")(logits, target, None, 0.0, -100, True)
    x = logits.double().cpu().requires_grad_(True)
    ref_rows = family.reference_rows(x, target.cpu(), None, -100, label_smoothing=0.0)
    (ref_grad,) = torch.autograd.grad(ref_rows.sum(), x)
    gap = (x.detach() - x.detach().amax(dim=1, keepdim=True)).abs()
    bound = (64 + gap) * _U
    near = gap <= 80
    _assert_elementwise(torch.where(near, grad.double().cpu(), 0.0), torch.where(near, ref_grad, 0.0),
                        bound, f"softmax gradient, offset {offset}")
    assert_loss_close(rows, ref_rows.detach(), "softmax row loss")
