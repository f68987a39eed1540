"""Reading SASS (cuobjdump -sass) and resource usage (cuobjdump -res-usage) of compiled kernels.

What the audit needs from a kernel's machine code, found without running it:
- loops: a branch to an earlier (or its own) address closes a loop [target, branch];
- main loops: for every global load of the kernel (outside called subroutines), the innermost loop that
  encloses it. Those are the loops that stream the N x C data; per-row values are loaded outside them. A
  kernel with no such loop (a row held in registers) is straight-line: all of its code runs once per row;
- out-of-line subroutines (the targets of CALL, up to their RET: library slow paths) are excluded from every
  count, as the fast path does not run them;
- per region: instructions (NOPs and the closing self-branch excluded), MUFU ops, barriers (BAR.*),
  CALLs, the byte widths of global loads and stores (LDG.E.128: 16, LDG.E.64: 8, LDG.E: 4, .U16: 2);
- whether a main loop overlaps memory and arithmetic by itself: it contains asynchronous copies
  (LDGSTS: cp.async; UTMALDG / UBLKCP: TMA and bulk copies), or at least half of its load bytes land in
  registers that the loop first reads *before* the load in program order, i.e. in the next iteration
  (the loads of tile i+1 are issued before tile i is computed).

Counts are static: every instruction between a loop's head and its back edge counts once per iteration,
including blocks a data-dependent branch may skip. That makes the per-element count an upper bound of
what the fast path executes; the difference is a few instructions per skipped block.
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
    body: Region    # this loop's instructions, without main loops nested in it
    pipelined: bool


@dataclasses.dataclass(frozen=True)
class KernelCode:
    main_loops: tuple[Loop, ...]
    straight: Region         # everything outside the main loops and the subroutines
    async_copies: bool       # LDGSTS / TMA / bulk copies anywhere in the kernel
    total: Region            # the whole kernel without subroutines

    @property
    def pipelined(self) -> bool:
        """Loads of the next tile in flight while the current one is computed (see the module docstring)."""
        return self.async_copies or (bool(self.main_loops) and all(loop.pipelined for loop in self.main_loops))


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


def analyse(instructions: list[Instruction]) -> KernelCode:
    """Main loops and straight-line code of one kernel (see the module docstring)."""
    subs = _subroutines(instructions)
    own = [i for i in instructions if not _inside(i.address, subs)]
    loops: dict[int, int] = {}
    for ins in own:
        target = _branch_target(ins)
        if ins.base == "BRA" and target is not None and target < ins.address:
            loops[target] = max(loops.get(target, target), ins.address)
    spans = sorted((t, b) for t, b in loops.items() if _reaches(own, t, b))

    def innermost(address):
        enclosing = [(a, b) for a, b in spans if a <= address <= b]
        return min(enclosing, key=lambda s: s[1] - s[0]) if enclosing else None

    main_spans = sorted({s for i in own if is_global_load(i) and (s := innermost(i.address)) is not None})
    main_loops = []
    for a, b in main_spans:
        nested = [(c, d) for c, d in main_spans if (c, d) != (a, b) and a <= c and d <= b]
        body = [i for i in own if a <= i.address <= b and not _inside(i.address, nested)]
        main_loops.append(Loop(a, b, count(body), _pipelined(body)))
    straight = [i for i in own if not _inside(i.address, main_spans)]
    return KernelCode(tuple(main_loops), count(straight), any(i.base in ASYNC_COPY_OPCODES for i in own), count(own))
