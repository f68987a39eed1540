"""The static GPU audit (cbkernels/audit): SASS reading checked on tiny kernels compiled for sm_90 whose
answer is known from their source, the occupancy rule, and the CLI on the Triton half.

Compiling needs the real Triton compiler, but this test session runs Triton's interpreter on CPU machines
(conftest.py sets TRITON_INTERPRET=1 before triton is imported), so the compiling runs in a subprocess
without it. Skipped with the reason when Triton's NVIDIA tools (ptxas, cuobjdump) are missing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cbkernels.audit import occupancy, sass

ROOT = Path(__file__).resolve().parents[1]


def _triton_tools_missing() -> str | None:
    try:
        import triton.backends.nvidia as nvidia
    except ImportError as exc:
        return f"triton's NVIDIA backend is not importable ({exc})"
    bin_dir = Path(nvidia.__file__).parent / "bin"
    missing = [t for t in ("ptxas", "cuobjdump") if not os.access(bin_dir / t, os.X_OK)]
    return f"missing in {bin_dir}: {', '.join(missing)}" if missing else None


needs_triton_tools = pytest.mark.skipif(_triton_tools_missing() is not None,
                                        reason=f"Triton's NVIDIA tools: {_triton_tools_missing()}")


def _compiler_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


# Each kernel's answer follows from its source: one exp2 per element; a 16-byte aligned contiguous tile;
# the same tile at a runtime stride (no vector access possible); a 16384-element row held by one warp (512
# fp32 values a thread, more than the 255 registers a thread may have); a loop with num_stages=3
# (Triton's pipeliner issues the next tiles' loads as cp.async) and the same loop without.
_KERNELS = '''
import triton
import triton.language as tl


@triton.jit
def exp2_loop(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        x = tl.load(x_ptr + start + offs, mask=start + offs < n)
        tl.store(y_ptr + start + offs, tl.exp2(x), mask=start + offs < n)


@triton.jit
def copy_tile(x_ptr, y_ptr, stride, BLOCK: tl.constexpr, STRIDED: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if STRIDED:
        offs = offs * stride
    tl.store(y_ptr + offs, tl.load(x_ptr + offs))


@triton.jit
def row_in_registers(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(y_ptr + offs, tl.exp2(x - tl.max(x, axis=0)) * tl.sum(x, axis=0))


@triton.jit
def prefetch_loop(x_ptr, y_ptr, n, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in tl.range(0, n, BLOCK, num_stages=STAGES):
        acc += tl.load(x_ptr + start + offs)
    tl.store(y_ptr + offs, acc)
'''

_ANALYSE = '''
import dataclasses, json, sys
import torch
sys.path.insert(0, sys.argv[1])
import tiny_kernels as tk
from cbkernels.audit import compile_triton
from cbkernels.audit.launches import TritonKernel

f32 = torch.float32
cases = {
    "exp2_loop": (tk.exp2_loop, (f32, f32, 4096), {"BLOCK": 32}, 1),
    "copy_16": (tk.copy_tile, (f32, f32, 1), {"BLOCK": 128, "STRIDED": False}, 1),
    "copy_strided": (tk.copy_tile, (f32, f32, 3), {"BLOCK": 128, "STRIDED": True}, 1),
    "row_in_registers": (tk.row_in_registers, (f32, f32), {"BLOCK": 16384}, 1),
    "prefetch_1": (tk.prefetch_loop, (f32, f32, 4096), {"BLOCK": 512, "STAGES": 1}, 4),
    "prefetch_3": (tk.prefetch_loop, (f32, f32, 4096), {"BLOCK": 512, "STAGES": 3}, 4),
}
out = {}
for name, (fn, args, constexprs, warps) in cases.items():
    k = compile_triton.compile_kernel(TritonKernel(fn, args, constexprs, warps), 90)
    out[name] = {"local": k.resources.local_memory_bytes, "code": dataclasses.asdict(k.code),
                 "pipelined": k.code.pipelined}
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{kernel: {"local": bytes, "code": KernelCode as a dict, "pipelined": bool}} for the kernels above."""
    tmp = tmp_path_factory.mktemp("audit")
    (tmp / "tiny_kernels.py").write_text(textwrap.dedent(_KERNELS))
    done = subprocess.run([sys.executable, "-c", _ANALYSE, str(tmp)], capture_output=True, text=True,
                          env=_compiler_env(), cwd=tmp, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@needs_triton_tools
def test_one_exp2_per_element_is_one_mufu_per_loaded_element(tiny):
    (loop,) = tiny["exp2_loop"]["code"]["main_loops"]  # the loop streams the data: it is the main loop
    body = loop["body"]
    elements = sum(body["load_widths"]) / 4  # fp32: however far ptxas unrolled it
    assert elements >= 1
    assert body["mufu"] == elements


@needs_triton_tools
def test_access_widths(tiny):
    assert set(tiny["copy_16"]["code"]["straight"]["store_widths"]) == {16}
    assert set(tiny["copy_16"]["code"]["straight"]["load_widths"]) == {16}
    assert set(tiny["copy_strided"]["code"]["straight"]["store_widths"]) == {4}


@needs_triton_tools
def test_straight_line_kernel_has_no_main_loop(tiny):
    assert tiny["copy_16"]["code"]["main_loops"] == []
    assert tiny["copy_16"]["local"] == 0


@needs_triton_tools
def test_a_row_too_large_for_registers_uses_local_memory(tiny):
    assert tiny["row_in_registers"]["local"] > 0


@needs_triton_tools
def test_pipelined_loop_is_detected(tiny):
    assert tiny["prefetch_3"]["pipelined"] and tiny["prefetch_3"]["code"]["async_copies"]
    assert not tiny["prefetch_1"]["pipelined"]


def test_parse_sass_and_loops_on_a_listing():
    """The parser on cuobjdump's format: a loop closed by a backward branch, a backward branch to code that
    does not lead back (not a loop), and a called subroutine (excluded)."""
    listing = textwrap.dedent("""
        \t\tFunction : k
        /*0000*/                   S2R R0, SR_TID.X ;   /* 0x0 */
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   MUFU.EX2 R4, R4 ;
        /*0030*/                   STG.E.64 desc[UR4][R2.64], R4 ;
        /*0040*/              @P0 BRA 0x10 ;
        /*0050*/                   CALL.REL.NOINC 0x90 ;
        /*0060*/              @P1 BRA 0x80 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x70 ;
        /*0090*/                   MUFU.RCP R1, R1 ;
        /*00a0*/                   RET.REL.NODEC R2 0x0 ;
        /*00b0*/                   BRA 0xb0;
    """)
    (name, instructions), = sass.parse_sass(listing).items()
    assert name == "k" and instructions[1].opcode == "LDG.E.128" and instructions[4].predicate == "@P0"
    code = sass.analyse(instructions)
    (loop,) = code.main_loops
    assert (loop.start, loop.end) == (0x10, 0x40)
    assert loop.body.mufu == 1 and loop.body.load_widths == (16,) and loop.body.store_widths == (8,)
    assert code.straight.mufu == 0  # the subroutine's RCP is not counted
    assert sass.access_bytes("LDG.E.U16") == 2 and sass.access_bytes("STG.E") == 4


def test_occupancy_rule():
    # 64 registers x 256 threads = 16384 registers per CTA: 4 of the 65536 fit; 65 registers round up to 72.
    assert occupancy.ctas_per_sm(90, 64, 256, 0) == 4
    assert occupancy.ctas_per_sm(90, 65, 256, 0) == 3
    assert occupancy.ctas_per_sm(90, 32, 1024, 0) == 2  # the 2048-thread limit
    assert occupancy.ctas_per_sm(90, 16, 32, 0) == 32   # the 32-CTA limit
    assert occupancy.ctas_per_sm(90, 16, 128, 100 * 1024) == 2  # 228 KB of shared memory, 1 KB reserved each


REQUIRED_KEYS = {"backend", "kernel", "loss", "dtype", "gpu", "registers", "ctas_per_sm", "local_bytes",
                 "instr_per_elem", "mufu_per_elem", "predicted_ms", "predicted_pct_copy", "gates_passed"}


@needs_triton_tools
def test_cli_triton_half_writes_json(tmp_path):
    out = tmp_path / "audit.json"
    done = subprocess.run([sys.executable, "-m", "cbkernels", "audit", "--backend", "triton", "--json", str(out)],
                          capture_output=True, text=True, env=_compiler_env(), cwd=ROOT, timeout=600)
    assert done.returncode in (0, 1), done.stdout[-2000:] + done.stderr[-3000:]  # 1: a gate failed (allowed)
    records = json.loads(out.read_text())
    assert records and all(REQUIRED_KEYS <= set(r) for r in records)
    assert {r["backend"] for r in records} == {"triton"}
    assert {(r["loss"], r["dtype"], r["gpu"]) for r in records} == {
        (loss, dtype, gpu) for loss in ("softmax", "sigmoid", "focal") for dtype in ("float32", "bfloat16")
        for gpu in ("H100", "H200")}
    for r in records:
        assert r["predicted_ms"] > 0 and r["registers"] > 0 and r["ctas_per_sm"] >= 0
    assert ("GATE FAILED" in done.stdout) == (done.returncode == 1)
