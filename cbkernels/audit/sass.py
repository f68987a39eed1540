"""Reading SASS (cuobjdump -sass) and resource usage (cuobjdump -res-usage) of compiled kernels.

What the audit needs from a kernel's machine code, found without running it:
- loops: a branch to an earlier (or its own) address closes a loop [target, branch];
- tile loops: for every global load of the kernel (outside called subroutines), the innermost loop that
  encloses it, unless that loop encloses another such loop. They stream the N x C data. A row loop is the
  innermost loop around a tile loop: one iteration per row (a persistent grid walking its rows), whose own
  code (row setup, per-row loads, reductions, the loss store) runs once per row. Tile and row loops are the
  main loops. A kernel whose only loads loop is the walk over its rows, a row held in registers, has that
  walk as its tile loop (one tile per row); a kernel with no loop at all is straight-line code;
- rare blocks: in a tile loop, the basic blocks that come from functions the launch declares rare (through
  the cubin's line table, lineinfo.py): a uniform branch taken in one tile of a row (the tile holding the
  target column) costs its instructions once per row, not once per tile;
- out-of-line subroutines (the targets of CALL, up to their RET: library slow paths) are excluded from every
  count, as the fast path does not run them;
- per region: instructions (NOPs and the closing self-branch excluded), MUFU ops, barriers (BAR.*),
  CALLs, the byte widths of global loads and stores (LDG.E.128: 16, LDG.E.64: 8, LDG.E: 4, .U16: 2);
- whether a main loop overlaps memory and arithmetic by itself: it contains asynchronous copies
  (LDGSTS: cp.async; UTMALDG / UBLKCP: TMA and bulk copies), or at least half of its load bytes land in
  registers that the loop first reads *before* the load in program order, i.e. in the next iteration
  (the loads of tile i+1 are issued before tile i is computed).

Counts are static: every instruction between a loop's head and its back edge, rare blocks aside, counts
once per iteration, including blocks a data-dependent branch may skip. That makes the per-element count
an upper bound of what the fast path executes where no rare function is declared.
"""
from __future__ import annotations

import dataclasses
import re

_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_RESOURCE_FUNCTION = re.compile(r"^\s*Function\s+(\S+):\s*$")
_RESOURCE_FIELDS = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")
_REGISTER = re.compile(r"(?<![A-Za-z0-9_])R(\d+)(\.64)?")
_HEX = re.compile(r"0x([0-9a-f]+)")

ASYNC_COPY_OPCODES = ("LDGSTS", "UTMALDG", "UBLKCP")
_WIDTH_TOKENS = {"128": 16, "64": 8, "U16": 2, "S16": 2, "16": 2, "U8": 1, "S8": 1}


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    predicate: str          # "@P0", "@!P1", or ""
    opcode: str             # "LDG.E.128", "MUFU.EX2", ...
    operands: tuple[str, ...]

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


@dataclasses.dataclass(frozen=True)
class Resources:
    registers: int
    shared_bytes: int   # static shared memory
    local_bytes: int    # local memory per thread outside the stack frame
    stack_bytes: int    # the stack frame per thread, in local memory (where ptxas puts spills on sm_90)

    @property
    def local_memory_bytes(self) -> int:
        """Local memory per thread: the stack frame (spills, arrays, calls) and any other local data."""
        return self.local_bytes + self.stack_bytes


def parse_sass(text: str) -> dict[str, list[Instruction]]:
    """Function name (as cuobjdump prints it, mangled) -> its instructions in address order."""
    functions: dict[str, list[Instruction]] = {}
    current = None
    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            current = functions.setdefault(m.group(1), [])
            continue
        m = _INSTRUCTION.match(line)
        if m is None or current is None:
            continue
        body = m.group(2).strip()
        predicate = ""
        if body.startswith("@"):
            predicate, body = body.split(None, 1)
        opcode, _, rest = body.partition(" ")
        operands = tuple(o.strip() for o in rest.split(",")) if rest.strip() else ()
        current.append(Instruction(int(m.group(1), 16), predicate, opcode, operands))
    return functions


def parse_resources(text: str) -> dict[str, Resources]:
    """Function name -> registers, static shared, local and stack bytes (cuobjdump -res-usage)."""
    out: dict[str, Resources] = {}
    name = None
    for line in text.splitlines():
        m = _RESOURCE_FUNCTION.match(line)
        if m:
            name = m.group(1)
            continue
        if name is not None and "REG:" in line:
            fields = {k: int(v) for k, v in _RESOURCE_FIELDS.findall(line)}
            out[name] = Resources(fields.get("REG", 0), fields.get("SHARED", 0), fields.get("LOCAL", 0),
                                  fields.get("STACK", 0))
            name = None
    return out


def access_bytes(opcode: str) -> int:
    """Bytes per thread of one global load or store (4 unless the opcode names another width)."""
    for token in opcode.split(".")[1:]:
        if token in _WIDTH_TOKENS:
            return _WIDTH_TOKENS[token]
    return 4


