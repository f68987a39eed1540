"""The C++/CUDA backend (csrc/cuda/) against reference.py (float64), loss and gradient. GPU only.

Launch configurations are forced through CBKERNELS_CUDA_CONFIG (read per call by bindings.cpp) so the small
shapes also run the paths the default table reserves for large rows: the streaming softmax (two reads),
several rows per block, 8-byte and one-element accesses. Misaligned and row-strided logits exercise the
per-row vector head/tail split and the fall-back to narrower vectors when logits and gradient rows cannot
share an alignment. Bad targets are fed to the ops directly: the public functions also raise a device-side
assert for them, which would end the process's CUDA context.
"""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cbkernels
from backend_cases import GRAD_RTOL, LOSS_RTOL, assert_matches_reference, make_inputs
from cbkernels import _ops, reference

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
LOSSES = {"softmax": "softmax_ce", "focal": "sigmoid_focal"}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# None: the default table (cached softmax, 16-byte vectors at these sizes). The others: two-pass softmax
# with small rows per block; three 32-thread rows per block with 8-byte vectors; one element per access.
CONFIGS = [None, "threads=64,rows=2,cache=0", "threads=96,rows=3,vec=8", "threads=32,rows=1,vec=1"]


@pytest.fixture(autouse=True)
def _needs_cuda_kernels():
    if not _ops.extension_has_kernel("CUDA"):
        pytest.fail("cbkernels._C has no CUDA kernels on a CUDA machine: build with CBKERNELS_BUILD_CUDA=1")


@pytest.fixture(params=["fused", "recompute"])
def strategy(request, monkeypatch):
    monkeypatch.setenv("CBKERNELS_BACKWARD", request.param)
    return request.param


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


def check(loss, n, c, dtype=torch.float32, *, param=0.0, reduction="mean", upstream_scale=None, **inputs):
    logits, target, weight = make_inputs(n, c, dtype, DEVICE, **inputs)
    assert_matches_reference("cuda", loss, logits, target, weight, reduction=reduction, param=param,
                             ignore_index=inputs.get("ignore_index", -100), upstream_scale=upstream_scale)


def _op(loss, kind):
    return getattr(torch.ops.cbkernels, f"{LOSSES[loss]}_{kind}")


def check_ops_in_place(loss, logits, target, weight, param):
    """The ops called on `logits` exactly as laid out (assert_matches_reference clones its input, which
    would realign it): forward with and without the gradient, and backward, against the float64 reference."""
    grad_loss = torch.randn(logits.shape[0], device=DEVICE)
    rows, grad = _op(loss, "forward")(logits, target, weight, param, -100, True)
    rows_only, _ = _op(loss, "forward")(logits, target, weight, param, -100, False)
    scaled = _op(loss, "backward")(logits, target, weight, grad_loss, param, -100)
    x = logits.detach().double().cpu().requires_grad_(True)
    w64, t64 = weight.double().cpu(), target.cpu()
    if loss == "focal":
        ref = reference.sigmoid_focal_rows(x, t64, w64, param, -100)
    else:
        ref = reference.softmax_rows(x, t64, w64, -100, param)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x)
    ref = ref.detach()
    scale = float(ref.abs().max())
    for out in (rows, rows_only):
        torch.testing.assert_close(out.double().cpu(), ref, rtol=LOSS_RTOL, atol=1e-6 * scale)
    rtol = GRAD_RTOL[logits.dtype]
    for got, want in ((grad, ref_grad), (scaled, ref_grad * grad_loss.double().cpu()[:, None])):
        torch.testing.assert_close(got.double().cpu(), want, rtol=rtol, atol=rtol * float(want.abs().max()))


# ---------------------------------------------------------------- against the reference

@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c", [(1, 1), (3, 7), (37, 1000)])
def test_matches_reference(loss, dtype, n, c, launch_strategy):
    # (1, 1) with logits ~ N(0, 1), not N(0, 9): a lone focal gradient of a confident logit (z > 7) is
    # below float16's normal range, where its rounding exceeds any relative tolerance
    check(loss, n, c, dtype, param=0.5 if loss == "focal" else 0.0, reduction="none",
          scale=1.0 if n * c == 1 else 3.0)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.7])
def test_focal_gamma(gamma, strategy):
    # the four specialised modulators and the general exp form
    check("focal", 64, 333, param=gamma, reduction="mean")


