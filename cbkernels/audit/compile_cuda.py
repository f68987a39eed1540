"""Compiles the CUDA translation unit for sm_XX with the shipped build's flags and reads its kernels.

Flags, as `setup.py build_ext` compiles csrc/cuda/*.cu through torch.utils.cpp_extension.BuildExtension:
- torch's COMMON_NVCC_FLAGS (half/bf16 operator macros off, --expt-relaxed-constexpr), imported;
- setup.py's own nvcc arguments and define_macros, read from setup.py's source (ast, not restated here);
- the C++ standard BuildExtension appends when none is given (read from torch's source, c++17 if not found);
- -I csrc (setup.py's include_dirs) and -gencode arch=compute_XX,code=sm_XX for the audited arch.
One nvcc call builds a small host program (cuda_variants.PROBE_SOURCE) linked with the kernels' translation
unit: running it prints the launcher's own default configuration (no GPU needed, it calls no CUDA API), and
its embedded sm_XX cubin is what cuobjdump reads (-res-usage, -sass) and, extracted (cuobjdump -xelf),
what nvdisasm -gi reads for the source line of each instruction (setup.py's -lineinfo writes the line
table; it does not change the code). Kernels are named by demangling (c++filt) and matched against the
variant file's demangled names.

Build takes the tree to compile (root), its sources and its probe, the shipped tree's by default;
cbkernels.audit.validate passes those of an older tree.

The kernels' translation unit takes most of the time (about a minute on 2 cores), and CI compiles it for
sm_90 twice otherwise: tools/check_cuda_compile.sh (its warnings and spills) and this audit. Each source is
compiled to an object in build/cuda-objects under a name that hashes all its code depends on (the flags,
nvcc's version, every file under csrc/): the check writes the object it compiles there (`python -m
cbkernels.audit.compile_cuda ARCH` prints the path and the flags), the audit links its probe with it when
present and compiles it otherwise. A changed source or toolchain hashes to a new name: never a stale object.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import re
import sys
import tempfile
import threading
from pathlib import Path

from . import cuda_variants, lineinfo, sass, toolchain
from .compiled import CompiledKernel

ROOT = Path(__file__).absolute().parents[2]  # not resolved: the audit follows the tree it is imported from


def _setup_py_value(key: str, root: Path = ROOT):
    """The literal assigned to kwargs[...][key] or kwargs[key] in setup.py (e.g. "nvcc", "define_macros")."""
    tree = ast.parse((root / "setup.py").read_text())
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


def shipped_flags(arch: int, root: Path = ROOT) -> list[str]:
    from torch.utils import cpp_extension
    macros = [f"-D{name}={value}" for name, value in _setup_py_value("define_macros", root)]
    return (list(cpp_extension.COMMON_NVCC_FLAGS) + list(_setup_py_value("nvcc", root)) + macros
            + [_cxx_standard(), "-I", str(root / "csrc"), "-gencode", f"arch=compute_{arch},code=sm_{arch}"])


def object_path(source: str, arch: int, root: Path = ROOT) -> Path:
    """Where `source` (relative to root) compiled with shipped_flags(arch) is cached (see the module docstring)."""
    digest = hashlib.sha256("\0".join([*shipped_flags(arch, root), source]).encode())
    digest.update(toolchain.run([toolchain.nvcc(), "--version"]).encode())
    for path in sorted((root / "csrc").rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return root / "build" / "cuda-objects" / f"{Path(source).stem}-sm{arch}-{digest.hexdigest()[:20]}.o"


def _compile_object(source: str, arch: int, root: Path, out: Path) -> None:
    """source compiled with the shipped flags to `out`, written whole or not at all (a concurrent reader
    never sees half an object)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{out.name}.{os.getpid()}.partial")
    toolchain.run([toolchain.nvcc(), *shipped_flags(arch, root), "-c", str(root / source), "-o", str(partial)])
    partial.replace(out)


