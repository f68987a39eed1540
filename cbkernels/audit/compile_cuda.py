"""Compiles the CUDA translation unit for sm_XX with the shipped build's flags and reads its kernels.

Flags, as `setup.py build_ext` compiles csrc/cuda/*.cu through torch.utils.cpp_extension.BuildExtension:
- torch's COMMON_NVCC_FLAGS (half/bf16 operator macros off, --expt-relaxed-constexpr), imported;
- setup.py's own nvcc arguments and define_macros, read from setup.py's source (ast, not restated here);
- the C++ standard BuildExtension appends when none is given (read from torch's source, c++17 if not found);
- -I csrc (setup.py's include_dirs) and -gencode arch=compute_XX,code=sm_XX for the audited arch.
One nvcc call builds a small host program (cuda_variants.PROBE_SOURCE) linked with the kernels' translation
unit: running it prints the launcher's own default configuration (no GPU needed, it calls no CUDA API), and
its embedded sm_XX cubin is what cuobjdump reads (-res-usage, -sass). Kernels are named by demangling
(c++filt) and matched against the variant file's demangled names.
"""
from __future__ import annotations

import ast
import inspect
import json
import re
import subprocess
import tempfile
from pathlib import Path

from . import cuda_variants, sass, toolchain
from .compiled import CompiledKernel

ROOT = Path(__file__).absolute().parents[2]  # not resolved: the audit follows the tree it is imported from


def _setup_py_value(key: str):
    """The literal assigned to kwargs[...][key] or kwargs[key] in setup.py (e.g. "nvcc", "define_macros")."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Subscript):
            sub = node.targets[0].slice
            if isinstance(sub, ast.Constant) and sub.value == key:
                return ast.literal_eval(node.value)
    raise RuntimeError(f"compile_cuda: setup.py assigns no literal to [{key!r}]")


def _cxx_standard() -> str:
    from torch.utils import cpp_extension
    found = re.search(r"cpp_flag_prefix \+ '(c\+\+\d+)'", inspect.getsource(cpp_extension))
    return f"-std={found.group(1) if found else 'c++17'}"


def shipped_flags(arch: int) -> list[str]:
    from torch.utils import cpp_extension
    macros = [f"-D{name}={value}" for name, value in _setup_py_value("define_macros")]
    return (list(cpp_extension.COMMON_NVCC_FLAGS) + list(_setup_py_value("nvcc")) + macros
            + [_cxx_standard(), "-I", str(ROOT / "csrc"), "-gencode", f"arch=compute_{arch},code=sm_{arch}"])


def check_tools() -> None:
    """Raises toolchain.ToolMissing when the CUDA half cannot run here."""
    toolchain.nvcc()
    toolchain.demangler()
    toolchain.triton_tool("cuobjdump")


class Build:
    """The probe program with the kernels, compiled in the background (nvcc runs while Triton compiles)."""

    def __init__(self, arch: int):
        self.arch = arch
        self._tmp = tempfile.TemporaryDirectory(prefix="cbk-audit-cuda-")
        tmp = Path(self._tmp.name)
        (tmp / "probe.cu").write_text(cuda_variants.PROBE_SOURCE)
        self.exe = tmp / "probe"
        argv = [str(toolchain.nvcc()), *shipped_flags(arch), str(tmp / "probe.cu"),
                *(str(ROOT / s) for s in cuda_variants.SOURCES), "-o", str(self.exe)]
        self._process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._kernels = None

    def _finish(self):
        if self._kernels is not None:
            return
        out, err = self._process.communicate()
        if self._process.returncode != 0:
            raise RuntimeError(f"nvcc failed ({self._process.returncode}): {err.strip()[-3000:]}")
        cuobjdump = toolchain.triton_tool("cuobjdump")
        resources = sass.parse_resources(toolchain.run([cuobjdump, "-res-usage", self.exe]))
        functions = sass.parse_sass(toolchain.run([cuobjdump, "-sass", self.exe]))
        names = toolchain.demangle(sorted(functions))
        self._kernels = {names[m]: (m, resources[m], functions[m]) for m in functions}

    def config(self, c: int, dtype: str) -> dict:
        """The launcher's default configuration for rows of c classes of this dtype (the probe's JSON)."""
        self._finish()
        return json.loads(toolchain.run([self.exe, str(c), dtype]))

    def kernel(self, demangled: str) -> CompiledKernel:
        self._finish()
        matches = [name for name in self._kernels if demangled in name]
        if len(matches) != 1:
            raise RuntimeError(f"compile_cuda: {len(matches)} kernels match {demangled!r} (need exactly one)")
        mangled, resources, instructions = self._kernels[matches[0]]
        return CompiledKernel(matches[0], resources, sass.analyse(instructions))

    def close(self):
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._tmp.cleanup()
