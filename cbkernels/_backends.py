"""Which backend runs a call: names, availability, the "auto" choice and the backward strategy.

Backends: "reference" (pure PyTorch, any device and dtype), "cpu" (C++ extension, CPU tensors),
"cuda" (C++/CUDA extension), "triton" (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).
CBKERNELS_BACKEND=<name> forces the backend of every backend="auto" call; CBKERNELS_BACKWARD=fused|recompute
forces the backward strategy of every kernel backend.
"""
from __future__ import annotations

import importlib
import os

import torch

from . import _ops

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
STRATEGIES = ("fused", "recompute")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Backward strategy per backend, chosen by measurement (2026-11-27; bench/results/ holds the runs):
# - cpu: "fused". The CPU kernels are arithmetic-bound, and fused does the exp/log work once where
#   recompute does it twice (forward loss, then backward gradient); its backward is one in-place scaling
#   pass, or none for loss.backward() (_ops.scale_rows_in_place). At (1024, 8142) fp32, 2 threads, fwd+bwd
#   medians (bench/results/cpu-xeon-2t-2026-11-28-scalef): softmax 3.4 vs 6.7 ms, sigmoid 6.6 vs 8.1,
#   focal 9.3 vs 15.2. Both hold one N x C tensor from forward to backward (the gradient buffer or the
#   logits) and allocate one N x C gradient per step. (Before the in-place scaling and the unmaterialised
#   second-output gradient of _ops.py, fused paid two extra N x C passes and lost.)
# - cuda: "recompute" was faster at every swept shape on an H200 (bench/sweep_cuda.py, e.g. (8192, 8142)
#   fp32 softmax 0.27 vs 0.37 ms): it moves 3 passes over N x C instead of 4.
# - triton: "fused" won end to end at the iNaturalist shapes (python -m cbkernels bench, H200): the
#   recompute backward kernel is not yet tuned for small N (0.15 vs 0.06 ms at (1024, 8142) bf16).
#   (Measured before fused lost its backward pass for loss.backward() (triton/scale.py), which can only
#   widen that margin; with it, fused may also beat the CUDA backend's recompute: unmeasured so far.)
DEFAULT_STRATEGY = {"cpu": "fused", "cuda": "recompute", "triton": "fused"}
# On CUDA tensors "auto" takes the faster GPU backend: the CUDA kernels beat Triton at all 12 iNaturalist
# cases of the H200 benchmark (bench/results/gpu-h200-2026-11-27), so CUDA first, then Triton.
CUDA_PREFERENCE = ("cuda", "triton")


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _import_triton_ops() -> str | None:
    """Imports cbkernels.triton.ops (which registers the cbkernels_triton ops); None, or why it failed.

    Done once, when cbkernels is imported, and only where Triton can run (a CUDA device, or the interpreter
    chosen by TRITON_INTERPRET=1 before the import): CPU-only users never pay for importing triton, and
    the answer is a plain constant that torch.compile can trace (an import inside a traced function
    would break the graph).
    """
    if not (torch.cuda.is_available() or _triton_interpreted()):
        return "no CUDA device, and TRITON_INTERPRET=1 was not set before cbkernels was imported"
    try:
        importlib.import_module("cbkernels.triton.ops")
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


_TRITON_IMPORT_ERROR = _import_triton_ops()


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when the backend can run on this device, else why not."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, got a {device.type} tensor"
        if not _ops.extension_has_kernel("CPU"):
            return f"the C++ extension cbkernels._C is not built ({_ops._C_IMPORT_ERROR or 'no CPU kernels'})"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got a {device.type} tensor"
        if not _ops.extension_has_kernel("CUDA"):
            return "cbkernels._C was built without CUDA kernels (see CBKERNELS_BUILD_CUDA in setup.py)"
        return None
    if backend == "triton":
        if device.type == "cpu" and not _triton_interpreted():
            return "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        if device.type not in ("cpu", "cuda"):
            return f"backend 'triton' does not run on {device.type} tensors"
        return None if _TRITON_IMPORT_ERROR is None else f"Triton is not available ({_TRITON_IMPORT_ERROR})"
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def available_backends(device) -> list[str]:
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if unavailable_reason(b, device) is None]


def resolve(backend: str, logits: torch.Tensor) -> str:
    """The concrete backend for this call; a clear error for unknown or unavailable names."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        forced = os.environ.get("CBKERNELS_BACKEND")
        if forced:
            if forced not in BACKENDS[1:]:
                raise ValueError(f"CBKERNELS_BACKEND must be one of {BACKENDS[1:]}, got {forced!r}")
            backend = forced
        else:
            return _auto(logits)
    reason = unavailable_reason(backend, logits.device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is not available: {reason}")
    if backend != "reference" and logits.dtype not in KERNEL_DTYPES:
        raise TypeError(f"backend {backend!r} takes float32, float16 or bfloat16 logits, got {logits.dtype}; "
                        "use backend='reference' for float64")
    return backend


def _auto(logits: torch.Tensor) -> str:
    if logits.dtype not in KERNEL_DTYPES:
        return "reference"
    candidates = ("cpu",) if logits.device.type == "cpu" else CUDA_PREFERENCE
    for name in candidates:
        if unavailable_reason(name, logits.device) is None:
            return name
    return "reference"


def strategy(backend: str) -> str:
    forced = os.environ.get("CBKERNELS_BACKWARD")
    if forced:
        if forced not in STRATEGIES:
            raise ValueError(f"CBKERNELS_BACKWARD must be one of {STRATEGIES}, got {forced!r}")
        return forced
    return DEFAULT_STRATEGY[backend]


def ops_namespace_name(backend: str) -> str:
    """Name of the torch.ops namespace holding the backend's four ops (docs/op-contract.md)."""
    return "cbkernels_triton" if backend == "triton" else "cbkernels"


def ops_namespace(backend: str):
    return getattr(torch.ops, ops_namespace_name(backend))
