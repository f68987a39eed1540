"""The "overhead" preset: host time per forward + backward call at tiny shapes, where Python, argument
checks, dispatch and autograd bookkeeping cost more than the arithmetic.

    python -m cbkernels bench --preset overhead --device cpu --out DIR

Providers, for each registered loss and each reduction ("mean", "sum"):
  F.cross_entropy(weight=w)       the peer: F.cross_entropy(logits, target, weight=w, reduction=...), the
                                  cheapest weighted call plain PyTorch offers (its "mean" divides by
                                  sum(w[y]), not by the row count, and it is the same call for every loss:
                                  a yardstick of host cost, not the same objective).
  <function>[backend,strategy]    the loss's public function (e.g. cb_focal_loss) with backend=<backend>,
                                  for every kernel backend native to the device, under CBKERNELS_BACKWARD=
                                  <strategy> for both backward strategies.
  ClassBalancedLoss[backend,strategy]  the same through the nn.Module.
  <function>[reference]           the public function with backend="reference" (plain autograd).

Method: one thread (torch.set_num_threads(1), restored afterwards). Each provider is first checked (the
cbkernels ones against the loss's float64 reference at the same reduction) and warmed up. Then `rounds`
interleaved rounds: each round times every provider of the case once, always in the same order, as
`inner` back-to-back calls of loss = fn(x); torch.autograd.grad(loss, x) between two perf_counter reads.
Reported: the median over rounds of the time per call in microseconds (spread: interquartile range over
rounds), and the median over rounds of (this provider's time / the peer's time of the same reduction in
the same round); interleaving makes a slow spell of a shared machine hit every provider alike.

On CUDA the same loop measures host wall-clock of the Python calls: the kernel launches are enqueued
inside the timed loop, and torch.cuda.synchronize runs only before and after each provider's block,
outside the timer. At these shapes the GPU finishes each kernel faster than the host issues the next, so
the figure is the host cost per step (Python, checks, dispatch, launches), not GPU time; if the GPU were
the slower side the launch queue would fill and the loop would wait for it.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from .. import _backends, functional, losses
from ..modules import ClassBalancedLoss
from . import providers as P
from .cases import IGNORE_INDEX, loss_and_grad, make_inputs
from .timing import summarize

PEER = "F.cross_entropy(weight=w)"
REDUCTIONS = ("mean", "sum")
SHAPES = ((8, 16), (64, 1000))
ROUNDS = 15
INNER = 200
CHECK_RTOL = 1e-4


def _providers(spec: losses.Loss, device: torch.device, reduction: str, target, weight):
    """(name, kind, env, fn) in the fixed timing order: the peer, then cbkernels."""
    hyper = spec.defaults()
    fn_name = spec.function

    def public(backend):
        fn = getattr(functional, fn_name)
        return lambda x: fn(x, target, weight, reduction=reduction, backend=backend, **hyper)

    def module(backend):
        m = ClassBalancedLoss(torch.ones(weight.shape[0]), loss_type=spec.name, reduction=reduction,
                              backend=backend, ignore_index=IGNORE_INDEX, **hyper).to(device)
        m.class_weight.copy_(weight)  # the case's weights, so every provider computes the same values
        return lambda x: m(x, target)

    out = [(PEER, "peer", {}, lambda x: F.cross_entropy(x, target, weight=weight, reduction=reduction))]
    for backend in _backends.native_kernel_backends(device):
        for strategy in _backends.STRATEGIES:
            env = {"CBKERNELS_BACKWARD": strategy}
            out.append((f"{fn_name}[{backend},{strategy}]", "cbkernels", env, public(backend)))
            out.append((f"ClassBalancedLoss[{backend},{strategy}]", "cbkernels", env, module(backend)))
    out.append((f"{fn_name}[reference]", "cbkernels", {}, public("reference")))
    return out


def _check(spec, fn, x, target, weight, reduction) -> str | None:
    """None if fn's loss and gradient match the float64 reference, else what differs."""
    loss, grad = loss_and_grad(fn, x)
    xd = x.detach().double().requires_grad_(True)
    ref_loss, ref_grad = loss_and_grad(
        lambda z: spec.reference(z, target, weight.double(), reduction, IGNORE_INDEX, **spec.defaults()), xd)
    loss, ref_loss = loss.detach().double(), ref_loss.detach()
    loss_err = float((loss - ref_loss).abs() / ref_loss.abs().clamp(min=1e-30))
    grad_err = float((grad.double() - ref_grad).abs().max() / ref_grad.abs().max().clamp(min=1e-30))
    if not (loss_err <= CHECK_RTOL and grad_err <= CHECK_RTOL):
        return f"relative error vs float64 reference: loss {loss_err:.1e}, grad {grad_err:.1e}"
    return None