def is_global_load(ins: Instruction) -> bool:
    return (ins.base in ("LDG", "LD") and ins.opcode not in ("LDGDEPBAR",)) or ins.base in ASYNC_COPY_OPCODES


def is_global_store(ins: Instruction) -> bool:
    return ins.base in ("STG", "ST")


def _branch_target(ins: Instruction) -> int | None:
    if ins.base not in ("BRA", "CALL") or not ins.operands:
        return None
    m = _HEX.search(ins.operands[-1])
    return int(m.group(1), 16) if m else None


def _is_padding(ins: Instruction) -> bool:
    return ins.base == "NOP" or (ins.base == "BRA" and _branch_target(ins) == ins.address)


@dataclasses.dataclass(frozen=True)
class Region:
    """Static counts over a set of instructions."""
    instructions: int
    mufu: int
    barriers: int
    calls: int
    load_widths: tuple[int, ...]    # bytes per thread of each global load
    store_widths: tuple[int, ...]   # bytes per thread of each global store

    @property
    def load_bytes(self) -> int:
        return sum(self.load_widths)


def count(instructions) -> Region:
    body = [i for i in instructions if not _is_padding(i)]
    return Region(
        instructions=len(body),
        mufu=sum(i.base == "MUFU" for i in body),
        barriers=sum(i.base == "BAR" for i in body),
        calls=sum(i.base == "CALL" for i in body),
        load_widths=tuple(access_bytes(i.opcode) for i in body if is_global_load(i)),
        store_widths=tuple(access_bytes(i.opcode) for i in body if is_global_store(i)),
    )


@dataclasses.dataclass(frozen=True)
class Loop:
    start: int      # address of the loop head (the back edge's target)
    end: int        # address of the back edge
    body: Region    # instructions run every iteration (without nested main loops and rare blocks)
    rare: Region    # blocks that come from the declared rare functions (see analyse): once per row
    pipelined: bool
    per_row: bool   # a row loop: one iteration per row, around the tile loops that stream the row
    copy_groups: int = 1  # asynchronous copy groups a warp keeps in flight (DEPBAR.LE SB0, k: k + 1)


@dataclasses.dataclass(frozen=True)
class KernelCode:
    main_loops: tuple[Loop, ...]
    straight: Region         # everything outside the main loops and the subroutines
    async_copies: bool       # LDGSTS / TMA / bulk copies anywhere in the kernel
    total: Region            # the whole kernel without subroutines

    @property
    def tile_loops(self) -> tuple[Loop, ...]:
        return tuple(loop for loop in self.main_loops if not loop.per_row)

    @property
    def pipelined(self) -> bool:
        """Loads of the next tile in flight while the current one is computed (see the module docstring)."""
        tiles = self.tile_loops
        return self.async_copies or (bool(tiles) and all(loop.pipelined for loop in tiles))


def _subroutines(instructions) -> list[tuple[int, int]]:
    """[start, end] address ranges of CALL targets up to their first RET."""
    targets = sorted({t for i in instructions if i.base == "CALL" and (t := _branch_target(i)) is not None})
    ranges = []
    for t in targets:
        ret = next((i.address for i in instructions if i.address >= t and i.base == "RET"), None)
        if ret is not None:
            ranges.append((t, ret))
    return ranges


def _inside(address, ranges) -> bool:
    return any(a <= address <= b for a, b in ranges)


