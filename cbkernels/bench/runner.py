"""One benchmark case (loss, N, C, dtype, device): check every provider, then time the ones that agree.

Each provider gets its own copy of the same logits (liger-kernel writes its gradient over its input),
is checked against reference.py in float64 on exactly those values (loss and gradient, relative error),
and only then timed: forward (a training forward: graph recorded, fused strategies write the gradient),
backward alone (the forward run untimed before each), and forward + backward. A provider that raises
or disagrees gets a row saying so and no timings; the run goes on.

On a GPU the forward + backward step is also captured once as a CUDA graph and replayed ("graph_ms": the
device time of the step with no host in between), and the host's time to issue one eager step is
measured ("host_us"); eager time is about max(device time, host time) plus launch gaps. A provider whose
step cannot be captured (it synchronises with the host) says why in "graph_error".

The copy peer: every case times a device copy of the logits into a gradient-sized buffer (one read and
one write of the N x C bytes no forward + backward can avoid), replayed as a CUDA graph on a GPU, in the
same run as the providers; "% copy BW" is the copy's bandwidth over the provider's, measured side by side.
"""
from __future__ import annotations

import statistics
import time
import traceback

import torch

from .. import losses
from . import cpu_memory, timing
from . import providers as P
from .cases import Case, loss_and_grad, make_case, useful_bytes

# Relative tolerance of the check (loss: |a - b| / |b|; gradient: max |a - b| / max |b|). Beyond the
# single rounding of the gradient to the dtype (2^-8 for bf16), peers that compute in half precision
# (F.cross_entropy, torchvision-style) accumulate a few roundings more; 4e-2 admits those, not a bug.
CHECK_RTOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def rel_errors(loss, grad, ref_loss, ref_grad) -> tuple[float, float]:
    loss_err = float((loss.double() - ref_loss).abs() / ref_loss.abs().clamp(min=1e-30))
    grad_err = float((grad.double() - ref_grad).abs().max() / ref_grad.abs().max().clamp(min=1e-30))
    return loss_err, grad_err


def reference_loss_and_grad(case: Case):
    """The loss and gradient of the case's loss reference in float64, on the same logits."""
    x = case.logits.detach().double().requires_grad_(True)
    fn = P.naive(case.with_logits(x))
    loss, grad = loss_and_grad(fn, x)
    return loss.detach(), grad


