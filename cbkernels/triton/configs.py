"""Launch configurations of the Triton kernels: a static table, no autotuning at call time.

Autotuning inside forward would benchmark (and synchronise) on the first call of every shape, which
breaks CUDA-graph capture and makes torch.compile traces depend on timing. Instead `pick` reads this
table, keyed by loss family, number of classes C and dtype group; bench/sweep_triton.py measures a
grid of configurations on a GPU and prints replacement rows for TABLE.

Where today's rows come from: NOT from a GPU measurement of these kernels (none has been made yet), but
from the static model of an sm_90 compile on a CPU machine (triton.compile for GPUTarget("cuda", 90, 32),
cuobjdump -res-usage and -sass; H200: 64K registers, 228 KB shared memory, 64 warps per SM), at C = 8142:
- sigmoid family, 4 warps, 3 pipeline stages (cp.async), tiles of 2048 columns in fp32 and 4096 in half:
  16 (fp32) / 32 (half) elements a thread per tile, 64 a thread per row, over which the row's own work
  (setup, edge tile, loss) is amortised. At gamma 0 and 0.5: 92-95 registers (5 CTAs/SM) except half
  focal, 80 (6). Programs per SM: 5; per tile 8 KB per program, about 40 KB in flight per SM with one
  tile ahead (about 24 KB hides the H200's assumed latency).
- softmax, row held on chip (one tile of 8192 columns, 4 warps: 64 elements a thread, over which the
  row's own work, about 450-600 instructions a thread, is amortised; at 16 warps a thread held 16):
  168 (fp32) / 167 (bf16) registers, 3 CTAs per SM, no local memory. Its row loop is pipelined 2 deep:
  the next row (32 KB fp32) is copied to shared memory while this one computes.
- softmax, streaming (longer rows): 2048-column tiles, 4 warps, 3 stages: 116 (fp32) / 80 (bf16)
  registers (compiled at C = 8142), up to 4 / 6 CTAs per SM; the rows start 3 / 4 programs per SM, fewer
  where the rows in flight would not fit half of L2 for their second read (grid.py: program_cap).
- short rows (C <= 512): several rows per tile, as before (their rows were not recompiled for this table).
What a GPU measured before these kernels: bench/results/gpu-h200-2026-11-27 (the previous kernels, triton
3.6). To change rows, run bench/sweep_triton.py on a GPU with a budget that completes the grid and paste
the rows it prints (they say "measured").
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from ..losses import FAMILIES as _REGISTERED


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    block: int       # columns per tile (power of two); the launcher uses min(block, next_pow2(C))
    rows: int        # rows per tile (power of two); 1 gives the per-row branches (ignored rows, target tile)
    num_warps: int
    num_stages: int = 1      # depth of the pipelined loop (the tile loop, or the held softmax's row loop)
    programs_per_sm: int = 2  # persistent grid: programs = programs_per_sm x SMs (at most the row blocks)
    maxnreg: int | None = None  # register cap per thread (a compile option), for 2 CTAs/SM where needed

    def __post_init__(self):
        for name in ("block", "rows"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"LaunchConfig.{name} must be a power of two, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"LaunchConfig.num_warps must be a power of two up to 32, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"LaunchConfig.num_stages must be >= 1, got {self.num_stages}")
        if self.programs_per_sm < 1:
            raise ValueError(f"LaunchConfig.programs_per_sm must be >= 1, got {self.programs_per_sm}")


FAMILIES = tuple(family.name for family in _REGISTERED)
DTYPE_GROUPS = ("fp32", "half")  # half: float16 and bfloat16 (same bytes per element)

# TABLE[family][dtype group]: rows (c_max, config), C ascending; the first row with C <= c_max applies,
# the last row (c_max None) covers everything larger. A family not in TABLE uses DEFAULT_TABLE (below).
# Rows from the static model (module docstring), not measured.
# Small C: several rows per tile, so that a program still moves a useful amount of data per step.
_SMALL_C = [
    (64, LaunchConfig(block=64, rows=32, num_warps=4)),
    (512, LaunchConfig(block=512, rows=4, num_warps=4)),
]
# One pass streaming the row in pipelined 2048-column tiles: the sigmoid family's rows, and the default of
# a family that TABLE does not list (a default that works at any C, not a tuned one).
_STREAMING_FP32 = _SMALL_C + [(None, LaunchConfig(block=2048, rows=1, num_warps=4, num_stages=3, programs_per_sm=5))]
_STREAMING_HALF = _SMALL_C + [(None, LaunchConfig(block=4096, rows=1, num_warps=4, num_stages=3, programs_per_sm=5))]
DEFAULT_TABLE = {"fp32": _STREAMING_FP32, "half": _STREAMING_HALF}
# Softmax: the row held on chip up to 8192 columns, streamed (two reads) above.
_HELD_UP_TO_8192 = [
    (2048, LaunchConfig(block=2048, rows=1, num_warps=4, num_stages=2, programs_per_sm=4)),
    (8192, LaunchConfig(block=8192, rows=1, num_warps=4, num_stages=2, programs_per_sm=3)),
]
_SOFTMAX = {
    "fp32": _SMALL_C + _HELD_UP_TO_8192
    + [(None, LaunchConfig(block=2048, rows=1, num_warps=4, num_stages=3, programs_per_sm=3))],
    "half": _SMALL_C + _HELD_UP_TO_8192
    + [(None, LaunchConfig(block=2048, rows=1, num_warps=4, num_stages=3, programs_per_sm=4))],
}
TABLE = {
    "sigmoid_focal": DEFAULT_TABLE,
    "softmax_ce": _SOFTMAX,
    # Without label smoothing, the softmax focal kernel is the cross entropy's pass: the same rows.
    "softmax_focal": _SOFTMAX,
}
# Dense (N, C) targets, where they need other rows than TABLE's (a family not listed uses TABLE's): a held
# softmax row then holds its targets' coefficients beside its logits, twice the registers, and spills at 8192
# columns on 4 warps (sm_90: 255 registers and 152-456 B of local memory by family and dtype); held up to 2048
# columns, and above streamed in 1024-column tiles, whose per-lane sums (max, rest of the sum, and the cross
# entropy's sum of coefficients and of coefficients times logits) take registers too: 96-128 on 4 warps
# (2048-column tiles: up to 230). Static model at C = 8142 and C = 2000, as the table's other rows.
_DENSE_SOFTMAX = _SMALL_C + [
    (2048, LaunchConfig(block=2048, rows=1, num_warps=4, num_stages=2, programs_per_sm=4)),
    (None, LaunchConfig(block=1024, rows=1, num_warps=4, num_stages=3, programs_per_sm=4)),
]
# The sigmoid family's dense pass loads two arrays a tile: 114-140 registers (sm_90, C = 8142, gamma 0 and
# 0.5), 3-4 CTAs per SM, so 3 programs per SM keep the grid within one wave (5 would leave a second, partial one).
_DENSE_STREAMING = [(c_max, dataclasses.replace(config, programs_per_sm=3) if c_max is None else config)
                    for c_max, config in DEFAULT_TABLE["fp32"]]
_DENSE_STREAMING_HALF = [(c_max, dataclasses.replace(config, programs_per_sm=3) if c_max is None else config)
                         for c_max, config in DEFAULT_TABLE["half"]]
DENSE_TABLE = {
    "sigmoid_focal": {"fp32": _DENSE_STREAMING, "half": _DENSE_STREAMING_HALF},
    "softmax_ce": {"fp32": _DENSE_SOFTMAX, "half": _DENSE_SOFTMAX},
    "softmax_focal": {"fp32": _DENSE_SOFTMAX, "half": _DENSE_SOFTMAX},
}

# Set by `override`: family -> LaunchConfig applied to every C and dtype of that family.
_OVERRIDES: dict[str, LaunchConfig] = {}


def dtype_group(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def pick(family: str, num_classes: int, dtype: torch.dtype, dense: bool = False) -> LaunchConfig:
    """The configuration for one call (an override if one is active, else the table row); dense: the
    target is (N, C) values."""
    if family in _OVERRIDES:
        return _OVERRIDES[family]
    table = DENSE_TABLE.get(family) if dense else None
    for c_max, config in (table or TABLE.get(family, DEFAULT_TABLE))[dtype_group(dtype)]:
        if c_max is None or num_classes <= c_max:
            return config
    raise AssertionError(f"the table of {family!r} has no catch-all row (c_max None)")


def active_override(family: str) -> LaunchConfig | None:
    """The override in force for this family, or None (ops.py keys its cached launch plans on it)."""
    return _OVERRIDES.get(family)


@contextlib.contextmanager
def override(config: LaunchConfig, families=FAMILIES):
    """Use `config` for every call of these families inside the block (the sweep and the tests do).

    Read at call time on the host, so under torch.compile it applies to what is traced inside the block.
    """
    families = (families,) if isinstance(families, str) else tuple(families)
    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    saved = dict(_OVERRIDES)
    _OVERRIDES.update({family: config for family in families})
    try:
        yield config
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)
