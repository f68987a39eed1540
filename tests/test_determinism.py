"""Determinism and concurrency, on every backend pair (the `backend` fixture; CUDA pairs carry pytest.mark.gpu
and run by `make gpu-check`).

Every pair: the same inputs give bitwise-identical loss and gradient across runs, and concurrent calls
from several Python threads give the sequential results bitwise (except where the pair is not thread-safe:
Triton's CPU interpreter). CUDA pairs: no host sync under torch.cuda.set_sync_debug_mode("error"); CUDA
graph capture and replay of forward + backward give the eager result. The CPU kernels' independence of
the thread count is CPU-specific: tests/test_cpu_backend.py.
"""
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import cbkernels as cb
from cases import call, make_inputs
from cbkernels import losses
from conftest import BACKEND_CASES, backend_params

# Row counts and widths that exercise the kernels' splits: many rows, one huge row, a few wide rows, many
# narrow rows, and on a GPU iNaturalist-sized batches; each pair runs those within its budget, Triton's
# CPU interpreter the tiny ones.
SHAPES = [(64, 1000), (3, 70_001), (1, 200_003), (2048, 37), (4096, 8142)]
DETERMINISM_DTYPES = (torch.float32, torch.bfloat16)
TINY_SHAPES = [(3, 5), (2, 9)]
CALLERS = [spec.name for spec in losses.LOSSES] + ["module"]


def _callable(caller, backend, num_classes, reduction, device):
    """One public entry point as f(x, target, weight); the module (and its weights' copy to the device) is
    built here, outside any sync-debug region or graph capture."""
    if caller == "module":
        module = cb.ClassBalancedLoss(list(range(1, num_classes + 1)), reduction=reduction,  # default loss_type
                                      backend=backend.name).to(device)
        return lambda x, t, w: module(x, t)
    spec = losses.loss(caller)
    hyper = spec.test_cases()[-1]  # the last tested value of each hyperparameter: none at 0
    return lambda x, t, w: call(spec, x, t, w, backend=backend, reduction=reduction, hyper=hyper)


def _run(fn, logits, target, weight):
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x, target, weight)
    upstream = torch.linspace(-1.0, 2.0, out.numel(), device=out.device).reshape(out.shape)
    (grad,) = torch.autograd.grad(out, x, upstream)
    return out.detach(), grad


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _assert_bitwise(a, b, what):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape, what
        bits = _BITS[x.element_size()]  # compare the bit patterns: NaN == NaN, -0.0 != 0.0
        assert torch.equal(x.contiguous().view(bits), y.contiguous().view(bits)), f"{what}: results differ bitwise"


def _shapes(backend):
    return [shape for shape in SHAPES if backend.fits(*shape)] or TINY_SHAPES


@pytest.mark.parametrize("caller", CALLERS[:-1])
def test_repeated_calls_are_bitwise_identical(backend, caller):
    for n, c in _shapes(backend):
        fn = _callable(caller, backend, c, "mean", backend.device)
        for dtype in DETERMINISM_DTYPES:
            args = make_inputs(n, c, dtype, backend.device)
            _assert_bitwise(_run(fn, *args), _run(fn, *args), f"{backend.id} {caller} ({n}, {c}) {dtype}")


CONCURRENT_SHAPES = [(64, 1000), (1, 50_001), (7, 33), (300, 129), (5, 4099), (1, 1), (16, 8142), (2, 20_000)]


@pytest.mark.parametrize("caller", CALLERS)
def test_concurrent_python_threads_match_sequential(backend, caller):
    """Eight different inputs, run sequentially, then twice each from a pool of 4 Python threads."""
    if not backend.thread_safe:
        pytest.skip(f"{backend.id} is not thread-safe (Triton's CPU interpreter); its concurrency is tested on a GPU")
    jobs = []
    for i, (n, c) in enumerate(CONCURRENT_SHAPES):
        reduction = "none" if i % 3 else "mean"
        fn = _callable(caller, backend, c, reduction, backend.device)
        jobs.append((fn, *make_inputs(n, c, torch.float32 if i % 2 else torch.bfloat16, backend.device)))

    def one(job):
        return _run(*job)

    sequential = [one(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(one, jobs * 2))
    for i, result in enumerate(concurrent):
        _assert_bitwise(sequential[i % len(jobs)], result, f"{backend.id} {caller} job {i % len(jobs)} in a thread")


# --- CUDA pairs only ---------------------------------------------------------------------------------

CUDA_PAIRS = backend_params([case for case in BACKEND_CASES if case.device == "cuda"])


@pytest.mark.parametrize("backend", CUDA_PAIRS, indirect=True)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_host_sync_in_forward_and_backward(backend, reduction):
    # Inputs, the module's weights and warm-up (Triton compiles on the first call) come before the mode.
    for caller in CALLERS:
        logits, target, weight = make_inputs(512, 1000, torch.bfloat16, "cuda")
        x = logits.requires_grad_(True)
        upstream = torch.ones(512 if reduction == "none" else (), device="cuda")
        fn = _callable(caller, backend, 1000, reduction, "cuda")
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


@pytest.mark.parametrize("backend", CUDA_PAIRS, indirect=True)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_graph_replay_matches_eager(backend, reduction):
    for caller in CALLERS:
        n, c = 256, 1000
        static_x = torch.zeros(n, c, device="cuda", requires_grad=True)
        static_t = torch.zeros(n, dtype=torch.long, device="cuda")
        _, _, weight = make_inputs(n, c, torch.float32, "cuda")
        upstream = torch.linspace(0.5, 1.5, n if reduction == "none" else 1, device="cuda")
        upstream = upstream if reduction == "none" else upstream.reshape(())
        fn = _callable(caller, backend, c, reduction, "cuda")

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
        for _ in range(2):  # new values into the captured inputs, then replay
            logits, target, _ = make_inputs(n, c, torch.float32, "cuda")
            with torch.no_grad():
                static_x.copy_(logits)
                static_t.copy_(target)
            graph.replay()
            torch.cuda.synchronize()
            eager_x = logits.clone().requires_grad_(True)
            eager_out = fn(eager_x, target, weight)
            eager_out.backward(upstream)
            what = f"{backend.id} {caller} {reduction}"
            torch.testing.assert_close(static_out, eager_out.detach(), rtol=0, atol=0, msg=lambda m: f"{what}: {m}")
            torch.testing.assert_close(static_x.grad, eager_x.grad, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")
