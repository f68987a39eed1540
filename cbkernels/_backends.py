"""Which backend runs a call: the backend records, availability, the "auto" choice and the backward strategy.

Backends: "reference" (pure PyTorch, any device and dtype), "cpu" (C++ extension, CPU tensors),
"cuda" (C++/CUDA extension), "triton" (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).
CBKERNELS_BACKEND=<name> forces the backend of every backend="auto" call; CBKERNELS_BACKWARD=fused|recompute
forces the backward strategy of every kernel backend.

`resolve` returns a Backend record; callers ask it (its ops, whether it checks targets itself, its
strategy) and never compare backend names: what differs between backends is written down here only.
"""
from __future__ import annotations

import dataclasses
import importlib
import os

import torch

from . import _ops

STRATEGIES = ("fused", "recompute")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Backend:
    """What the rest of the library needs to know about one backend.

    namespace: the torch.ops namespace holding its ops (docs/op-contract.md); None for the reference,
      which is plain autograd over reference.py.
    checks_targets: its ops raise on an out-of-range target themselves (the CPU kernels read the targets
      on the host anyway); elsewhere the caller adds a device-side assert.
    default_strategy: its backward strategy unless CBKERNELS_BACKWARD says otherwise.
    dtypes: the logits dtypes it takes.
    whole_call: its namespace also has `<family>_loss` (the C++ extension, csrc/common/loss_function.h),
      which runs an eager call (checks, "mean" folding, kernel, reduction, autograd node) as one op.
    traced_strategy: its default under torch.compile, where it differs from the eager one (None: the same).
    """
    name: str
    namespace: str | None
    checks_targets: bool
    default_strategy: str | None
    dtypes: tuple[torch.dtype, ...]
    whole_call: bool = False
    traced_strategy: str | None = None

    @property
    def is_kernel(self) -> bool:
        return self.namespace is not None

    @property
    def ops(self):
        return getattr(torch.ops, self.namespace)

    def strategy(self) -> str:
        forced = os.environ.get("CBKERNELS_BACKWARD")
        if forced:
            if forced not in STRATEGIES:
                raise ValueError(f"CBKERNELS_BACKWARD must be one of {STRATEGIES}, got {forced!r}")
            return forced
        if self.traced_strategy is not None and torch.compiler.is_compiling():
            return self.traced_strategy
        return self.default_strategy


# Default backward strategies:
# - cpu: "fused", by measurement (bench/results/*/NOTES.md hold the runs). The CPU kernels are
#   arithmetic-bound; fused does the exp/log work once where recompute does it twice (forward loss, then
#   backward gradient), and its backward is one in-place scaling pass, or none at all for loss.backward().
# - cuda and triton: "fused", by bytes moved (not yet measured on a GPU): the backward skips rows whose
#   upstream gradient is exactly 1 on the device (the scale_rows_unless_one_ op of csrc/cuda, triton/scale.py),
#   so loss.backward() of "mean" or "sum" moves one read of the logits and one write of the gradient, where
#   recompute reads the logits twice. Under torch.compile, though, the traced backward cannot skip: it
#   scales out of place (a functional graph), one more read and write, so fused would move four N x C
#   passes and recompute moves three: there the default is "recompute".
REFERENCE = Backend("reference", None, True, None, (torch.float32, torch.float16, torch.bfloat16, torch.float64))
CPU = Backend("cpu", "cbkernels", True, "fused", KERNEL_DTYPES, whole_call=True)
CUDA = Backend("cuda", "cbkernels", False, "fused", KERNEL_DTYPES, whole_call=True, traced_strategy="recompute")
TRITON = Backend("triton", "cbkernels_triton", False, "fused", KERNEL_DTYPES, traced_strategy="recompute")
_RECORDS = {b.name: b for b in (REFERENCE, CPU, CUDA, TRITON)}
BACKENDS = ("auto",) + tuple(_RECORDS)
# On CUDA tensors "auto" takes Triton first, then the CUDA extension: correct first. Both GPU backends were
# rewritten after the one GPU run (bench/results/gpu-h200-2026-11-27, where the CUDA kernels of that time
# were the faster), and no GPU has run either since. The Triton kernels' source has run against the
# reference under the interpreter (tests/*, triton-cpu pairs); the CUDA kernels have only been compiled.
# `make gpu-check` tests and times both; the order follows its results once it has run.
_AUTO_ORDER = {"cpu": (CPU,), "cuda": (TRITON, CUDA)}


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