@pytest.mark.parametrize("eps", [0.1, 1.0])
@pytest.mark.parametrize("config", [None, "threads=64,rows=1,cache=0"], ids=["cached", "stream"])
def test_softmax_label_smoothing(eps, config, strategy, monkeypatch):
    if config:
        monkeypatch.setenv("CBKERNELS_CUDA_CONFIG", config)
    check("softmax", 64, 333, param=eps, reduction="sum")


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_reductions_and_upstream_grad(loss, reduction, strategy):
    check(loss, 50, 129, param=2.0 if loss == "focal" else 0.1, reduction=reduction, upstream_scale=1e3)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_logits(loss, dtype, launch_strategy):
    # |z| ~ 1e4: exp(-|u|) underflows, softplus is linear, probabilities are exactly 0 or 1
    check(loss, 9, 300, dtype, param=3.7 if loss == "focal" else 0.1, scale=1e4, reduction="none")


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("n,c,dtype", [(1024, 8142, torch.bfloat16), (1024, 8142, torch.float32),
                                       (5, 70001, torch.float32), (2, 262147, torch.bfloat16)], ids=str)
def test_large_shapes(loss, n, c, dtype, monkeypatch):
    # iNaturalist's C (rows not a multiple of 16 bytes: every row starts at another alignment), C > 65536
    # (streaming softmax), C > 2^18 (1024 threads, many vectors per thread)
    monkeypatch.setenv("CBKERNELS_BACKWARD", "recompute" if n < 10 else "fused")
    check(loss, n, c, dtype, param=0.5 if loss == "focal" else 0.1, reduction="mean")


@pytest.mark.parametrize("loss", LOSSES)
def test_noncontiguous_int32_unweighted_other_ignore_index(loss, strategy):
    check(loss, 17, 33, param=1.0 if loss == "focal" else 0.0, noncontiguous=True,
          target_dtype=torch.int32, weighted=False, ignore_index=3, ignore_frac=0.4)


def _misaligned(n, c, dtype, offset):
    """(n, c) logits starting `offset` elements into their storage (not 16-byte aligned)."""
    logits, target, weight = make_inputs(n, c, dtype, DEVICE)
    flat = torch.empty(n * c + offset, dtype=dtype, device=DEVICE)
    shifted = flat[offset:].view(n, c)
    shifted.copy_(logits)
    assert shifted.data_ptr() % 16 != 0
    return shifted, target, weight


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("offset", [1, 2])
def test_misaligned_logits(loss, dtype, offset, launch):
    logits, target, weight = _misaligned(33, 1003, dtype, offset)
    check_ops_in_place(loss, logits, target, weight, 2.0 if loss == "focal" else 0.1)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cols", [slice(3, 1006), slice(0, 1003), slice(None, None, 2)], ids=str)
def test_strided_logits(loss, dtype, cols, launch):
    """Column slices of a wider tensor: row stride != C, read in place (rows aligned unlike the gradient's
    and unlike each other); a column stride of 2 takes the documented copy."""
    wide = (torch.randn(40, 2020, device=DEVICE) * 3).to(dtype)
    logits = wide[:, cols][:, :1003]
    _, target, weight = make_inputs(40, 1003, dtype, DEVICE)
    check_ops_in_place(loss, logits, target, weight, 0.5 if loss == "focal" else 0.1)


# ---------------------------------------------------------------- the op contract directly