def _reads(ins: Instruction) -> set[int]:
    """Register numbers the instruction reads (its sources; the data of a store counts its full width)."""
    store = is_global_store(ins) or ins.base in ("STS", "STL", "ST")
    sources = ins.operands if store or ins.base in ("BRA", "CALL", "EXIT", "RET") else ins.operands[1:]
    regs: set[int] = set()
    for k, operand in enumerate(sources):
        for m in _REGISTER.finditer(operand):
            n = int(m.group(1))
            width = 2 if m.group(2) else 1
            if store and k == len(sources) - 1 and "[" not in operand:
                width = max(width, access_bytes(ins.opcode) // 4)
            regs.update(range(n, n + width))
    return regs


def _destination(ins: Instruction) -> set[int]:
    if not ins.operands:
        return set()
    m = _REGISTER.match(ins.operands[0].strip())
    if not m:
        return set()
    n = int(m.group(1))
    return set(range(n, n + max(1, access_bytes(ins.opcode) // 4)))


def _pipelined(body: list[Instruction]) -> bool:
    """At least half of the loop's load bytes are first read before the load (i.e. next iteration)."""
    total = ahead = 0
    for k, ins in enumerate(body):
        if not is_global_load(ins):
            continue
        if ins.base in ASYNC_COPY_OPCODES:
            return True
        width = access_bytes(ins.opcode)
        total += width
        dest = _destination(ins)
        if any(_reads(later) & dest for later in body[k + 1:]):
            continue
        if any(_reads(earlier) & dest for earlier in body[:k]):
            ahead += width
    return total > 0 and 2 * ahead >= total


def _reaches(instructions: list[Instruction], start: int, goal: int) -> bool:
    """Whether control can flow from address `start` to address `goal` (a backward branch closes a loop only
    then: compilers also branch backwards to shared code that does not lead back)."""
    index = {ins.address: k for k, ins in enumerate(instructions)}
    seen, todo = set(), [index.get(start)]
    while todo:
        k = todo.pop()
        if k is None or k in seen or k >= len(instructions):
            continue
        seen.add(k)
        ins = instructions[k]
        if ins.address == goal:
            return True
        target = _branch_target(ins)
        if ins.base == "BRA" and target is not None:
            todo.append(index.get(target))
        if ins.predicate or ins.base not in ("BRA", "EXIT", "RET", "BRX", "JMX"):
            todo.append(k + 1)
    return False


def _blocks(body: list[Instruction], targets: set[int]) -> list[list[Instruction]]:
    """Basic blocks of a run of instructions: a block starts at a branch target and after a branch."""
    blocks: list[list[Instruction]] = []
    for ins in body:
        if not blocks or ins.address in targets or blocks[-1][-1].base in ("BRA", "BRX", "JMX", "EXIT", "RET"):
            blocks.append([])
        blocks[-1].append(ins)
    return blocks


def _split_rare(body: list[Instruction], targets: set[int], rare: frozenset[int]):
    """(common, rare) instructions of a loop body: a basic block is rare when at least half of its
    instructions come from a declared rare function (a block the compiler shares between both paths
    stays common; an if-converted, predicated rare path has no block of its own and stays common too,
    which is right: predicated instructions take their issue slot)."""
    if not rare:
        return body, []
    common, seldom = [], []
    for block in _blocks(body, targets):
        real = [i for i in block if not _is_padding(i)]
        hits = sum(i.address in rare for i in real)
        (seldom if hits and 2 * hits >= len(real) else common).extend(block)
    return common, seldom


_DEPBAR = re.compile(r"SB0\s*,\s*(0x[0-9a-f]+|\d+)")


def _copy_groups(body: list[Instruction]) -> int:
    """Copy groups in flight in a loop of asynchronous copies: it waits with DEPBAR.LE SB0, k (cp.async
    wait_group k) until at most k groups are outstanding, then issues the next, so k + 1 are in flight
    while it waits; 1 for a loop without that wait."""
    if not any(i.base in ASYNC_COPY_OPCODES for i in body):
        return 1
    waits = [int(m.group(1), 0) for i in body if i.opcode.startswith("DEPBAR")
             and (m := _DEPBAR.search(",".join(i.operands)))]
    return 1 + min(waits) if waits else 1


def analyse(instructions: list[Instruction], rare: frozenset[int] = frozenset()) -> KernelCode:
    """Main loops and straight-line code of one kernel (see the module docstring). `rare`: addresses of
    the instructions from the launch's declared rare functions (lineinfo.addresses_in)."""
    subs = _subroutines(instructions)
    own = [i for i in instructions if not _inside(i.address, subs)]
    loops: dict[int, int] = {}
    for ins in own:
        target = _branch_target(ins)
        if ins.base == "BRA" and target is not None and target < ins.address:
            loops[target] = max(loops.get(target, target), ins.address)
    spans = sorted((t, b) for t, b in loops.items() if _reaches(own, t, b))
    targets = {t for i in own if i.base == "BRA" and (t := _branch_target(i)) is not None}

    def innermost(address, among):
        enclosing = [(a, b) for a, b in among if a <= address <= b]
        return min(enclosing, key=lambda s: s[1] - s[0]) if enclosing else None

    def encloses(outer, inner):
        return outer != inner and outer[0] <= inner[0] and inner[1] <= outer[1]

    with_loads = {s for i in own if is_global_load(i) and (s := innermost(i.address, spans)) is not None}
    tiles = sorted(s for s in with_loads if not any(encloses(s, t) for t in with_loads))
    rows = sorted({r for t in tiles
                   if (r := innermost(t[0], [s for s in spans if encloses(s, t)])) is not None} - set(tiles))
    main_loops = []
    for a, b in sorted(tiles + rows):
        per_row = (a, b) in rows
        nested = [t for t in tiles if encloses((a, b), t)]
        body = [i for i in own if a <= i.address <= b and not _inside(i.address, nested)]
        common, seldom = (body, []) if per_row else _split_rare(body, targets, rare)
        main_loops.append(Loop(a, b, count(common), count(seldom), _pipelined(common), per_row,
                               _copy_groups(common)))
    straight = [i for i in own if not _inside(i.address, tiles + rows)]
    return KernelCode(tuple(main_loops), count(straight), any(i.base in ASYNC_COPY_OPCODES for i in own), count(own))
