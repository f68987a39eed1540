"""Per-launch metrics from a compiled kernel and its variant record (docs/roofline.md, "Counting").

Elements a thread handles in one row: e_row = ceil(C / threads_per_row). Rows a thread walks over the launch:
r = ceil(row groups / CTAs), a row group being the threads_per_cta / threads_per_row rows a CTA handles at
once (1 for a grid of one CTA per row group; more on a persistent grid). A tile loop whose source iteration
covers e_iter elements per thread may be unrolled by the compiler: the unroll factor u is the bytes of its
widest global loads per SASS iteration (the row's vectors, not the per-row scalars a row-held loop also
loads) over e_iter x the bytes per element the loop loads in such vectors (Launch.tile_loop_bytes: the
element bytes, twice for a loop that reads a dense target beside the logits), at least 1. Then per element:

    count = sum over tile loops (loop count / (e_iter u) + rare-block count / (u e_row))
            + sum over row loops (loop count / e_row) + straight-line count / (e_row r)

Tile loops run once per tile; their rare blocks (the declared rare functions' blocks: a copy per unrolled
tile, one of which runs in a row) and the row loops' own code once per row; the straight-line code once per
thread. Access widths: the narrowest width among the widest global accesses that together move at least
90% of the N x C bytes a thread reads (writes) per row.
"""
from __future__ import annotations

import dataclasses
import math

from .compiled import CompiledKernel
from .launches import ELEMENT_BYTES, Launch
from .roofline import KernelLoad
from .sass import Region

COVERAGE = 0.9


@dataclasses.dataclass(frozen=True)
class KernelMetrics:
    registers: int
    local_bytes: int
    shared_bytes: int
    ctas_per_sm: int
    instr_per_elem: float
    mufu_per_elem: float
    rare_instr_per_elem: float  # of instr_per_elem: the rare blocks' share (once per row)
    load_width: int | None      # bytes; None when the launch reads no N x C data
    store_width: int | None
    barriers_in_main_loop: int  # in the tile loops
    calls_in_main_loop: int
    main_loops: int             # tile loops
    unroll: tuple[int, ...]
    pipelined: bool
    load: KernelLoad


def _width(accesses: list[tuple[int, float]], expected: float) -> int | None:
    if expected <= 0:
        return None
    moved = 0.0
    for width, times in sorted(accesses, reverse=True):
        moved += width * times
        if moved >= COVERAGE * expected:
            return width
    return min((w for w, _ in accesses), default=0)


