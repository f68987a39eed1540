"""The static roofline model of docs/roofline.md: machines, and the predicted time of a kernel launch.

Every number of GPUS is either measured by this project or a stated assumption (docs/roofline.md gives the
source of each). Predictions are labelled "predicted" wherever they are printed.
"""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    clock_ghz: float           # SM clock assumed while the kernels run
    copy_gbps: float           # device-to-device copy bandwidth (read + write bytes per second)
    issue_per_sm_clk: int      # thread-instructions issued per SM per clock (4 schedulers x 32 lanes)
    mufu_per_sm_clk: int       # MUFU results (ex2, lg2, rcp, rsq, sqrt) per SM per clock
    latency_us: float          # DRAM round trip under load (an assumption: sets the bytes in flight needed)
    l2_bytes: int              # L2 capacity
    l2_gbps: float             # L2 bandwidth for hits and misses together (an assumption)

    @property
    def schedulers(self) -> int:
        """Warp schedulers per SM, each issuing one warp instruction (32 thread-instructions) per clock."""
        return self.issue_per_sm_clk // 32

    @property
    def bytes_in_flight_needed_per_sm(self) -> float:
        """Little's law: per-SM bandwidth x latency."""
        return self.copy_gbps * 1e9 / self.sms * self.latency_us * 1e-6


H200 = Gpu("H200", sms=132, clock_ghz=1.98, copy_gbps=4236.0, issue_per_sm_clk=128, mufu_per_sm_clk=16,
           latency_us=0.75, l2_bytes=50 * 2**20, l2_gbps=7000.0)
H100 = Gpu("H100", sms=132, clock_ghz=1.98, copy_gbps=2956.0, issue_per_sm_clk=128, mufu_per_sm_clk=16,
           latency_us=0.75, l2_bytes=50 * 2**20, l2_gbps=7000.0)
GPUS = (H100, H200)

# A re-read hits L2 when the rows in flight, times the bytes of a row, fit in this fraction of L2. Between
# the first and the second read of an element, every row in flight reads one row's worth (the rest of its
# first pass, the start of its second) and writes up to one row of gradient, which L2 also allocates: the
# re-read's reuse distance is at most twice rows in flight x row bytes (docs/roofline.md, "Re-reads").
L2_FIT_FRACTION = 0.5

# A launch that follows another launch of the same op call (Launch.follows_launch) starts only when that one
# has finished: the GPU's front end then starts the next kernel of the stream (LAUNCH_GAP_US, an assumption:
# about a microsecond between back-to-back kernels), and the new kernel's first loads take a DRAM round trip
# before its bandwidth flows, which its throughput bound does not charge (its latency path does: a launch
# bound by its latency pays the gap only). docs/roofline.md, "Launch boundaries".
LAUNCH_GAP_US = 1.0


@dataclasses.dataclass(frozen=True)
class KernelLoad:
    """What the model needs to know about one launch (built by metrics.py from the SASS and the variant)."""
    elements: int                   # N x C
    nc_bytes: float                 # N x C bytes moved by this launch
    instr_per_elem: float           # thread-instructions per element (0: no per-element work in the scenario)
    mufu_per_elem: float
    ctas: int
    ctas_per_sm: int
    threads_per_cta: int
    load_bytes_in_flight_per_thread: float
    pipelined: bool
    dependent_round_trips: int      # DRAM round trips one after the other in a thread's life
    thread_instructions: float      # instructions one thread issues in its life (its rows' share)
    reread_bytes: float = 0.0       # of nc_bytes: a second read, in this launch, of data it read earlier
    reread_row_bytes: float = 0.0   # bytes of one row that are read twice
    rows_per_cta: float = 1         # rows a CTA holds in flight at once (1 / S: a row split into S chunks)
    follows_launch: bool = False    # starts when the op's previous launch has finished (LAUNCH_GAP_US)

    def reread_footprint(self, gpu: "Gpu") -> float:
        """Rows in flight (the CTAs resident at once, times their rows) x the bytes of a row read twice."""
        resident = min(self.ctas, max(1, self.ctas_per_sm) * gpu.sms)
        return resident * self.rows_per_cta * self.reread_row_bytes

    def reread_hits_l2(self, gpu: "Gpu") -> bool:
        return self.reread_bytes > 0 and self.reread_footprint(gpu) <= L2_FIT_FRACTION * gpu.l2_bytes