def check_tools() -> None:
    """Raises toolchain.ToolMissing when the CUDA half cannot run here."""
    if not (ROOT / "csrc").is_dir() or not (ROOT / "setup.py").is_file():
        # An installed package has no csrc/ beside it: the CUDA half compiles the sources of a checkout.
        raise toolchain.ToolMissing(f"the CUDA sources (csrc/, setup.py) of a source checkout, looked for in {ROOT}")
    toolchain.nvcc()
    toolchain.demangler()
    toolchain.triton_tool("cuobjdump")
    toolchain.triton_tool("nvdisasm")


class Build:
    """The probe program with the kernels, compiled in the background (nvcc runs while Triton compiles), from
    the sources' cached objects where present (object_path)."""

    def __init__(self, arch: int, root: Path = ROOT, sources=None, probe: str | None = None):
        self.arch = arch
        self._tmp = tempfile.TemporaryDirectory(prefix="cbk-audit-cuda-")
        tmp = Path(self._tmp.name)
        (tmp / "probe.cu").write_text(cuda_variants.PROBE_SOURCE if probe is None else probe)
        self.exe = tmp / "probe"
        root = Path(root)
        sources = cuda_variants.SOURCES if sources is None else sources
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._compile, args=(root, sources), daemon=True)
        self._thread.start()
        self._kernels = None

    def _compile(self, root: Path, sources) -> None:
        try:
            objects = [object_path(source, self.arch, root) for source in sources]
            for source, obj in zip(sources, objects):
                if not obj.exists():
                    _compile_object(source, self.arch, root, obj)
            toolchain.run([toolchain.nvcc(), *shipped_flags(self.arch, root), str(Path(self._tmp.name) / "probe.cu"),
                           *map(str, objects), "-o", str(self.exe)])
        except BaseException as exc:  # re-raised by _finish, in the caller's thread
            self._error = exc

    def _finish(self):
        if self._kernels is not None:
            return
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"compile_cuda: {self._error}") from self._error
        cuobjdump = toolchain.triton_tool("cuobjdump")
        resources = sass.parse_resources(toolchain.run([cuobjdump, "-res-usage", self.exe]))
        functions = sass.parse_sass(toolchain.run([cuobjdump, "-sass", self.exe]))
        elf = Path(self._tmp.name) / "elf"
        elf.mkdir()
        toolchain.run([cuobjdump, "-xelf", "all", self.exe], cwd=elf)
        lines = {}
        for cubin in sorted(elf.glob(f"*.sm_{self.arch}*.cubin")):
            lines.update(lineinfo.parse(toolchain.run([toolchain.triton_tool("nvdisasm"), "-gi", "-c", cubin])))
        names = toolchain.demangle(sorted(functions))
        self._kernels = {names[m]: (m, resources[m], functions[m], lines.get(m, {})) for m in functions}

    def config(self, *args) -> dict:
        """The probe's JSON for these arguments: the launcher's default configuration for rows of c classes
        of a dtype (`c, dtype`), and what the probe adds for more (cuda_variants.probe_arguments)."""
        self._finish()
        return json.loads(toolchain.run([self.exe, *map(str, args)]))

    def kernel(self, demangled: str) -> CompiledKernel:
        self._finish()
        matches = [name for name in self._kernels if demangled in name]
        if len(matches) != 1:
            raise RuntimeError(f"compile_cuda: {len(matches)} kernels match {demangled!r} (need exactly one)")
        mangled, resources, instructions, lines = self._kernels[matches[0]]
        return CompiledKernel(matches[0], resources, tuple(instructions), lines)

    def close(self):
        self._thread.join()  # an nvcc still running would write into the directory removed next
        self._tmp.cleanup()


if __name__ == "__main__":  # tools/check_cuda_compile.sh: `ARCH` -> the cached object's path, then the flags, one a line
    _arch = int(sys.argv[1])
    print(object_path(cuda_variants.SOURCES[0], _arch))
    print("\n".join(shipped_flags(_arch)))
