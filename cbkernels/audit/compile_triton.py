"""Compiles a Triton kernel for an sm_XX target without a GPU, as a launch would, and reads its cubin.

The JIT's own binder turns the launch arguments into Triton's signature, constexprs and specialisation
attributes (16-byte divisibility of pointers and integers) exactly as at a real launch; triton.compile then
runs the NVIDIA backend (ptxas) for GPUTarget("cuda", arch, 32), which for sm_90 produces sm_90a code as on
an H100/H200. Registers and local memory come from `cuobjdump -res-usage`, the SASS from `cuobjdump -sass`,
the source line of each instruction from `nvdisasm -gi` (Triton always writes the line table), all three
tools from Triton's NVIDIA backend.
"""
from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path

import torch

from . import lineinfo, sass, toolchain
from .compiled import CompiledKernel
from .launches import TritonKernel


def check_tools() -> None:
    """Raises toolchain.ToolMissing when the Triton half cannot run here."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise toolchain.ToolMissing("TRITON_INTERPRET=1 is set: Triton then interprets kernels and compiles none")
    for tool in ("cuobjdump", "nvdisasm", "ptxas"):
        toolchain.triton_tool(tool)


def _this_checkout(lines: dict, source_file: str) -> dict:
    """The line table with its paths in this checkout. Triton's cache keys a kernel by its source, not by
    where the file lies, so a cubin first compiled in another directory (another checkout, a test's
    temporary directory) names that directory's files: they are moved to the kernel's own file's directory."""
    kernel_files = {chain[-1][0] for chain in lines.values() if chain}
    if not kernel_files or source_file in kernel_files:
        return lines
    name = Path(source_file).name
    old = next((f for f in kernel_files if Path(f).name == name), None)
    if old is None:
        return lines
    old_dir, new_dir = str(Path(old).parent), str(Path(source_file).parent)

    def move(path: str) -> str:
        return new_dir + path[len(old_dir):] if path.startswith(old_dir + "/") else path

    return {a: tuple((move(f), line) for f, line in chain) for a, chain in lines.items()}


def compile_kernel(kernel: TritonKernel, arch: int) -> CompiledKernel:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    fn = kernel.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [MockTensor(a) if isinstance(a, torch.dtype) else a for a in kernel.args]
    options = dict(kernel.constexprs, num_warps=kernel.num_warps, num_stages=kernel.num_stages)
    bound, specialization, launch_options = binder(*args, **options)
    parsed, signature, constexprs, attrs = fn._pack_args(backend, options, bound, specialization, launch_options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=parsed.__dict__)
    cuobjdump = toolchain.triton_tool("cuobjdump")
    with tempfile.TemporaryDirectory(prefix="cbk-audit-") as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        resources = sass.parse_resources(toolchain.run([cuobjdump, "-res-usage", cubin]))
        functions = sass.parse_sass(toolchain.run([cuobjdump, "-sass", cubin]))
        lines = lineinfo.parse(toolchain.run([toolchain.triton_tool("nvdisasm"), "-gi", "-c", cubin]))
    name = compiled.metadata.name
    source_file = str(Path(inspect.getsourcefile(fn.fn)).absolute())
    return CompiledKernel(name, resources[name], tuple(functions[name]),
                          _this_checkout(lines.get(name, {}), source_file),
                          dynamic_shared_bytes=int(getattr(compiled.metadata, "shared", 0) or 0))
