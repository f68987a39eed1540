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

    @property
    def bytes_in_flight_needed_per_sm(self) -> float:
        """Little's law: per-SM bandwidth x latency."""
        return self.copy_gbps * 1e9 / self.sms * self.latency_us * 1e-6


H200 = Gpu("H200", sms=132, clock_ghz=1.98, copy_gbps=4236.0, issue_per_sm_clk=128, mufu_per_sm_clk=16,
           latency_us=0.75)
H100 = Gpu("H100", sms=132, clock_ghz=1.98, copy_gbps=2956.0, issue_per_sm_clk=128, mufu_per_sm_clk=16,
           latency_us=0.75)
GPUS = (H100, H200)


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
    dependent_round_trips: int      # DRAM round trips one after the other in a CTA's life


@dataclasses.dataclass(frozen=True)
class Prediction:
    memory_ms: float        # bytes / copy bandwidth, raised when too few bytes are in flight
    issue_ms: float
    mufu_ms: float
    latency_ms: float       # waves x dependent round trips x latency
    in_flight_factor: float # >= 1: how much too few bytes in flight stretch the memory time
    tail_factor: float      # >= 1: the last, partial wave of CTAs
    overlapped: bool
    ms: float


def predict(gpu: Gpu, k: KernelLoad) -> Prediction:
    memory = k.nc_bytes / (gpu.copy_gbps * 1e9) * 1e3
    in_flight = k.ctas_per_sm * k.threads_per_cta * k.load_bytes_in_flight_per_thread
    factor = 1.0
    if k.nc_bytes > 0:
        factor = max(1.0, gpu.bytes_in_flight_needed_per_sm / in_flight) if in_flight > 0 else math.inf
    memory *= factor
    per_ms = gpu.sms * gpu.clock_ghz * 1e6  # SM-clocks per millisecond
    issue = k.elements * k.instr_per_elem / (per_ms * gpu.issue_per_sm_clk)
    mufu = k.elements * k.mufu_per_elem / (per_ms * gpu.mufu_per_sm_clk)
    resident = max(1, k.ctas_per_sm) * gpu.sms
    waves = k.ctas / resident
    tail = math.ceil(waves) / waves if waves > 0 else 1.0
    overlapped = k.pipelined and k.ctas_per_sm >= 2
    compute = max(issue, mufu)
    throughput = (max(memory, compute) if overlapped else memory + compute) * tail
    latency = math.ceil(waves) * k.dependent_round_trips * gpu.latency_us * 1e-3
    return Prediction(memory, issue, mufu, latency, factor, tail, overlapped, max(throughput, latency))


def copy_floor_ms(gpu: Gpu, elements: int, element_bytes: int) -> float:
    """One read of the logits and one write of the gradient at copy bandwidth: the time % of copy refers to."""
    return 2 * elements * element_bytes / (gpu.copy_gbps * 1e9) * 1e3