def _time_block(fn, x, inner: int, device: torch.device) -> float:
    """Seconds per call of inner back-to-back forward + backward calls (CUDA: host time, see the docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(inner):
        loss = fn(x)
        torch.autograd.grad(loss, x)
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return elapsed / inner


def run_case(spec: losses.Loss, n: int, c: int, device, rounds: int = ROUNDS, inner: int = INNER) -> list[dict]:
    """One row per (reduction, provider) of this loss at logits (n, c) float32 on `device`."""
    device = torch.device(device)
    inputs = make_inputs(n, c, torch.float32, device)
    target, weight = inputs.target, inputs.weight
    x = inputs.logits.detach().clone().requires_grad_(True)
    base = {"loss": spec.name, "N": n, "C": c, "dtype": "float32", "device": device.type, **spec.defaults()}
    entries = []  # (row, env, fn) of the providers that passed their check, in timing order
    rows = []
    for reduction in REDUCTIONS:
        for name, kind, env, fn in _providers(spec, device, reduction, target, weight):
            row = dict(base, provider=name, kind=kind, reduction=reduction, status="ok", ok=False, error=None)
            rows.append(row)
            with P.environment(env):
                try:
                    error = None if kind == "peer" else _check(spec, fn, x, target, weight, reduction)
                    if error:
                        row.update(status="mismatch", error=error)
                        continue
                    _time_block(fn, x, max(3, min(inner, 20)), device)  # warm-up
                except Exception as exc:  # reported in its row; the others still run
                    row.update(status="error", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
                    continue
            entries.append((row, env, fn, []))
    for _ in range(rounds):
        for row, env, fn, samples in entries:
            with P.environment(env):
                samples.append(_time_block(fn, x, inner, device) * 1e6)
    peer_samples = {row["reduction"]: samples for row, _env, _fn, samples in entries if row["kind"] == "peer"}
    for row, _env, _fn, samples in entries:
        row["us_median"], row["us_spread"] = summarize(samples)
        row["us_samples"] = samples
        peer = peer_samples.get(row["reduction"])
        row["ratio_to_peer"] = (statistics.median(s / p for s, p in zip(samples, peer)) if peer else None)
        row["ok"] = True
    return rows


def measure(loss_types=losses.LOSS_TYPES, shapes=SHAPES, device="cpu", rounds: int = ROUNDS, inner: int = INNER,
            threads: int = 1, echo=None) -> list[dict]:
    """Rows of every case; torch.set_num_threads(threads) while it runs, the caller's count restored after.
    echo(markdown) is called after each case (e.g. print)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = []
        for loss in loss_types:
            for n, c in shapes:
                case_rows = run_case(losses.loss(loss), n, c, device, rounds, inner)
                rows += case_rows
                if echo:
                    echo(format_markdown(case_rows))
        return rows
    finally:
        torch.set_num_threads(saved)


def format_markdown(rows: list[dict]) -> str:
    """One table per (loss, shape): every provider at both reductions, microseconds per forward + backward
    call (median over rounds, interquartile range in brackets) and its time over the peer's."""
    cases: dict = {}
    for r in rows:
        cases.setdefault((r["loss"], r["N"], r["C"], r["dtype"], r["device"]), []).append(r)
    out = []
    for (loss, n, c, dtype, device), group in cases.items():
        out.append(f"### {loss}: N={n}, C={c}, {dtype}, {device}\n")
        out.append(f"| reduction | provider | us per call (spread) | time / {PEER} |")
        out.append("|---|---|---:|---:|")
        for r in group:
            if not r["ok"]:
                out.append(f"| {r['reduction']} | {r['provider']} | {r['status']}: {r['error']} | - |")
                continue
            out.append(f"| {r['reduction']} | {r['provider']} | {r['us_median']:.1f} ({r['us_spread']:.1f}) "
                       f"| {_ratio(r)} |")
        out.append("")
    return "\n".join(out)


def summary_markdown(rows: list[dict]) -> str:
    """One line per (loss, shape, reduction): the peer's time and the cheapest public-function and module
    providers' time over it."""
    out = [f"| loss | N x C | reduction | {PEER} us | fastest function (x peer) | fastest module (x peer) "
           "| reference (x peer) |", "|---|---|---|---:|---|---|---|"]
    cases: dict = {}
    for r in rows:
        if r["ok"]:
            cases.setdefault((r["loss"], r["N"], r["C"], r["reduction"]), []).append(r)
    for (loss, n, c, reduction), group in cases.items():
        peer = next((r for r in group if r["kind"] == "peer"), None)

        def best(pick):
            cands = [r for r in group if r["kind"] == "cbkernels" and pick(r["provider"])]
            if not cands:
                return "-"
            b = min(cands, key=lambda r: r["us_median"])
            return f"{b['provider']} {b['us_median']:.1f} us ({_ratio(b)})"

        def is_module(p):
            return p.startswith("ClassBalancedLoss")

        def is_reference(p):
            return p.endswith("[reference]")

        peer_us = "-" if peer is None else f"{peer['us_median']:.1f}"
        out.append(f"| {loss} | {n} x {c} | {reduction} | {peer_us} "
                   f"| {best(lambda p: not is_module(p) and not is_reference(p))} | {best(is_module)} "
                   f"| {best(is_reference)} |")
    return "\n".join(out) + "\n"


def _ratio(r: dict) -> str:
    return "-" if r["ratio_to_peer"] is None else f"{r['ratio_to_peer']:.2f}x"


def git_commit() -> str | None:
    """The checkout's commit (with -dirty for uncommitted changes), or None outside a git checkout."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], capture_output=True,
                              text=True, timeout=10, cwd=os.path.dirname(__file__), check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def table_markdown(meta: dict, rows: list[dict]) -> str:
    from .report import provenance_markdown

    return (provenance_markdown(meta)
            + f"\nCommit {meta.get('commit') or 'unknown'}. {meta['rounds']} interleaved rounds of "
              f"{meta['inner']} calls each, {meta['measure_threads']} thread; times are host microseconds per "
              f"forward + backward call (median over rounds), ratios are this provider's time over {PEER}'s of "
              "the same reduction in the same round (median over rounds; > 1: more host time than the peer).\n"
            + "\n## Summary\n\n" + summary_markdown(rows) + "\n## Every provider\n\n" + format_markdown(rows))