def rows_per_cta(launch: Launch) -> float:
    """The rows a CTA handles at once: a fraction 1 / S when S CTAs share a row (a row split into chunks)."""
    if launch.threads_per_row > launch.threads_per_cta:
        return launch.threads_per_cta / launch.threads_per_row
    return max(1, launch.threads_per_cta // launch.threads_per_row)


def rows_per_thread(launch: Launch, n: int) -> int:
    """Rows a thread walks one after the other (the grid's row groups over its CTAs, rounded up; a row split
    into S chunks is S row groups). A variant that states it must state this value."""
    if launch.threads_per_row > launch.threads_per_cta:
        groups = -(-n * launch.threads_per_row // launch.threads_per_cta)
    else:
        groups = math.ceil(n / rows_per_cta(launch))
    derived = math.ceil(groups / launch.ctas)
    if launch.rows_per_thread is not None and launch.rows_per_thread != derived:
        raise ValueError(f"{launch.kernel}: rows_per_thread {launch.rows_per_thread} contradicts its grid "
                         f"({launch.ctas} CTAs for {groups} row groups of {n} rows: {derived})")
    return derived


def _tile_loop_bytes(launch: Launch, tile_loops: int, elem: int):
    """An iterator over the bytes per element each tile loop loads in full vectors, in machine-code order
    (Launch.tile_loop_bytes; the element bytes when it is None)."""
    if launch.tile_loop_bytes is None:
        return iter([elem] * tile_loops)
    if len(launch.tile_loop_bytes) != tile_loops:
        raise ValueError(f"{launch.kernel}: tile_loop_bytes {launch.tile_loop_bytes} names "
                         f"{len(launch.tile_loop_bytes)} tile loops; the machine code has {tile_loops}")
    return iter(launch.tile_loop_bytes)


def measure(launch: Launch, kernel: CompiledKernel, n: int, c: int, dtype: str, ctas_per_sm: int) -> KernelMetrics:
    if not 0 <= launch.reread_bytes_per_elem <= launch.read_bytes_per_elem:
        raise ValueError(f"{launch.kernel}: reread_bytes_per_elem {launch.reread_bytes_per_elem} is not a part of "
                         f"read_bytes_per_elem {launch.read_bytes_per_elem}")
    if launch.batch_rows is not None:  # a launch on a batch of the rows: its elements, bytes and rows
        n = launch.batch_rows
    elem = ELEMENT_BYTES[dtype]
    e_row = math.ceil(c / launch.threads_per_row)
    rows = rows_per_thread(launch, n)
    code = kernel.code(launch.rare_functions)
    instr = mufu = rare_instr = 0.0
    loads: list[tuple[int, float]] = []
    stores: list[tuple[int, float]] = []
    unrolls = []
    iterations = 0.0  # SASS tile-loop iterations per row

    def add(region: Region, per_row: float, per_elem: float):
        nonlocal instr, mufu
        instr += region.instructions * per_elem
        mufu += region.mufu * per_elem
        loads.extend((w, per_row) for w in region.load_widths)
        stores.extend((w, per_row) for w in region.store_widths)

    loop_bytes = _tile_loop_bytes(launch, sum(1 for loop in code.main_loops if not loop.per_row), elem)
    for loop in code.main_loops:
        if loop.per_row:
            add(loop.body, 1.0, 1 / e_row)
            continue
        widest = max(loop.body.load_widths, default=0)
        vector_bytes = sum(w for w in loop.body.load_widths if w == widest)
        unroll = max(1, round(vector_bytes / (launch.elems_per_iter * next(loop_bytes))))
        per_iteration = launch.elems_per_iter * unroll
        unrolls.append(unroll)
        add(loop.body, e_row / per_iteration, 1 / per_iteration)
        before = instr
        add(loop.rare, 1 / unroll, 1 / (unroll * e_row))
        rare_instr += instr - before
        iterations += e_row / per_iteration
    add(code.straight, 1 / rows, 1 / (e_row * rows))

    tiles = code.tile_loops
    work = launch.per_element_work
    if not work:
        in_flight, trips = code.straight.load_bytes, 1
    elif tiles:
        in_flight = max(loop.body.load_bytes * loop.copy_groups for loop in tiles)
        trips = 1 + (1 if code.pipelined else math.ceil(iterations)) * rows
    else:
        in_flight, trips = code.straight.load_bytes, 2
    load = KernelLoad(
        elements=n * c, nc_bytes=n * c * (launch.read_bytes_per_elem + launch.write_bytes_per_elem),
        instr_per_elem=instr if work else 0.0, mufu_per_elem=mufu if work else 0.0,
        ctas=launch.ctas, ctas_per_sm=ctas_per_sm, threads_per_cta=launch.threads_per_cta,
        load_bytes_in_flight_per_thread=in_flight, pipelined=code.pipelined, dependent_round_trips=trips,
        thread_instructions=(instr * e_row * rows) if work else 0.0,
        reread_bytes=n * c * launch.reread_bytes_per_elem, reread_row_bytes=c * launch.reread_bytes_per_elem / launch.rereads,
        rows_per_cta=rows_per_cta(launch), follows_launch=launch.follows_launch)
    return KernelMetrics(
        registers=kernel.resources.registers, local_bytes=kernel.resources.local_memory_bytes,
        shared_bytes=kernel.resources.shared_bytes + kernel.dynamic_shared_bytes, ctas_per_sm=ctas_per_sm,
        instr_per_elem=load.instr_per_elem, mufu_per_elem=load.mufu_per_elem,
        rare_instr_per_elem=rare_instr if work else 0.0,
        load_width=_width(loads, e_row * launch.read_bytes_per_elem),
        store_width=_width(stores, e_row * launch.write_bytes_per_elem),
        barriers_in_main_loop=sum(loop.body.barriers for loop in tiles),
        calls_in_main_loop=sum(loop.body.calls for loop in tiles),
        main_loops=len(tiles), unroll=tuple(unrolls), pipelined=code.pipelined, load=load)
