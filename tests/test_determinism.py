"""Determinism and concurrency.

CPU: the same inputs give bitwise-identical loss and gradient across runs, across
torch.set_num_threads(1) vs 2 (the kernels split work by whole rows, so the thread count must not
change any row's arithmetic), and under concurrent calls from several Python threads.
GPU (marked, run by `make gpu-check`): bitwise-identical across runs for the triton and cuda backends;
no host sync under torch.cuda.set_sync_debug_mode("error"); CUDA graph capture and replay of
forward + backward give the eager result.
"""
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import cbkernels as cb
from backend_cases import make_inputs

CPU_BACKENDS = cb.available_backends("cpu")
LOSSES = ["softmax", "focal"]


def _run(backend, loss, logits, target, weight, reduction="sum", param=None):
    x = logits.detach().clone().requires_grad_(True)
    if loss == "softmax":
        out = cb.cb_softmax_cross_entropy(x, target, weight, reduction, -100, 0.1 if param is None else param,
                                          backend=backend)
    elif loss == "module":
        out = cb.ClassBalancedLoss(torch.arange(1, logits.shape[1] + 1) * 10, "focal", reduction=reduction,
                                   backend=backend).to(logits.device)(x, target)
    else:
        out = cb.cb_focal_loss(x, target, weight, 0.5 if param is None else param, reduction, -100, backend=backend)
    upstream = torch.linspace(-1.0, 2.0, out.numel(), device=out.device).reshape(out.shape)
    (grad,) = torch.autograd.grad(out, x, upstream)
    return out.detach(), grad


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _assert_bitwise(a, b, what):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape, what
        bits = _BITS[x.element_size()]  # compare the bit patterns: NaN == NaN, -0.0 != 0.0
        assert torch.equal(x.contiguous().view(bits), y.contiguous().view(bits)), f"{what}: results differ bitwise"


def _inputs(n, c, dtype, seed, device="cpu"):
    return make_inputs(n, c, dtype, device, generator=torch.Generator().manual_seed(seed))


def _shapes(backend):
    """Row counts and widths that exercise the CPU kernels' splits: many rows, one huge row, a few wide
    rows, many narrow rows. The reference (plain torch ops) gets two, Triton's slow interpreter tiny ones."""
    if backend == "triton":
        return [(3, 5), (2, 9)]
    if backend == "reference":
        return [(64, 1000), (3, 70_001)]
    return [(64, 1000), (1, 200_003), (3, 70_001), (2048, 37)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_repeated_calls_are_bitwise_identical(loss, backend):
    for i, (n, c) in enumerate(_shapes(backend)):
        for dtype in (torch.float32, torch.bfloat16):
            args = _inputs(n, c, dtype, i)
            _assert_bitwise(_run(backend, loss, *args), _run(backend, loss, *args), f"{backend} {loss} ({n}, {c})")


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="the C++ CPU kernels are not built")
@pytest.mark.parametrize("strategy", ["fused", "recompute"])
@pytest.mark.parametrize("loss", LOSSES)
def test_thread_count_does_not_change_a_bit(loss, strategy, restore_threads, monkeypatch):
    monkeypatch.setenv("CBKERNELS_BACKWARD", strategy)
    for i, (n, c) in enumerate(_shapes("cpu")):
        for dtype in (torch.float32, torch.bfloat16):
            args = _inputs(n, c, dtype, 100 + i)
            torch.set_num_threads(1)
            one = _run("cpu", loss, *args, reduction="none")
            torch.set_num_threads(2)
            two = _run("cpu", loss, *args, reduction="none")
            _assert_bitwise(one, two, f"cpu {loss} {strategy} ({n}, {c}) {dtype}: 1 vs 2 threads")


