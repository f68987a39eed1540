"""Which source function each SASS instruction comes from, through the cubin's line table.

Triton always, and nvcc with -lineinfo, write a line table into the cubin that maps every instruction to
the source line it was compiled from, with the chain of inlined calls. `nvdisasm --print-line-info-inline`
prints it as comments before the instruction where the position changes, one per level, innermost first:

    //## File "a.py", line 27 inlined at "b.py", line 49
    //## File "b.py", line 49 inlined at "b.py", line 139
    //## File "b.py", line 139
            /*1090*/                   MUFU.RCP R20, R20 ;

i.e. the instruction comes from line 27 of a.py, in a function called from line 49 of b.py, in a function
called from line 139 of b.py (the kernel). An instruction belongs to a named function when one frame of
its chain lies inside that function's definition: Python functions by their `def` (ast), C++ functions by
the braces of their definition (a scanner that skips comments and string literals; a call or a
declaration, which is followed by `;` or by an operator, is not a definition).
"""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

Frame = tuple[str, int]  # (source file as the line table names it, line)

_SECTION = re.compile(r"^\s*\.text\.(\S+):\s*$")
_FRAME = re.compile(r'^\s*//##\s*File\s+"([^"]+)",\s*line\s+(\d+)')
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/")


def parse(text: str) -> dict[str, dict[int, tuple[Frame, ...]]]:
    """nvdisasm -gi output -> {function name (mangled): {instruction address: frames, innermost first}}."""
    out: dict[str, dict[int, tuple[Frame, ...]]] = {}
    current = None
    pending: list[Frame] = []
    chain: tuple[Frame, ...] = ()
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            current, pending, chain = out.setdefault(m.group(1), {}), [], ()
            continue
        m = _FRAME.match(line)
        if m:
            pending.append((m.group(1), int(m.group(2))))
            continue
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            if pending:
                chain, pending = tuple(pending), []
            current[int(m.group(1), 16)] = chain
    return out


def _blank(match: re.Match) -> str:
    """A comment or string literal replaced by spaces, its newlines kept (line numbers stay right)."""
    return re.sub(r"[^\n]", " ", match.group(0))


_CPP_NOISE = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.S)


def _cpp_spans(text: str, name: str) -> list[tuple[int, int]]:
    code = _CPP_NOISE.sub(_blank, text)
    spans = []
    for m in re.finditer(rf"\b{re.escape(name)}\s*\(", code):
        depth, k = 0, m.end() - 1
        while k < len(code):  # the matching parenthesis of the parameter list
            depth += {"(": 1, ")": -1}.get(code[k], 0)
            if depth == 0:
                break
            k += 1
        rest = re.match(r"(?:\s|const\b|noexcept\b|override\b|final\b|->\s*[\w:<>,\s*&]+?(?=\{))*\{", code[k + 1:])
        if rest is None:
            continue  # a call or a declaration
        start = k + 1 + rest.end() - 1
        depth, j = 0, start
        while j < len(code):
            depth += {"{": 1, "}": -1}.get(code[j], 0)
            if depth == 0:
                break
            j += 1
        spans.append((code.count("\n", 0, m.start()) + 1, code.count("\n", 0, j) + 1))
    return spans


def _python_spans(text: str, name: str) -> list[tuple[int, int]]:
    return [(node.lineno, node.end_lineno) for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name]


@functools.lru_cache(maxsize=None)
def function_spans(path: str, name: str) -> tuple[tuple[int, int], ...]:
    """(first line, last line) of each definition of function `name` in the source file (none if the file
    cannot be read: a library header the line table names but this machine does not have)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return ()
    spans = _python_spans(text, name) if path.endswith(".py") else _cpp_spans(text, name)
    return tuple(spans)


def addresses_in(chains: dict[int, tuple[Frame, ...]], functions) -> frozenset[int]:
    """Addresses of the instructions that come from one of `functions` (names), inlined or not."""
    functions = tuple(functions)
    if not functions:
        return frozenset()

    def inside(frame: Frame) -> bool:
        path, line = frame
        return any(a <= line <= b for name in functions for a, b in function_spans(path, name))

    return frozenset(address for address, chain in chains.items() if any(inside(f) for f in chain))
