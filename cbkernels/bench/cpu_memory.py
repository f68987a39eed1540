"""Peak extra memory of CPU providers, measured in one child process after the timings.

The measure is the kernel's high-water mark of resident memory (VmHWM), reset before each run by
writing "5" to /proc/self/clear_refs (Linux >= 4.0). It sees every byte any code touched, the C++
extension's and compiled code's included, unlike the profiler's memory events (nested, net amounts per
op). It equals the bytes allocated only if freed buffers leave the process at once: glibc would keep
them (per-thread arenas, its dynamic mmap threshold) and hand them out again unseen, so the child pins
the mmap threshold to 128 KiB (mallopt), making every tensor buffer above that a mapping of its own,
unmapped when freed. That setting makes each large allocation fault its pages in afresh, which would
tax allocation-heavy providers in the timings: hence a separate process, started once per run, with
the timing process left on glibc's defaults. (On GPUs torch.cuda.max_memory_allocated does this job.)

    python -m cbkernels.bench.cpu_memory  < specs.json  > peaks.json
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import torch

from .. import losses
from . import presets
from . import providers as P
from .cases import loss_and_grad, make_case

_M_MMAP_THRESHOLD = -3


def measure(specs: list[dict], threads: int) -> list[float | None]:
    """Peak extra MiB for each {"loss", "N", "C", "dtype", "provider"} (None where it could not be read)."""
    if not specs:
        return []
    child = subprocess.run([sys.executable, "-m", "cbkernels.bench.cpu_memory", str(threads)],
                           input=json.dumps(specs), capture_output=True, text=True, env=dict(os.environ))
    if child.returncode != 0:
        print(f"CPU memory probe failed: {child.stderr.strip().splitlines()[-1:]}", flush=True)
        return [None] * len(specs)
    return json.loads(child.stdout.strip().splitlines()[-1])


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def _peak_extra_mib(run) -> float:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _status_bytes("VmRSS:")
    result = run()
    peak = _status_bytes("VmHWM:")
    del result
    return max(peak - base, 0) / 2**20


def _child(specs: list[dict]) -> list[float | None]:
    ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    out = []
    for s in specs:
        try:
            spec = losses.loss(s["loss"])
            case = make_case(spec, s["N"], s["C"], presets.DTYPES[s["dtype"]], "cpu")
            prov = next(p for p in P.providers_for(spec, "cpu") if p.name == s["provider"])
            with P.environment(prov.env):
                fn = prov.build(case)
                x = case.logits.detach().clone().requires_grad_(True)
                loss_and_grad(fn, x)  # first call: lazy initialisation (and compilation) stay out of the peak
                out.append(_peak_extra_mib(lambda: loss_and_grad(fn, x)))
        except Exception as exc:  # one provider's failure costs only its own number
            print(f"{s}: {type(exc).__name__}: {exc}", file=sys.stderr)
            out.append(None)
    return out


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[1]))
    print(json.dumps(_child(json.loads(sys.stdin.read()))))
