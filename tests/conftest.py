"""Shared test machinery: the `backend` fixture, per-test seeds, the gpu/slow marks.

`backend`: every test that takes it runs once per (backend, device) x backward-strategy pair of BACKEND_CASES,
with ids like "reference", "cpu-fused", "triton-cpu-recompute", "cuda-fused", "triton-cuda-fused". What
differs between the pairs is carried by the BackendCase record (device, size budget, how a bad target is
reported, launch-configuration overrides), so a property test never branches on a backend's name. CUDA
pairs are marked gpu (skipped where there is no GPU), Triton pairs triton; a pair whose backend cannot
run here is skipped with cbkernels' own reason (_backends.unavailable_reason).

Seeds: every test starts with torch's global generator seeded from its node id (zlib.crc32), and the
`seed` / `generator` fixtures give the same number; a failing test's report shows the seed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import zlib

import pytest
import torch

# Triton's interpreter must be chosen before triton is first imported: on a machine without a GPU the
# Triton backend is tested on CPU tensors through it. On a GPU machine the real compiler runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cbkernels import _backends  # noqa: E402  (after TRITON_INTERPRET is decided)

# Element budgets (N * C per call). Triton under the CPU interpreter runs every program in Python: shapes
# of a few dozen elements. The CPU kernels and the reference take millions in well under a second.
TINY = 200
LARGE = 4 * 10**6
HUGE = 2**31


@dataclasses.dataclass(frozen=True)
class BackendCase:
    """One (backend, device, backward strategy) pair and what the tests need to know about it.

    max_elements: the largest N * C a test may hand it (the interpreter's budget).
    bad_target_raises: an out-of-range target raises a RuntimeError at once (CPU tensors). On a CUDA
      device it is a device-side assert that ends the CUDA context: such checks go to the raw ops (NaN
      row by the op contract) or are skipped.
    config_overrides: launch-configuration overrides the shared checks run cases under (`configs()`; None
      is the backend's own table): Triton on the CPU forces a small tile first (C spans several tiles,
      the two-pass softmax), then its table; CUDA its table, then the streaming softmax.
    thread_safe: calls from several Python threads at once are allowed. Not under Triton's CPU
      interpreter: it swaps triton.language's functions globally while a kernel runs ("Did you forget to
      add @triton.jit"), so Triton's concurrency is tested on a GPU.
    """
    name: str
    device: str
    strategy: str | None
    max_elements: int
    bad_target_raises: bool
    config_overrides: tuple[str | None, ...] = (None,)
    thread_safe: bool = True

    @property
    def id(self) -> str:
        parts = [self.name]
        if self.name == "triton" or self.device != _backends_default_device(self.name):
            parts.append(self.device)
        if self.strategy:
            parts.append(self.strategy)
        return "-".join(parts)

    @property
    def record(self) -> _backends.Backend:
        return _backends.get(self.name)

    @property
    def is_kernel(self) -> bool:
        return self.record.is_kernel

    def fits(self, n: int, c: int) -> bool:
        return n * c <= self.max_elements

    def require(self, n: int, c: int) -> None:
        """Skips the test when (n, c) exceeds this pair's budget, saying so."""
        if not self.fits(n, c):
            pytest.skip(f"{self.id}: {n} x {c} exceeds this backend's budget of {self.max_elements} elements")

    def pick(self, shape, tiny_shape):
        """`shape`, or `tiny_shape` where `shape` does not fit (the interpreter)."""
        return shape if self.fits(*shape) else tiny_shape

    def configs(self):
        """Context managers, one per launch-configuration override this pair repeats each check under."""
        return [_override(self, name) for name in self.config_overrides]

    def unavailable_reason(self) -> str | None:
        return _backends.unavailable_reason(self.name, torch.device(self.device))


def _backends_default_device(name: str) -> str:
    """The device a backend's id leaves unsaid: "cuda" for the CUDA kernels, "cpu" otherwise."""
    return "cuda" if name == "cuda" else "cpu"


# Triton: SMALL_TILE makes C = 33 span 3 tiles, the last partial, with 2 rows per program.
TRITON_SMALL_TILE = dict(block=16, rows=2, num_warps=1)
# CUDA: the streaming (two-read) softmax with two rows per block, as tests/test_cuda_backend.py's table.
CUDA_STREAMING = "threads=64,rows=2,cache=0"


@contextlib.contextmanager
def _override(case: BackendCase, name: str | None):
    if name is None:
        yield None
    elif case.name == "triton" and name == "small_tiles":
        from cbkernels.triton import configs
        config = configs.LaunchConfig(**TRITON_SMALL_TILE)
        with configs.override(config):
            yield config
    elif case.name == "cuda":
        before = os.environ.get("CBKERNELS_CUDA_CONFIG")
        os.environ["CBKERNELS_CUDA_CONFIG"] = name
        try:
            yield name
        finally:
            if before is None:
                os.environ.pop("CBKERNELS_CUDA_CONFIG", None)
            else:
                os.environ["CBKERNELS_CUDA_CONFIG"] = before
    else:
        raise ValueError(f"no override {name!r} for {case.id}")


def _pairs() -> list[BackendCase]:
    # CPU tensors: a bad target raises at once (the CPU kernels' own check, or torch._assert_async).
    on_cpu = dict(device="cpu", bad_target_raises=True)
    # CUDA tensors: a bad target is a device-side assert, fatal to the CUDA context.
    on_cuda = dict(device="cuda", bad_target_raises=False, max_elements=HUGE)
    cases = [BackendCase("reference", strategy=None, max_elements=LARGE, **on_cpu)]
    for strategy in _backends.STRATEGIES:
        cases.append(BackendCase("cpu", strategy=strategy, max_elements=LARGE, **on_cpu))
    for strategy in _backends.STRATEGIES:
        cases.append(BackendCase("triton", strategy=strategy, max_elements=TINY, config_overrides=("small_tiles", None),
                                 thread_safe=False, **on_cpu))
    for strategy in _backends.STRATEGIES:
        cases.append(BackendCase("cuda", strategy=strategy, config_overrides=(None, CUDA_STREAMING), **on_cuda))
    for strategy in _backends.STRATEGIES:
        cases.append(BackendCase("triton", strategy=strategy, **on_cuda))
    cases.append(BackendCase("reference", strategy=None, **on_cuda))
    return cases


BACKEND_CASES: tuple[BackendCase, ...] = tuple(_pairs())


def backend_params(cases=BACKEND_CASES, *, kernels_only=False):
    """pytest.param per pair, marked gpu (CUDA device) and triton (Triton backend)."""
    params = []
    for case in cases:
        if kernels_only and not case.is_kernel:
            continue
        marks = []
        if case.device == "cuda":
            marks.append(pytest.mark.gpu)
        if case.name == "triton":
            marks.append(pytest.mark.triton)
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


def _use_backend(request, monkeypatch) -> BackendCase:
    case: BackendCase = request.param
    reason = case.unavailable_reason()
    if reason is not None:
        pytest.skip(f"{case.id}: {reason}")
    if case.strategy is None:
        monkeypatch.delenv("CBKERNELS_BACKWARD", raising=False)
    else:
        monkeypatch.setenv("CBKERNELS_BACKWARD", case.strategy)
    monkeypatch.delenv("CBKERNELS_BACKEND", raising=False)
    return case


@pytest.fixture(params=backend_params())
def backend(request, monkeypatch) -> BackendCase:
    """Every (backend, device) x strategy pair; CBKERNELS_BACKWARD set to the pair's strategy."""
    return _use_backend(request, monkeypatch)


@pytest.fixture(params=backend_params(kernels_only=True))
def kernel_backend(request, monkeypatch) -> BackendCase:
    """The kernel pairs only (no reference): for what only kernels promise (strategies, launch configs)."""
    return _use_backend(request, monkeypatch)


# --- seeds ---------------------------------------------------------------------------------------------

def seed_of(nodeid: str) -> int:
    return zlib.crc32(nodeid.encode())


@pytest.fixture(autouse=True)
def _seed_global_generators(request):
    """Every test's draws from torch's (and random's) global generator are reproducible from its id."""
    seed = seed_of(request.node.nodeid)
    torch.manual_seed(seed)
    random.seed(seed)
    yield


@pytest.fixture
def seed(request) -> int:
    return seed_of(request.node.nodeid)


@pytest.fixture
def generator(seed) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("seed", f"seed {seed_of(item.nodeid)} = zlib.crc32({item.nodeid!r}); "
                                        "torch.manual_seed(seed) was set before the test (and is the `seed` "
                                        "fixture): rerunning this node id redraws the same inputs"))


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device; run by `make gpu-check` on a GPU machine")
    no_slow = pytest.mark.skip(reason="slow; set CBKERNELS_SLOW=1 to run")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "slow" in item.keywords and os.environ.get("CBKERNELS_SLOW") != "1":
            item.add_marker(no_slow)
