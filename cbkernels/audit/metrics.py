"""Per-launch metrics from a compiled kernel and its variant record (docs/roofline.md, "Counting").

Elements a thread handles in one row: e_row = ceil(C / threads_per_row). A main loop whose source iteration
covers e_iter elements per thread may be unrolled by the compiler: the unroll factor is its global load
bytes per SASS iteration over e_iter x element bytes (at least 1). Then per element:
    count = sum over main loops (loop count / (e_iter x unroll)) + straight-line count / (e_row x rows_per_thread)
i.e. the code outside the main loops (row setup, reductions, the loss store) runs once per row and is
amortised over the row's elements. Access widths: the narrowest width among the widest global accesses that
together move at least 90% of the N x C bytes a thread reads (writes) per row.
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
    load_width: int | None      # bytes; None when the launch reads no N x C data
    store_width: int | None
    barriers_in_main_loop: int
    calls_in_main_loop: int
    main_loops: int
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


def measure(launch: Launch, kernel: CompiledKernel, n: int, c: int, dtype: str, ctas_per_sm: int) -> KernelMetrics:
    elem = ELEMENT_BYTES[dtype]
    e_row = math.ceil(c / launch.threads_per_row)
    per_thread_rows = e_row * launch.rows_per_thread
    instr = mufu = 0.0
    loads: list[tuple[int, float]] = []
    stores: list[tuple[int, float]] = []
    unrolls = []
    iterations = 0.0

    def add(region: Region, times: float):
        loads.extend((w, times) for w in region.load_widths)
        stores.extend((w, times) for w in region.store_widths)

    for loop in kernel.code.main_loops:
        unroll = max(1, round(loop.body.load_bytes / (launch.elems_per_iter * elem)))
        per_iteration = launch.elems_per_iter * unroll
        unrolls.append(unroll)
        instr += loop.body.instructions / per_iteration
        mufu += loop.body.mufu / per_iteration
        add(loop.body, e_row / per_iteration)
        iterations += e_row / per_iteration
    straight = kernel.code.straight
    instr += straight.instructions / per_thread_rows
    mufu += straight.mufu / per_thread_rows
    add(straight, 1 / launch.rows_per_thread)

    if kernel.code.main_loops:
        in_flight = max(loop.body.load_bytes for loop in kernel.code.main_loops)
        trips = 1 + (1 if kernel.code.pipelined else math.ceil(iterations)) * launch.rows_per_thread
    else:
        in_flight = straight.load_bytes
        trips = 2 if launch.per_element_work else 1
    work = launch.per_element_work
    load = KernelLoad(
        elements=n * c, nc_bytes=n * c * (launch.read_bytes_per_elem + launch.write_bytes_per_elem),
        instr_per_elem=instr if work else 0.0, mufu_per_elem=mufu if work else 0.0,
        ctas=launch.ctas, ctas_per_sm=ctas_per_sm, threads_per_cta=launch.threads_per_cta,
        load_bytes_in_flight_per_thread=in_flight, pipelined=kernel.code.pipelined, dependent_round_trips=trips)
    return KernelMetrics(
        registers=kernel.resources.registers, local_bytes=kernel.resources.local_memory_bytes,
        shared_bytes=kernel.resources.shared_bytes + kernel.dynamic_shared_bytes, ctas_per_sm=ctas_per_sm,
        instr_per_elem=load.instr_per_elem, mufu_per_elem=load.mufu_per_elem,
        load_width=_width(loads, e_row * launch.read_bytes_per_elem),
        store_width=_width(stores, e_row * launch.write_bytes_per_elem),
        barriers_in_main_loop=sum(loop.body.barriers for loop in kernel.code.main_loops),
        calls_in_main_loop=sum(loop.body.calls for loop in kernel.code.main_loops),
        main_loops=len(kernel.code.main_loops), unroll=tuple(unrolls), pipelined=kernel.code.pipelined, load=load)
