"""Compiles a Triton kernel for an sm_XX target without a GPU, as a launch would, and reads its cubin.

The JIT's own binder turns the launch arguments into Triton's signature, constexprs and specialisation
attributes (16-byte divisibility of pointers and integers) exactly as at a real launch; triton.compile then
runs the NVIDIA backend (ptxas) for GPUTarget("cuda", arch, 32), which for sm_90 produces sm_90a code as on
an H100/H200. Registers and local memory come from `cuobjdump -res-usage`, the SASS from `cuobjdump -sass`,
both tools from Triton's NVIDIA backend.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from . import sass, toolchain
from .compiled import CompiledKernel
from .launches import TritonKernel


def check_tools() -> None:
    """Raises toolchain.ToolMissing when the Triton half cannot run here."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise toolchain.ToolMissing("TRITON_INTERPRET=1 is set: Triton then interprets kernels and compiles none")
    toolchain.triton_tool("cuobjdump")
    toolchain.triton_tool("ptxas")


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
    name = compiled.metadata.name
    return CompiledKernel(name, resources[name], sass.analyse(functions[name]),
                          dynamic_shared_bytes=int(getattr(compiled.metadata, "shared", 0) or 0))