def copy_peer_ms(case: Case, repeats: int, warmup: int) -> float:
    """Median ms of the copy peer: the logits copied into a buffer of the gradient's shape and dtype (one read
    and one write of the N x C bytes), replayed as a CUDA graph on a GPU, timed as the providers are."""
    x = case.logits
    grad = torch.empty_like(x)
    repeats = max(repeats, 5)

    def copy():
        return grad.copy_(x)

    if x.device.type == "cuda":
        samples = timing.cuda_graph_replay_ms(copy, x.device, repeats, warmup)
    else:
        samples = timing.measure_ms(copy, x.device, repeats, warmup)
    return timing.summarize(samples)[0]


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def run_case(loss: str, n: int, c: int, dtype: torch.dtype, device, repeats: int, warmup: int,
             names=None, exclude=(), memory: bool = True, graph: bool = True) -> list[dict]:
    """Rows for every provider of the registered loss named `loss` (only `names` if given, never those in
    `exclude`). Each row carries the loss's settable hyperparameters as fields of their own ("gamma": 0.5).

    Peak memory is measured here on GPUs; on the CPU call add_cpu_memory(rows) afterwards (one child
    process for many cases, see cpu_memory.py). graph: on a GPU, also time each step replayed as a CUDA
    graph and the host time per eager step (ignored on the CPU, where there is no graph to capture)."""
    device = torch.device(device)
    spec = losses.loss(loss)
    case = make_case(spec, n, c, dtype, device)
    ref_loss, ref_grad = reference_loss_and_grad(case)
    copy_ms = copy_peer_ms(case, repeats, warmup)
    copy_gbps = gbps(2 * case.logits.numel() * case.logits.element_size(), copy_ms)
    nbytes = useful_bytes(n, c, dtype)
    base = {"loss": spec.name, "N": n, "C": c, "dtype": str(dtype).replace("torch.", ""), "device": device.type,
            "useful_bytes": nbytes, "copy_ms": copy_ms, "copy_gbps": copy_gbps,
            "floor_ms": nbytes / (copy_gbps * 1e9) * 1e3, **case.hyperparameters}
    graph = graph and device.type == "cuda"
    rows = []
    for prov in P.providers_for(spec, device):
        if (names is not None and prov.name not in names) or prov.name in exclude:
            continue
        row = dict(base, provider=prov.name, kind=prov.kind, status="ok", ok=False, error=None)
        if prov.unavailable:
            row.update(status="unavailable", error=prov.unavailable)
        else:
            with P.environment(prov.env):
                try:
                    _measure(prov, case, ref_loss, ref_grad, repeats, warmup, memory, graph, row)
                except Exception as exc:  # reported in its row; the other providers still run
                    row.update(status="error", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
                    row["traceback"] = traceback.format_exc(limit=4)
        rows.append(row)
    add_speedups(rows)
    return rows


def _measure(prov, case, ref_loss, ref_grad, repeats, warmup, memory, graph, row):
    device = case.logits.device
    fn = prov.build(case)
    x = case.logits.detach().clone().requires_grad_(True)
    start = time.perf_counter()
    loss, grad = loss_and_grad(fn, x)
    timing.sync(device)
    if prov.compiles:
        row["compile_s"] = time.perf_counter() - start
    row["loss_rel_err"], row["grad_rel_err"] = rel_errors(loss.detach(), grad, ref_loss, ref_grad)
    tol = CHECK_RTOL[case.logits.dtype]
    if not (row["loss_rel_err"] <= tol and row["grad_rel_err"] <= tol):  # NaN fails too
        row.update(status="mismatch", error=f"relative error vs float64 reference: loss {row['loss_rel_err']:.1e}, "
                                            f"grad {row['grad_rel_err']:.1e} (tolerance {tol:g})")
        return
    del loss, grad

    def fwd():
        return fn(x)

    def bwd(loss):
        return torch.autograd.grad(loss, x)

    def fwd_bwd():
        return loss_and_grad(fn, x)

    for key, run, prepare in (("fwd", fwd, None), ("bwd", bwd, fwd), ("fwd_bwd", fwd_bwd, None)):
        samples = timing.measure_ms(run, device, repeats, warmup, prepare)
        row[f"{key}_ms"], row[f"{key}_spread"] = timing.summarize(samples)
    row["ms_median"], row["ms_spread"] = row["fwd_bwd_ms"], row["fwd_bwd_spread"]
    row["gbps"] = gbps(row["useful_bytes"], row["ms_median"])
    row["pct_copy"] = 100.0 * row["gbps"] / row["copy_gbps"]
    if memory and device.type == "cuda":
        row["peak_extra_mib"] = timing.cuda_peak_extra_bytes(fwd_bwd, device) / 2**20
    if graph:
        _measure_graph(fwd_bwd, device, repeats, warmup, row)
    row["ok"] = True


def _measure_graph(fwd_bwd, device, repeats, warmup, row):
    """graph_ms / graph_spread / graph_pct_copy of the step replayed as a CUDA graph (or graph_error), and
    host_us, the median host time of one eager step."""
    row["host_us"] = statistics.median(timing.host_us_per_call(fwd_bwd, device, repeats))
    try:
        samples = timing.cuda_graph_replay_ms(fwd_bwd, device, repeats, warmup)
    except Exception as exc:  # a step that synchronises with the host cannot be captured: say why
        # The first error in the chain names the offending call; capture_end's own error follows from it.
        while exc.__context__ is not None:
            exc = exc.__context__
        row["graph_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        return
    row["graph_ms"], row["graph_spread"] = timing.summarize(samples)
    row["graph_pct_copy"] = 100.0 * gbps(row["useful_bytes"], row["graph_ms"]) / row["copy_gbps"]


def add_cpu_memory(rows: list[dict]) -> None:
    """Fills peak_extra_mib of the timed CPU rows that lack it, all in one child process."""
    todo = [r for r in rows if r["ok"] and r["device"] == "cpu" and r.get("peak_extra_mib") is None]
    specs = [{k: r[k] for k in ("loss", "N", "C", "dtype", "provider")} for r in todo]
    for r, mib in zip(todo, cpu_memory.measure(specs, torch.get_num_threads())):
        r["peak_extra_mib"] = mib


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs[peer] = peer time / this time (eager fwd + bwd), for every peer timed in the same case;
    graph_speedup_vs[peer] the same for the CUDA-graph replays, where both were captured."""
    for time_key, ratio_key in (("ms_median", "speedup_vs"), ("graph_ms", "graph_speedup_vs")):
        peers = {r["provider"]: r[time_key] for r in rows
                 if r["kind"] == "peer" and r["ok"] and r.get(time_key) is not None}
        for r in rows:
            mine = r.get(time_key) if r["ok"] else None
            r[ratio_key] = {p: ms / mine for p, ms in peers.items() if p != r["provider"]} if mine else {}
    for r in rows:
        r["speedup_vs_naive"] = r["speedup_vs"].get(P.NAIVE)
