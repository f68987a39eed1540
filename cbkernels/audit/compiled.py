"""What the audit knows about one compiled kernel: its resources and the analysis of its SASS."""
from __future__ import annotations

import dataclasses

from .sass import KernelCode, Resources


@dataclasses.dataclass(frozen=True)
class CompiledKernel:
    symbol: str              # the kernel's name in the cubin
    resources: Resources
    code: KernelCode
    dynamic_shared_bytes: int = 0
