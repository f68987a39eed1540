"""Where the audit's external tools are, and how it calls them.

Triton's NVIDIA backend ships ptxas, cuobjdump and nvdisasm in triton/backends/nvidia/bin: the Triton half
of the audit needs nothing else. The CUDA half needs nvcc (CUDA_HOME, /usr/local/cuda or PATH) and a C++
demangler (c++filt from binutils) to name the template instances. A missing tool is reported as a reason
string, never raised past the caller: the audit then prints that half as skipped.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


class ToolMissing(RuntimeError):
    """A tool the audit needs is not installed; the message says which and where it was looked for."""


def triton_tool(name: str) -> Path:
    """A tool of Triton's NVIDIA backend (ptxas, cuobjdump, nvdisasm)."""
    try:
        import triton.backends.nvidia as nvidia
    except ImportError as exc:
        raise ToolMissing(f"triton's NVIDIA backend is not importable ({exc})") from None
    path = Path(nvidia.__file__).parent / "bin" / name
    if not os.access(path, os.X_OK):
        raise ToolMissing(f"{path} is missing (the Triton wheel ships it with its NVIDIA backend)")
    return path


def nvcc() -> Path:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    for candidate in (Path(home) / "bin" / "nvcc", shutil.which("nvcc")):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise ToolMissing(f"nvcc not found (looked in {home}/bin and on PATH; set CUDA_HOME)")


def demangler() -> Path:
    found = shutil.which("c++filt")
    if not found:
        raise ToolMissing("c++filt (binutils) not found: needed to name the CUDA template instances")
    return Path(found)


def run(argv, *, stdin: str | None = None, cwd=None) -> str:
    """stdout of a tool; a RuntimeError with its stderr when it fails."""
    done = subprocess.run([str(a) for a in argv], input=stdin, capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(str(argv[0])).name} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout


def demangle(names: list[str]) -> dict[str, str]:
    """mangled -> demangled, one c++filt call for all."""
    out = run([demangler()], stdin="\n".join(names) + "\n").splitlines()
    return dict(zip(names, out))
