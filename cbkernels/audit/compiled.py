"""What the audit knows about one compiled kernel: its resources, its SASS and the SASS's source lines."""
from __future__ import annotations

import dataclasses

from . import lineinfo, sass
from .sass import Instruction, KernelCode, Resources


@dataclasses.dataclass(frozen=True)
class CompiledKernel:
    symbol: str              # the kernel's name in the cubin
    resources: Resources
    instructions: tuple[Instruction, ...]
    lines: dict              # address -> inlined-call chain of source frames (lineinfo.parse)
    dynamic_shared_bytes: int = 0

    def code(self, rare_functions=()) -> KernelCode:
        """The SASS analysis, with the blocks of `rare_functions` (source function names) set apart. A name
        that no instruction comes from is an error (a typo, or a cubin without a line table)."""
        rare = frozenset()
        for name in rare_functions:
            found = lineinfo.addresses_in(self.lines, (name,))
            if not found:
                raise RuntimeError(f"{self.symbol}: no instruction comes from the declared rare function {name!r}"
                                   + ("" if self.lines else " (the cubin has no line table)"))
            rare |= found
        return sass.analyse(list(self.instructions), rare)
