"""One benchmark case (loss, N, C, dtype, device): check every provider, then time the ones that agree.

Each provider gets its own copy of the same logits (liger-kernel writes its gradient over its input),
is checked against reference.py in float64 on exactly those values (loss and gradient, relative error),
and only then timed: forward (a training forward: graph recorded, fused strategies write the gradient),
backward alone (the forward run untimed before each), and forward + backward. A provider that raises
or disagrees gets a row saying so and no timings; the run goes on.
"""
from __future__ import annotations

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


def copy_bandwidth_gbps(case: Case, repeats: int, warmup: int) -> float:
    """The device's copy bandwidth here: a clone of a logits-sized tensor (read + write), in GB/s."""
    x = case.logits
    device = x.device
    med, _ = timing.summarize(timing.measure_ms(lambda: x.clone(), device, max(repeats, 5), warmup))
    return 2 * x.numel() * x.element_size() / (med * 1e-3) / 1e9


def run_case(loss: str, n: int, c: int, dtype: torch.dtype, device, repeats: int, warmup: int,
             names=None, exclude=(), memory: bool = True) -> list[dict]:
    """Rows for every provider of the registered loss named `loss` (only `names` if given, never those in
    `exclude`). Each row carries the loss's settable hyperparameters as fields of their own ("gamma": 0.5).

    Peak memory is measured here on GPUs; on the CPU call add_cpu_memory(rows) afterwards (one child
    process for many cases, see cpu_memory.py)."""
    device = torch.device(device)
    spec = losses.loss(loss)
    case = make_case(spec, n, c, dtype, device)
    ref_loss, ref_grad = reference_loss_and_grad(case)
    copy_gbps = copy_bandwidth_gbps(case, repeats, warmup)
    nbytes = useful_bytes(n, c, dtype)
    base = {"loss": spec.name, "N": n, "C": c, "dtype": str(dtype).replace("torch.", ""), "device": device.type,
            "useful_bytes": nbytes, "copy_gbps": copy_gbps, "floor_ms": nbytes / (copy_gbps * 1e9) * 1e3,
            **case.hyperparameters}
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
                    _measure(prov, case, ref_loss, ref_grad, repeats, warmup, memory, row)
                except Exception as exc:  # reported in its row; the other providers still run
                    row.update(status="error", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
                    row["traceback"] = traceback.format_exc(limit=4)
        rows.append(row)
    add_speedups(rows)
    return rows


def _measure(prov, case, ref_loss, ref_grad, repeats, warmup, memory, row):
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
    row["gbps"] = row["useful_bytes"] / (row["ms_median"] * 1e-3) / 1e9
    row["pct_copy"] = 100.0 * row["gbps"] / row["copy_gbps"]
    if memory and device.type == "cuda":
        row["peak_extra_mib"] = timing.cuda_peak_extra_bytes(fwd_bwd, device) / 2**20
    row["ok"] = True


def add_cpu_memory(rows: list[dict]) -> None:
    """Fills peak_extra_mib of the timed CPU rows that lack it, all in one child process."""
    todo = [r for r in rows if r["ok"] and r["device"] == "cpu" and r.get("peak_extra_mib") is None]
    specs = [{k: r[k] for k in ("loss", "N", "C", "dtype", "provider")} for r in todo]
    for r, mib in zip(todo, cpu_memory.measure(specs, torch.get_num_threads())):
        r["peak_extra_mib"] = mib


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs[peer] = peer time / this time (fwd + bwd), for every peer timed in the same case."""
    peers = {r["provider"]: r["ms_median"] for r in rows if r["kind"] == "peer" and r["ok"]}
    for r in rows:
        r["speedup_vs"] = ({p: ms / r["ms_median"] for p, ms in peers.items() if p != r["provider"]}
                           if r["ok"] else {})
        r["speedup_vs_naive"] = r["speedup_vs"].get(P.NAIVE)