def _check_concurrent_calls(backend, loss, device, shapes):
    """Eight different inputs, run sequentially, then twice each from a pool of 4 Python threads."""
    jobs = [(*_inputs(n, c, torch.float32 if i % 2 else torch.bfloat16, 200 + i, device), "none" if i % 3 else "mean")
            for i, (n, c) in enumerate(shapes)]

    def one(job):
        logits, target, weight, reduction = job
        return _run(backend, loss, logits, target, weight, reduction)

    sequential = [one(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(one, jobs * 2))
    for i, result in enumerate(concurrent):
        _assert_bitwise(sequential[i % len(jobs)], result, f"{backend} {loss} job {i % len(jobs)} in a thread")


# Triton's CPU interpreter is not thread-safe (it swaps triton.language's functions globally while a kernel
# runs: "Did you forget to add @triton.jit"), so Triton's concurrency is checked on the GPU only.
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
@pytest.mark.parametrize("loss", LOSSES + ["module"])
def test_concurrent_python_threads_match_sequential(loss, backend):
    shapes = [(64, 1000), (1, 50_001), (7, 33), (300, 129), (5, 4099), (1, 1), (16, 8142), (2, 20_000)]
    _check_concurrent_calls(backend, loss, "cpu", shapes)


# --- GPU ---------------------------------------------------------------------------------------------

def _cuda_backends(kernels_only=False):
    if not torch.cuda.is_available():
        return []
    found = cb.available_backends("cuda")
    return [b for b in found if b in ("triton", "cuda")] if kernels_only else found


PUBLIC = ["softmax", "focal", "sigmoid", "module"]


def _public_fn(name, backend, num_classes, reduction):
    """One public entry point as f(x, target, weight); the module (and its weights' copy to the GPU) is
    built here, outside any sync-debug region or graph capture."""
    if name == "softmax":
        return lambda x, t, w: cb.cb_softmax_cross_entropy(x, t, w, reduction, label_smoothing=0.1, backend=backend)
    if name == "sigmoid":
        return lambda x, t, w: cb.cb_sigmoid_cross_entropy(x, t, w, reduction, backend=backend)
    if name == "focal":
        return lambda x, t, w: cb.cb_focal_loss(x, t, w, 0.5, reduction, backend=backend)
    module = cb.ClassBalancedLoss(list(range(1, num_classes + 1)), "focal", reduction=reduction, backend=backend)
    module = module.to("cuda")
    return lambda x, t, w: module(x, t)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_repeated_calls_are_bitwise_identical(dtype):
    backends = _cuda_backends(kernels_only=True)
    assert backends, "no CUDA kernel backend (triton, cuda) is available on this GPU machine"
    for backend in backends:
        for loss in LOSSES:
            for i, (n, c) in enumerate([(4096, 8142), (3, 262_147), (1024, 1000)]):
                args = _inputs(n, c, dtype, 300 + i, "cuda")
                first = _run(backend, loss, *args, reduction="mean")
                for _ in range(2):
                    _assert_bitwise(first, _run(backend, loss, *args, reduction="mean"),
                                    f"{backend} {loss} ({n}, {c}) {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("loss", LOSSES + ["module"])
def test_cuda_concurrent_python_threads_match_sequential(loss):
    for backend in _cuda_backends():
        _check_concurrent_calls(backend, loss, "cuda", [(4096, 8142), (1, 262_147), (7, 33), (300, 129)] * 2)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_host_sync_in_forward_and_backward(reduction):
    # Inputs, the module's weights and warm-up (Triton compiles on the first call) come before the mode.
    for backend in _cuda_backends():
        for name in PUBLIC:
            logits, target, weight = _inputs(512, 1000, torch.bfloat16, 400, "cuda")
            x = logits.requires_grad_(True)
            upstream = torch.ones(512 if reduction == "none" else (), device="cuda")
            fn = _public_fn(name, backend, 1000, reduction)
            out = fn(x, target, weight)
            torch.autograd.grad(out, x, upstream)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = fn(x, target, weight)
                torch.autograd.grad(out, x, upstream)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_graph_replay_matches_eager(reduction):
    for backend in _cuda_backends():
        for name in PUBLIC:
            n, c = 256, 1000
            static_x = torch.zeros(n, c, device="cuda", requires_grad=True)
            static_t = torch.zeros(n, dtype=torch.long, device="cuda")
            _, _, weight = _inputs(n, c, torch.float32, 500, "cuda")
            upstream = torch.linspace(0.5, 1.5, n if reduction == "none" else 1, device="cuda")
            upstream = upstream if reduction == "none" else upstream.reshape(())
            fn = _public_fn(name, backend, c, reduction)

            def step():
                out = fn(static_x, static_t, weight)
                out.backward(upstream)
                return out

            side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graphs documents
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    static_x.grad = None
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            static_x.grad = None
            with torch.cuda.graph(graph):
                static_out = step()
            for seed in (501, 502):  # new values into the captured inputs, then replay
                logits, target, _ = _inputs(n, c, torch.float32, seed, "cuda")
                with torch.no_grad():
                    static_x.copy_(logits)
                    static_t.copy_(target)
                graph.replay()
                torch.cuda.synchronize()
                eager_x = logits.clone().requires_grad_(True)
                eager_out = fn(eager_x, target, weight)
                eager_out.backward(upstream)
                what = f"{backend} {name} {reduction} seed {seed}"
                torch.testing.assert_close(static_out, eager_out.detach(), rtol=0, atol=0, msg=lambda m: f"{what}: {m}")
                torch.testing.assert_close(static_x.grad, eager_x.grad, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")
