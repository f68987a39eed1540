"""How many programs a persistent launch starts: programs_per_sm times the device's SM count, never more
than there are row blocks; for a kernel that reads its rows twice, also no more than keep the rows in
flight within a share of L2 (program_cap). The device facts (SMs, L2 bytes) are read once per device and
cached: device properties, no sync.

When the rows are too few for the device, a launch splits each row into column chunks handled by different
programs (split_geometry; the kernels' side: split.py): a function of N, C, the dtype (through the bytes of
a row), the tile of the launch and the device's SM count and L2, so that it is static under torch.compile
and CUDA graphs and needs no host sync.

Under TRITON_INTERPRET=1 (CPU tensors) the "device" has INTERPRETER_SMS and INTERPRETER_L2_BYTES: few
programs, so each one walks several rows, the path a GPU takes at large N; and an L2 small enough that the
tests' streamed softmax rows (fp32, C just above 8192: 3 rows fit half of it) meet the re-read cap. There a
launch of one row splits it, and so does the softmax's gradient launch of 2 or 3 rows longer than 16384 fp32
columns (two of them overflow half of that L2: the L2 rule of split_geometry), in batches of one row.
"""
import dataclasses
import functools

import torch

INTERPRETER_SMS = 2
INTERPRETER_L2_BYTES = 256 * 1024
# The share of L2 that the rows in flight of a two-read kernel may fill: the other half is left to
# everything else the GPU caches meanwhile (the gradient's stores, the next rows' first reads), so that
# the second read of a row still finds it (the CUDA launcher's stream_grid keeps the same share).
REREAD_L2_DIVISOR = 2
# A launch splits its rows when it has fewer rows than SMs: some SMs then idle, and every other one holds a
# single program of the launch, which can neither overlap its own phases (loads, reductions, arithmetic) nor
# keep enough bytes in flight. From one row per SM up, every SM works, and a kernel that reads its rows once
# (the sigmoid family) runs near copy bandwidth (docs/roofline.md): what a split adds (the sum of the rows'
# parts, a launch) would cost more than it gains.
SPLIT_BELOW_ROWS_PER_SM = 1
# A kernel that reads its rows twice also splits below this many rows per SM when one program per SM already
# holds more than its share of L2 between the two reads (program_cap keeps its grid then, and the second read
# comes from DRAM): the split's batches keep the rows in L2. Above it, the batches (a launch pair each, every
# L2 / REREAD_L2_DIVISOR of rows) multiply while the unsplit grid fills every SM twice.
SPLIT_REREAD_BELOW_ROWS_PER_SM = 2
# The fewest tiles of a chunk: the work of a unit that does not scale with its columns (the row's targets,
# its split, the edge tile of the first chunk, the partial results' store) is then amortised over at least as
# many elements a thread as the table's held softmax row of 8192 columns gives it (4 tiles of 2048 columns on
# 4 warps: 64; configs.py); a row too short for two such chunks is not split.
MIN_CHUNK_TILES = 4


@functools.cache
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_L2_BYTES
    return torch.cuda.get_device_properties(device).L2_cache_size


def program_cap(programs_per_sm: int, sms: int, l2: int, reread_bytes_per_program: int = 0) -> int:
    """The most programs of a persistent grid: programs_per_sm per SM; when every program holds
    reread_bytes_per_program (> 0) of rows between their two reads, also no more than fit in
    l2 / REREAD_L2_DIVISOR, provided one program per SM fits. When it does not, the second read comes
    from DRAM whatever the grid, and fewer programs would only hold fewer bytes in flight: the grid stays."""
    cap = programs_per_sm * sms
    if reread_bytes_per_program and not rereads_overflow_l2(sms, l2, reread_bytes_per_program):
        cap = min(cap, l2 // REREAD_L2_DIVISOR // reread_bytes_per_program)
    return cap


def rereads_overflow_l2(sms: int, l2: int, reread_bytes_per_program: int) -> bool:
    """Whether even one program per SM, each holding reread_bytes_per_program between two reads of its rows,
    holds more than l2 / REREAD_L2_DIVISOR: the second read then comes from DRAM whatever the grid."""
    return l2 // REREAD_L2_DIVISOR // reread_bytes_per_program < sms


def programs(device: torch.device, blocks, programs_per_sm: int, reread_bytes_per_program: int = 0):
    """min(blocks, program_cap) for this device. blocks is a SymInt under torch.compile (sym_min keeps it
    symbolic); the cap depends on the device and the plan only."""
    cap = program_cap(programs_per_sm, sm_count(device), l2_bytes(device), reread_bytes_per_program)
    if isinstance(blocks, int):
        return blocks if blocks < cap else cap
    return torch.sym_min(blocks, cap)


@dataclasses.dataclass(frozen=True)
class Split:
    """A launch's rows split into column chunks (split.py). chunks: chunks per row; chunk_cols: body columns
    per chunk, a multiple of the launch's tile (so that every tile lies in one chunk and starts on a 16-byte
    boundary); batch_rows: rows per batch, each batch one launch pair of a kernel that reads its rows twice
    (its rows between the two reads within REREAD_L2_DIVISOR of L2), else all rows."""
    chunks: int
    chunk_cols: int
    batch_rows: int


def split_geometry(n, c: int, block: int, programs_per_sm: int, sms: int, l2: int,
                   reread_row_bytes: int = 0) -> Split | None:
    """How a launch of n rows of c columns in tiles of `block` splits its rows, or None (it does not: enough
    rows, or rows shorter than two chunks of MIN_CHUNK_TILES tiles).

    reread_row_bytes (> 0): the bytes of a row that the split reads twice, a launch apart (the softmax's
    statistics, then its gradient), which are also what an unsplit program holds between its two reads. Such
    a launch splits at the L2 rule's rows too (SPLIT_REREAD_BELOW_ROWS_PER_SM), and its rows go in the fewest
    balanced batches whose bytes fit l2 / REREAD_L2_DIVISOR (while one row fits), so that the second read
    comes from L2. A batch's rows split into as many chunks as fill programs_per_sm programs on every SM,
    one chunk a program (floor: no program takes two while another takes one), at least 2, at most what
    MIN_CHUNK_TILES allows; the row's tiles are then spread evenly over that many chunks."""
    few = n < SPLIT_BELOW_ROWS_PER_SM * sms
    if not few and not (reread_row_bytes and n < SPLIT_REREAD_BELOW_ROWS_PER_SM * sms
                        and rereads_overflow_l2(sms, l2, reread_row_bytes)):
        return None
    n = int(n)  # a symbolic N (torch.compile) is specialised here, on the few row counts that split
    tiles = -(-c // block)
    most = tiles // MIN_CHUNK_TILES
    if most < 2:
        return None
    batch = n
    fit = l2 // REREAD_L2_DIVISOR // reread_row_bytes if reread_row_bytes else 0
    if fit:
        batches = -(-n // fit)
        batch = -(-n // batches)
    chunks = min(max(2, programs_per_sm * sms // batch), most)
    chunk_tiles = -(-tiles // chunks)
    return Split(-(-tiles // chunk_tiles), chunk_tiles * block, batch)