@dataclasses.dataclass(frozen=True)
class Prediction:
    memory_ms: float        # DRAM bytes / copy bandwidth, raised when too few bytes are in flight
    l2_ms: float            # every byte through L2 (hits and misses) / L2 bandwidth
    reread_from_l2: bool    # the launch's re-read is served by L2 (False also when it has none)
    issue_ms: float
    mufu_ms: float
    latency_ms: float       # the critical path of a CTA (round trips, its bytes, its instructions) per wave
    in_flight_factor: float # >= 1: how much too few bytes in flight stretch the memory time
    tail_factor: float      # >= 1: the last, partial wave of CTAs
    overlapped: bool        # the next tile's loads in flight while a warp computes (pipelined, >= 2 CTAs/SM)
    ms: float               # max(throughput, latency) + boundary_ms
    boundary_ms: float = 0.0  # of ms: the boundary with the op's previous launch (follows_launch), else 0


def predict(gpu: Gpu, k: KernelLoad) -> Prediction:
    """The larger of the SM's throughput bound and a warp's critical path (docs/roofline.md, "The model")."""
    resident = max(1, k.ctas_per_sm) * gpu.sms
    waves = k.ctas / resident
    # A grid of at least one wave: its last, partial wave costs a full one. A smaller grid (a persistent
    # grid of a few CTAs per SM) runs in one go with the CTAs it has on each SM, on the SMs it reaches.
    if waves >= 1:
        tail, per_sm = math.ceil(waves) / waves, max(1, k.ctas_per_sm)
    else:
        tail, per_sm = gpu.sms / min(gpu.sms, max(1, k.ctas)), math.ceil(k.ctas / gpu.sms)
    # A re-read that fits in L2 leaves DRAM; every byte, hit or miss, still passes through L2.
    from_l2 = k.reread_hits_l2(gpu)
    dram_bytes = k.nc_bytes - (k.reread_bytes if from_l2 else 0.0)
    memory = dram_bytes / (gpu.copy_gbps * 1e9) * 1e3
    l2 = k.nc_bytes / (gpu.l2_gbps * 1e9) * 1e3
    in_flight = per_sm * k.threads_per_cta * k.load_bytes_in_flight_per_thread
    factor = 1.0
    if dram_bytes > 0:
        factor = max(1.0, gpu.bytes_in_flight_needed_per_sm / in_flight) if in_flight > 0 else math.inf
    memory *= factor
    per_ms = gpu.sms * gpu.clock_ghz * 1e6  # SM-clocks per millisecond
    issue = k.elements * k.instr_per_elem / (per_ms * gpu.issue_per_sm_clk)
    mufu = k.elements * k.mufu_per_elem / (per_ms * gpu.mufu_per_sm_clk)
    throughput = max(memory, l2, issue, mufu) * tail
    # One CTA's own life, whatever else runs on its SM: its DRAM round trips one after the other, its bytes
    # at no more than the SM's share of the bandwidth, and its instructions at no more than one per clock
    # per warp and four warps per clock (the SM's schedulers) for all of its warps. They add up unless the
    # next tile's loads are in flight while it computes.
    trips_ms = k.dependent_round_trips * gpu.latency_us * 1e-3
    transfer_ms = (dram_bytes / (gpu.copy_gbps * 1e9) + (k.nc_bytes - dram_bytes) / (gpu.l2_gbps * 1e9)) \
        * gpu.sms / max(1, k.ctas) * 1e3
    warps = math.ceil(k.threads_per_cta / 32)
    compute_ms = k.thread_instructions * max(1.0, warps / gpu.schedulers) / (gpu.clock_ghz * 1e6)
    overlapped = k.pipelined and per_sm >= 2
    path = max(trips_ms, transfer_ms, compute_ms) if overlapped else trips_ms + transfer_ms + compute_ms
    latency = math.ceil(waves) * path
    ms = max(throughput, latency)
    if k.follows_launch:
        ms = max(throughput + gpu.latency_us * 1e-3, latency) + LAUNCH_GAP_US * 1e-3
    return Prediction(memory, l2, from_l2, issue, mufu, latency, factor, tail, overlapped, ms,
                      ms - max(throughput, latency))


def copy_floor_ms(gpu: Gpu, elements: int, element_bytes: int, arrays: int = 2) -> float:
    """One read of the logits and one write of the gradient (arrays = 2), and one read of a dense target
    (arrays = 3), at copy bandwidth: the time % of copy refers to."""
    return arrays * elements * element_bytes / (gpu.copy_gbps * 1e9) * 1e3
