"""The static GPU audit (cbkernels/audit): SASS reading checked on tiny kernels compiled for sm_90 whose
answer is known from their source, the occupancy rule, and the CLI on the Triton half.

Compiling needs the real Triton compiler, but this test session runs Triton's interpreter on CPU machines
(conftest.py sets TRITON_INTERPRET=1 before triton is imported), so the compiling runs in a subprocess
without it. Skipped with the reason when Triton's NVIDIA tools (ptxas, cuobjdump) are missing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cbkernels.audit import launches, lineinfo, metrics, occupancy, roofline, sass
from cbkernels.audit.launches import Launch

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
# (Triton's pipeliner issues the next tiles' loads as cp.async) and the same loop without; a tile loop with
# a uniform branch to a helper of three exp2 per element in one tile, one exp2 per element in the others;
# a loop over rows (one per-row load) around a tile loop; a loop that streams two arrays side by side (a
# dense target beside the logits).
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


@triton.jit
def _rare_fixup(x):
    return tl.exp2(tl.exp2(tl.exp2(x * 3.0)))  # nothing in common with the other path's exp2(x)


@triton.jit
def rare_branch_loop(x_ptr, y_ptr, n, special, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        x = tl.load(x_ptr + start + offs)
        if (special >= start) & (special < start + BLOCK):  # a uniform branch, taken in one tile
            y = _rare_fixup(x)
        else:
            y = tl.exp2(x)
        tl.store(y_ptr + start + offs, y)


@triton.jit
def rows_of_tiles(x_ptr, t_ptr, y_ptr, n_rows, C, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        t = tl.load(t_ptr + row)
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, C, BLOCK):
            acc += tl.exp2(tl.load(x_ptr + row * C + start + offs))
        tl.store(y_ptr + row, tl.sum(acc, axis=0) * t)


@triton.jit
def pair_loop(x_ptr, t_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        x = tl.load(x_ptr + start + offs, mask=start + offs < n)
        t = tl.load(t_ptr + start + offs, mask=start + offs < n)
        tl.store(y_ptr + start + offs, tl.exp2(x) * t, mask=start + offs < n)
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
    "rare_branch": (tk.rare_branch_loop, (f32, f32, 4096, 7), {"BLOCK": 128}, 1),
    "rows_of_tiles": (tk.rows_of_tiles, (f32, f32, f32, 64, 4096), {"BLOCK": 128}, 1),
    "pair_loop": (tk.pair_loop, (f32, f32, f32, 4096), {"BLOCK": 128}, 1),
}
out = {}
for name, (fn, args, constexprs, warps) in cases.items():
    k = compile_triton.compile_kernel(TritonKernel(fn, args, constexprs, warps), 90)
    out[name] = {"local": k.resources.local_memory_bytes, "code": dataclasses.asdict(k.code()),
                 "pipelined": k.code().pipelined,
                 "rare_code": dataclasses.asdict(k.code(("_rare_fixup",))) if name == "rare_branch" else None}
    if name == "pair_loop":  # one warp, 128-column tiles: 4 elements a thread per source iteration
        from cbkernels.audit import metrics
        from cbkernels.audit.launches import Launch
        launch = Launch("pair_loop", None, ctas=1, threads_per_cta=32, threads_per_row=32, elems_per_iter=4,
                        read_bytes_per_elem=8, write_bytes_per_elem=4, reread_bytes_per_elem=4, rereads=2,
                        tile_loop_bytes=(8,))
        m = metrics.measure(launch, k, 1, 4096, "float32", 1)
        out[name]["measured"] = {"instr_per_elem": m.instr_per_elem, "unroll": list(m.unroll),
                                 "reread_row_bytes": m.load.reread_row_bytes}
        try:
            metrics.measure(dataclasses.replace(launch, tile_loop_bytes=(8, 8)), k, 1, 4096, "float32", 1)
        except ValueError as exc:
            out[name]["mismatch_error"] = str(exc)
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


@needs_triton_tools
def test_a_loop_over_two_arrays_is_counted_per_element(tiny):
    """A loop loading two fp32 arrays: its widest loads cover 8 bytes an element, so with tile_loop_bytes (8,)
    the elements of a machine-code iteration are its 16-byte load bytes / 8, whatever the compiler unrolled;
    a tuple naming more loops than the code has is refused. rereads = 2 halves the row bytes held."""
    pair = tiny["pair_loop"]
    (loop,) = pair["code"]["main_loops"]
    elements = sum(w for w in loop["body"]["load_widths"] if w == 16) / 8
    assert elements >= 4
    e_row = 4096 / 32  # a row of 4096 columns over one warp; the straight-line code runs once a row here
    assert loop["rare"]["instructions"] == 0
    assert pair["measured"]["instr_per_elem"] == pytest.approx(
        loop["body"]["instructions"] / elements + pair["code"]["straight"]["instructions"] / e_row)
    assert pair["measured"]["unroll"] == [elements / 4]
    assert pair["measured"]["reread_row_bytes"] == 4096 * 4 / 2
    assert "names 2 tile loops; the machine code has 1" in pair["mismatch_error"]


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
    assert {(r["loss"], r["target"], r["dtype"], r["gpu"]) for r in records} == {
        (loss, target, dtype, gpu) for loss in launches.LOSSES for target in ("index", "dense")
        for dtype in ("float32", "bfloat16") for gpu in ("H100", "H200")}
    for r in records:
        assert r["predicted_ms"] > 0 and r["registers"] > 0 and r["ctas_per_sm"] >= 0
    assert ("GATE FAILED" in done.stdout) == (done.returncode == 1)
    # a dense target's % of copy shortfall is reported, not gated; a class-index loss's fails the gate
    totals = [r for r in records if r["level"] == "loss"]
    assert not any(r["missed_targets"] for r in totals if r["target"] == "index")
    assert all(r["gates_passed"] for r in totals if r["missed_targets"] and not r["failed_gates"])
    assert ("TARGET MISSED" in done.stdout) == any(r["missed_targets"] for r in totals)


@needs_triton_tools
def test_rare_uniform_branch_counts_apart(tiny):
    """Undeclared, both paths of the uniform branch count every tile (1 + 3 exp2 per element); with the
    helper declared rare, its block leaves the per-tile count (1 exp2 per element) for the rare count."""
    (plain,) = tiny["rare_branch"]["code"]["main_loops"]
    (split,) = tiny["rare_branch"]["rare_code"]["main_loops"]
    elements = sum(plain["body"]["load_widths"]) / 4
    assert plain["body"]["mufu"] == 4 * elements and plain["rare"]["mufu"] == 0
    assert split["body"]["mufu"] == elements and split["rare"]["mufu"] == 3 * elements
    assert split["body"]["instructions"] + split["rare"]["instructions"] == plain["body"]["instructions"]


@needs_triton_tools
def test_loop_over_rows_is_a_row_loop_around_the_tile_loop(tiny):
    loops = tiny["rows_of_tiles"]["code"]["main_loops"]
    (row,) = [loop for loop in loops if loop["per_row"]]
    (tile,) = [loop for loop in loops if not loop["per_row"]]
    assert row["start"] < tile["start"] and tile["end"] < row["end"]
    # the row's scalar is loaded once per row, in the row loop (beside any tile iterations the compiler
    # peeled off the tile loop, which also run once per row)
    assert 4 in row["body"]["load_widths"] and 4 not in tile["body"]["load_widths"]
    assert tile["body"]["mufu"] == sum(tile["body"]["load_widths"]) / 4


def test_line_table_chains_and_function_spans(tmp_path):
    listing = textwrap.dedent("""
        .text.k:
        \t//## File "a.py", line 3 inlined at "b.py", line 9
        \t//## File "b.py", line 9
                /*0000*/                   MUFU.EX2 R1, R1 ;
                /*0010*/                   FADD R1, R1, R1 ;
        \t//## File "b.py", line 10
                /*0020*/                   EXIT ;
    """)
    chains = lineinfo.parse(listing)["k"]
    assert chains[0x0] == chains[0x10] == (("a.py", 3), ("b.py", 9)) and chains[0x20] == (("b.py", 10),)
    py = tmp_path / "a.py"
    py.write_text("import x\n\n\ndef helper(v):\n    return v\n")
    assert lineinfo.function_spans(str(py), "helper") == ((4, 5),)
    cpp = tmp_path / "k.cuh"
    cpp.write_text("// helper(x) { in a comment }\n__device__ float helper(float x) {\n  return x;\n}\n"
                   "__device__ float user(float x) { return helper(x); }\nfloat helper(float);\n")
    assert lineinfo.function_spans(str(cpp), "helper") == ((2, 4),)
    chains = {0x0: ((str(cpp), 3), (str(cpp), 5)), 0x10: ((str(cpp), 5),)}
    assert lineinfo.addresses_in(chains, ("helper",)) == {0x0}


def test_rare_blocks_and_rows_per_thread_on_a_listing():
    listing = textwrap.dedent("""
        \t\tFunction : k
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/              @P0 BRA 0x40 ;
        /*0020*/                   MUFU.EX2 R4, R4 ;
        /*0030*/                   BRA 0x50 ;
        /*0040*/                   MUFU.RCP R4, R4 ;
        /*0050*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*0060*/              @P1 BRA 0x0 ;
        /*0070*/                   EXIT ;
    """)
    (_, instructions), = sass.parse_sass(listing).items()
    (loop,) = sass.analyse(instructions, frozenset({0x40})).main_loops
    assert loop.rare.instructions == 1 and loop.rare.mufu == 1 and loop.body.mufu == 1
    launch = Launch("k", None, ctas=264, threads_per_cta=512, threads_per_row=512, elems_per_iter=16,
                    read_bytes_per_elem=4, write_bytes_per_elem=4)
    assert metrics.rows_per_thread(launch, 8192) == 32  # ceil(8192 rows / 264 CTAs)
    with pytest.raises(ValueError, match="contradicts"):
        metrics.rows_per_thread(dataclasses.replace(launch, rows_per_thread=1), 8192)


def test_critical_path_adds_up_without_overlap():
    """One CTA per SM that loads, then computes: its round trips, its bytes at the SM's share of the
    bandwidth and its instructions (16 warps on 4 schedulers) add up; pipelined with 2 CTAs, they overlap."""
    gpu = roofline.H200
    load = roofline.KernelLoad(elements=132 * 8192, nc_bytes=132 * 8192 * 8.0, instr_per_elem=0.0,
                               mufu_per_elem=0.0, ctas=132, ctas_per_sm=1, threads_per_cta=512,
                               load_bytes_in_flight_per_thread=64.0, pipelined=False, dependent_round_trips=2,
                               thread_instructions=1000.0)
    trips = 2 * gpu.latency_us * 1e-3
    transfer = 8192 * 8.0 / (gpu.copy_gbps * 1e9 / gpu.sms) * 1e3
    compute = 1000.0 * 4 / (gpu.clock_ghz * 1e6)
    assert roofline.predict(gpu, load).latency_ms == pytest.approx(trips + transfer + compute)
    both = dataclasses.replace(load, pipelined=True, ctas_per_sm=2, ctas=264)
    assert roofline.predict(gpu, both).latency_ms == pytest.approx(max(trips, transfer / 2, compute))


def test_reread_served_by_l2_only_when_the_rows_in_flight_fit():
    """A streamed softmax launch (read twice, written once) by hand from the H200's documented constants:
    50 MiB of L2, of which L2_FIT_FRACTION = 1/2 holds the rows in flight. 264 CTAs of one fp32 row:
    at C = 16384 (64 KiB rows) 16.5 MiB fit and the re-read leaves DRAM (two passes' bytes); at C = 262144
    (1 MiB rows) 264 MiB do not, and DRAM moves all three."""
    gpu = roofline.H200
    assert gpu.l2_bytes == 50 * 2**20 and roofline.L2_FIT_FRACTION == 0.5

    def load(c):
        n = 8192
        return roofline.KernelLoad(elements=n * c, nc_bytes=n * c * 12.0, instr_per_elem=0.0, mufu_per_elem=0.0,
                                   ctas=264, ctas_per_sm=2, threads_per_cta=512,
                                   load_bytes_in_flight_per_thread=1024.0, pipelined=True,
                                   dependent_round_trips=1, thread_instructions=0.0, reread_bytes=n * c * 4.0,
                                   reread_row_bytes=c * 4.0, rows_per_cta=1)

    fits, spills = load(16384), load(262144)
    assert fits.reread_footprint(gpu) == 264 * 65536 and fits.reread_hits_l2(gpu)
    assert spills.reread_footprint(gpu) == 264 * 2**20 and not spills.reread_hits_l2(gpu)
    p_fit, p_spill = roofline.predict(gpu, fits), roofline.predict(gpu, spills)
    assert p_fit.reread_from_l2 and not p_spill.reread_from_l2
    assert p_fit.memory_ms == pytest.approx(8192 * 16384 * 8.0 / (gpu.copy_gbps * 1e9) * 1e3)
    assert p_spill.memory_ms == pytest.approx(8192 * 262144 * 12.0 / (gpu.copy_gbps * 1e9) * 1e3)
    assert p_fit.l2_ms == pytest.approx(8192 * 16384 * 12.0 / (gpu.l2_gbps * 1e9) * 1e3)
    # the boundary: 25 MiB of rows in flight still fit, one byte more does not
    edge = dataclasses.replace(fits, ctas=200, reread_row_bytes=25 * 2**20 / 200)
    assert edge.reread_hits_l2(gpu)
    assert not dataclasses.replace(edge, reread_row_bytes=edge.reread_row_bytes + 1).reread_hits_l2(gpu)
    # no re-read declared: nothing is served from L2 and DRAM moves every byte
    plain = dataclasses.replace(fits, reread_bytes=0.0, reread_row_bytes=0.0)
    assert not roofline.predict(gpu, plain).reread_from_l2


def test_shape_option_and_the_pct_copy_gate_at_its_shape_only():
    from cbkernels.audit import _shape, gates
    assert _shape("8192,8142") == (8192, 8142) and _shape(" 64 , 262144 ") == (64, 262144)
    for bad in ("8192", "8192x8142", "0,10", "8,1"):
        with pytest.raises(Exception):
            _shape(bad)
    assert gates.loss_failures("softmax", "float32", "H200", (8192, 8142), 50.0)
    assert not gates.loss_failures("softmax", "float32", "H200", (64, 262144), 50.0)
    assert not gates.loss_failures("softmax", "float32", "H100", (8192, 8142), 50.0)


def test_reread_must_be_part_of_the_reads():
    launch = Launch("k", None, ctas=1, threads_per_cta=128, threads_per_row=128, elems_per_iter=4,
                    read_bytes_per_elem=4, write_bytes_per_elem=4, reread_bytes_per_elem=8)
    with pytest.raises(ValueError, match="reread_bytes_per_elem"):
        metrics.measure(launch, None, 8, 1024, "float32", 2)


def test_sweep_table_marks_where_the_reread_is_served():
    from cbkernels.audit import report
    loss = dict(level="loss", gpu="H200", backend="cuda", loss="softmax", target="index", dtype="float32")
    records = [dict(loss, n=8192, c=8142, predicted_pct_copy=99.2, reread_from=None),
               dict(loss, n=64, c=262144, predicted_pct_copy=22.6, reread_from="DRAM"),
               dict(loss, gpu="H100", n=64, c=262144, predicted_pct_copy=1.0, reread_from="DRAM")]
    table = report.sweep_table(records, [(8192, 8142), (64, 262144)], "H200")
    assert table.splitlines()[-1] == "| cuda | softmax | index | float32 | 99% | 23% (DRAM) |"
    assert report.reread_source([{"reread_from_l2": True}, {"reread_from_l2": None}]) == "L2"
    assert report.reread_source([{"reread_from_l2": None}]) is None


def test_cuda_streaming_grid_follows_the_launchers_l2_rule():
    """launch.cu's stream_grid, as cuda_variants restates it with the share read from launch.cu: the grid
    cut to the rows that fit L2 / 2 (50 MiB / 2 over fp32 rows) when one block per SM still fits, else
    left as it is (the second read comes from DRAM either way; cutting would only lose bytes in flight)."""
    from cbkernels.audit import cuda_variants
    assert cuda_variants._stream_l2_divisor() == 2
    assert cuda_variants._stream_blocks(264, 16384, 4, 1) == 264      # 400 rows of 64 KiB fit
    assert cuda_variants._stream_blocks(264, 32768, 4, 1) == 200      # 200 rows of 128 KiB fit: cut to them
    assert cuda_variants._stream_blocks(264, 65536, 4, 1) == 264      # 100 fit, fewer than the SMs: kept
    assert cuda_variants._stream_blocks(64, 262144, 4, 1) == 64       # fewer blocks than SMs: all of them


def _nvcc_missing() -> str | None:
    from cbkernels.audit import toolchain
    try:
        toolchain.nvcc()
    except toolchain.ToolMissing as exc:
        return str(exc)
    return None


@pytest.mark.skipif(_nvcc_missing() is not None, reason=f"the CUDA object cache keys on nvcc: {_nvcc_missing()}")
def test_cached_cuda_object_is_keyed_by_every_source_file(tmp_path):
    """The compile check writes the kernels' object where the audit reads it (compile_cuda.object_path): an edit
    of any file under csrc/, a header included only indirectly among them, must name a new object, or the audit
    would read a stale one."""
    from cbkernels.audit import compile_cuda
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    shutil.copy(ROOT / "setup.py", tmp_path / "setup.py")
    before = compile_cuda.object_path("csrc/cuda/launch.cu", 90, tmp_path)
    assert before == compile_cuda.object_path("csrc/cuda/launch.cu", 90, tmp_path)  # deterministic
    assert before != compile_cuda.object_path("csrc/cuda/launch.cu", 80, tmp_path)  # per architecture
    header = tmp_path / "csrc" / "cuda" / "block_reduce.cuh"
    header.write_text(header.read_text() + "\n// edited\n")
    assert compile_cuda.object_path("csrc/cuda/launch.cu", 90, tmp_path) != before
    assert before.parent == tmp_path / "build" / "cuda-objects"