def check_name(backend) -> str:
    """A clear error for anything but a backend name ("auto" included)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def get(name: str) -> Backend:
    """The record of a concrete backend name."""
    if name not in _RECORDS:
        raise ValueError(f"backend must be one of {tuple(_RECORDS)}, got {name!r}")
    return _RECORDS[name]


def unavailable_reason(backend, device: torch.device) -> str | None:
    """None when the backend (a name or record) can run on this device, else why not."""
    name = backend.name if isinstance(backend, Backend) else get(backend).name
    if name == "reference":
        return None
    if name == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, got a {device.type} tensor"
        if not _ops.extension_has_kernel("CPU"):
            return f"the C++ extension cbkernels._C is not built ({_ops.extension_error() or 'no CPU kernels'})"
        return None
    if name == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got a {device.type} tensor"
        if not _ops.extension_has_kernel("CUDA"):
            return "cbkernels._C was built without CUDA kernels (see CBKERNELS_BUILD_CUDA in setup.py)"
        return None
    if device.type == "cpu" and not _triton_interpreted():
        return "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
    if device.type not in ("cpu", "cuda"):
        return f"backend 'triton' does not run on {device.type} tensors"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "backend 'triton' on CUDA tensors needs a CUDA device, and none is visible"
    return None if _TRITON_IMPORT_ERROR is None else f"Triton is not available ({_TRITON_IMPORT_ERROR})"


def available_backends(device) -> list[str]:
    """Names of the backends that can run on this device ("reference" always)."""
    device = torch.device(device)
    return [name for name in _RECORDS if unavailable_reason(name, device) is None]


def native_kernel_backends(device) -> list[str]:
    """Names of the kernel backends that run natively on this device, in "auto"'s order of preference
    (Triton's CPU interpreter is a debugging tool, not a backend to time or to choose)."""
    device = torch.device(device)
    return [record.name for record in _AUTO_ORDER.get(device.type, ())
            if unavailable_reason(record, device) is None]


def resolve(backend: str, logits: torch.Tensor) -> Backend:
    """The backend record for this call; a clear error for unknown or unavailable names."""
    if backend == "auto":
        forced = os.environ.get("CBKERNELS_BACKEND")
        if not forced:
            return _auto(logits)
        if forced not in _RECORDS:
            raise ValueError(f"CBKERNELS_BACKEND must be one of {tuple(_RECORDS)}, got {forced!r}")
        backend = forced
    check_name(backend)
    record = _RECORDS[backend]
    reason = unavailable_reason(record, logits.device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is not available: {reason}")
    if logits.dtype not in record.dtypes:
        raise TypeError(f"backend {backend!r} takes float32, float16 or bfloat16 logits, got {logits.dtype}; "
                        "use backend='reference' for float64")
    return record


# "auto"'s choice per device type: what can run there is fixed once cbkernels is imported (the extension
# and Triton load at import), so it is looked up once per device type, not on every call.
_AUTO_CHOICE: dict[str, Backend] = {}


def _auto(logits: torch.Tensor) -> Backend:
    if logits.dtype not in KERNEL_DTYPES:
        return REFERENCE
    device_type = "cpu" if logits.is_cpu else logits.device.type
    choice = _AUTO_CHOICE.get(device_type)
    if choice is None:
        device = torch.device(device_type)
        choice = next((record for record in _AUTO_ORDER.get(device_type, ())
                       if unavailable_reason(record, device) is None), REFERENCE)
        _AUTO_CHOICE[device_type] = choice
    return choice