@pytest.mark.parametrize("loss", LOSSES)
def test_forward_without_grad_and_backward_agree(loss, launch):
    logits, target, weight = make_inputs(37, 1000, torch.float32, DEVICE)
    param = 3.7 if loss == "focal" else 0.1
    loss_a, grad = _op(loss, "forward")(logits, target, weight, param, -100, True)
    loss_b, empty = _op(loss, "forward")(logits, target, weight, param, -100, False)
    grad_loss = torch.randn(37, device=DEVICE)
    scaled = _op(loss, "backward")(logits, target, weight, grad_loss, param, -100)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=0)  # one or two passes: summation order
    assert empty.shape == (0,) and empty.dtype == logits.dtype
    torch.testing.assert_close(scaled, grad * grad_loss[:, None], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", LOSSES)
def test_nan_logits_bad_targets_and_ignored_rows(loss, launch):
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
    param = 2.0 if loss == "focal" else 0.1
    rows, grad = _op(loss, "forward")(logits, target, weight, param, -100, True)
    back = _op(loss, "backward")(logits, target, weight, torch.ones(6, device=DEVICE), param, -100)
    for g in (grad, back):
        assert torch.isnan(g[1, 700])
        if loss == "softmax":
            assert torch.isnan(g[1]).all(), "softmax: every gradient entry of the NaN row is NaN"
        else:
            assert torch.isnan(g[1]).sum() == 1, "sigmoid family: only the NaN element's gradient"
        assert (g[3] == 0).all(), "ignored row with NaN/inf logits: gradient exactly 0"
        assert torch.isnan(g[4:6]).all(), "out-of-range target: NaN gradient row"
        assert torch.isfinite(g[[0, 2]]).all()
    assert torch.isnan(rows[[1, 4, 5]]).all() and rows[3] == 0 and torch.isfinite(rows[[0, 2]]).all()


@pytest.mark.parametrize("loss", LOSSES)
def test_all_rows_ignored_and_empty_batch(loss, strategy):
    logits = torch.randn(3, 5, device=DEVICE, requires_grad=True)
    target = torch.full((3,), -100, device=DEVICE)
    out = cbkernels.cb_focal_loss(logits, target, backend="cuda") if loss == "focal" else \
        cbkernels.cb_softmax_cross_entropy(logits, target, backend="cuda")
    out.backward()
    assert out.item() == 0 and (logits.grad == 0).all()
    empty_target = torch.empty(0, dtype=torch.long, device=DEVICE)
    rows, grad = _op(loss, "forward")(torch.empty(0, 5, device=DEVICE), empty_target, None, 0.0, -100, True)
    assert rows.shape == (0,) and grad.shape == (0, 5)
    back = _op(loss, "backward")(torch.empty(0, 5, device=DEVICE), empty_target, None,
                                 torch.empty(0, device=DEVICE), 0.0, -100)
    assert back.shape == (0, 5)


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
_BAD_ARGUMENT_SCRIPT = """
import sys, torch, cbkernels
sys.path.insert(0, "tests")
from backend_cases import make_inputs
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
    """Each bad call in its own process. On the H200 check of 2026-11-27 the calls whose message formats a
    number (target_shape, gamma, grad_loss_shape, label_smoothing) ended the process with SIGSEGV instead of
    raising, while those formatting a dtype or device raised; a subprocess keeps such a crash a failure of
    this case alone instead of the end of the test run. (The public API checks these arguments in Python
    before any op is called.)"""
    call, env, match = _BAD_ARGUMENTS[name]
    out = subprocess.run([sys.executable, "-c", _BAD_ARGUMENT_SCRIPT.format(call=call)], capture_output=True,
                         text=True, timeout=180, cwd=Path(__file__).resolve().parents[1], env={**os.environ, **env})
    assert out.returncode == 0, f"the op crashed the process (exit {out.returncode}): {out.stderr[-3000:]}"
    assert "RAISED:" in out.stdout and re.search(match, out.stdout), out.stdout


def test_opcheck():
    """Schema, fake kernel, autograd registration and AOT dispatch of the four ops."""
    logits, target, weight = make_inputs(64, 1000, torch.bfloat16, DEVICE)
    grad_loss = torch.randn(64, device=DEVICE)
    ops = torch.ops.cbkernels
    cases = [
        (ops.sigmoid_focal_forward, (logits, target, weight, 0.5, -100, True)),
        (ops.sigmoid_focal_forward, (logits.clone().requires_grad_(), target, None, 3.7, -100, False)),
        (ops.sigmoid_focal_backward, (logits, target, weight, grad_loss, 2.0, -100)),
        (ops.softmax_ce_forward, (logits, target, weight, 0.1, -100, True)),
        (ops.softmax_ce_forward, (logits.clone().requires_grad_(), target, weight, 0.0, -100, False)),
        (ops.softmax_ce_backward, (logits, target, weight, grad_loss, 0.1, -100)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def _all_losses(x, t, w):
    return (cbkernels.cb_focal_loss(x, t, w, gamma=0.5, backend="cuda")
            + cbkernels.cb_softmax_cross_entropy(x, t, w, label_smoothing=0.1, backend="cuda")
            + cbkernels.cb_sigmoid_cross_entropy(x, t, w, reduction="sum", backend="cuda"))


@pytest.mark.parametrize("dtype,strategy_name,compiler", [(torch.float32, "fused", "aot_eager"),
                                                           (torch.bfloat16, "recompute", "inductor")], ids=str)
def test_torch_compile_fullgraph(dtype, strategy_name, compiler, monkeypatch):
    # aot_eager traces dynamo + AOT autograd through the ops; inductor also lowers them (one compile: the
    # GPU check's test step is time-boxed)
    monkeypatch.setenv("CBKERNELS_BACKWARD", strategy_name)
    torch._dynamo.reset()
    logits, target, weight = make_inputs(64, 1000, dtype, DEVICE)
    compiled = torch.compile(_all_losses, fullgraph=True, backend=compiler)
    x_eager = logits.clone().requires_grad_(True)
    x_comp = logits.clone().requires_grad_(True)
    eager = _all_losses(x_eager, target, weight)
    eager.backward()
    out = compiled(x_comp, target, weight)
    out.backward()
    # The same kernels run either way; the torch ops around them (the reductions, the sum of the three
    # gradients) may be fused and rounded differently: one rounding of the dtype apart at most.
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6 * float(eager.abs()))
    rtol = GRAD_RTOL[dtype]
    torch.testing.assert_close(x_comp.grad, x_eager.grad, rtol=rtol, atol=rtol * float(x_eager.grad.abs().max()))


@pytest.mark.parametrize("loss", LOSSES)
def test_cuda_graph_replay_equals_eager(loss, strategy):
    logits, target, weight = make_inputs(128, 8142, torch.bfloat16, DEVICE)
    fn = (lambda x: cbkernels.cb_focal_loss(x, target, weight, gamma=0.5, backend="cuda")) if loss == "focal" \
        else (lambda x: cbkernels.cb_softmax_cross_entropy(x, target, weight, label_smoothing=0.1, backend="cuda"))
    static_x = logits.clone().requires_grad_(True)

    def step():
        out = fn(static_x)
        (grad,) = torch.autograd.grad(out, static_x)
        return out, grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_grad = step()
    fresh = (torch.randn_like(logits, dtype=torch.float32) * 3).to(logits.dtype)
    with torch.no_grad():
        static_x.copy_(fresh)
    graph.replay()
    x = fresh.clone().requires_grad_(True)
    out = fn(x)
    (grad,) = torch.autograd.grad(out, x)
    assert math.isfinite(out.item())
    torch.testing.assert_close(static_out, out, rtol=0, atol=0)
    torch.testing.assert_close(static_grad, grad, rtol=0, atol=0)


@pytest.mark.parametrize("loss", LOSSES)
def test_no_host_sync_in_forward_and_backward(loss, strategy):
    logits, target, weight = make_inputs(64, 1000, torch.bfloat16, DEVICE)
    x = logits.clone().requires_grad_(True)
    fn = cbkernels.cb_focal_loss if loss == "focal" else cbkernels.cb_softmax_cross_entropy
    fn(x, target, weight, backend="cuda").backward()  # first call outside: lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fn(x, target, weight, backend="cuda")
        out.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).item()


def test_int64_offsets():
    """N * C > 2^31 elements (bf16: 4.3 GB each for logits and gradient): row offsets need int64."""
    n, c = 16400, 131072
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * c * 2:
        pytest.skip(f"needs {3 * n * c * 2 / 2**30:.1f} GiB free on the GPU")
    logits = torch.zeros(n, c, dtype=torch.bfloat16, device=DEVICE)
    target = torch.zeros(n, dtype=torch.long, device=DEVICE)
    target[-1] = c - 1
    logits[-1, c - 1] = 5.0
    rows, grad = torch.ops.cbkernels.softmax_ce_forward(logits, target, None, 0.0, -100, True)
    assert abs(rows[-1].item() - (math.log(c - 1 + math.exp(5.0)) - 5.0)) < 1e-4
    assert abs(rows[0].item() - math.log(c)) < 1e-4
    assert grad[-1, c - 1].float().item() < 0 < grad[-1, 0].float().item()
    del grad
    rows_f, _ = torch.ops.cbkernels.sigmoid_focal_forward(logits, target, None, 0.0, -100, False)
    torch.testing.assert_close(rows_f[[0, -1]].double().cpu(), torch.tensor(
        [c * math.log(2.0), (c - 1) * math.log(2.0) + math.log1p(math.exp(-5.0))], dtype=torch.float64),
        rtol=2e-5, atol=0)
