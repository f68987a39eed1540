"""The GPU speed targets, judged on the rows of one benchmark run.

A target judges device time: the forward + backward step replayed as a CUDA graph (runner.py), where
no host work sits between the kernels. The eager figure of the fastest cbkernels provider in eager mode
and its host time per call are reported beside it, never mixed in. A ratio to a peer is taken between
the two graph times; where the peer's step could not be captured, against the peer's eager time (the row
says so). Rows without graph times (a CPU run, or --no-graph) judge nothing: these are GPU targets.

  copy bandwidth    a softmax-family loss at (8192, 8142): the fastest step reaches >= 85% of the copy
                    peer's bandwidth (runner.copy_peer_ms: the same bytes, timed in the same case).
  vs compiled       every case: >= 2x torch.compile of the naive loss.
  vs naive          every case: >= 8x the naive loss under plain autograd.
  vs F.cross_entropy  every softmax-family case: >= 1.5x F.cross_entropy(reduction="none") * alpha_y.
  no cliff          a class sweep (>= 3 values of C, every C <= 262144) of one loss and dtype: the fastest
                    step at every C reaches >= 75% of copy bandwidth.
"""
from __future__ import annotations

from .. import losses
from . import providers as P

COPY_SHAPE, COPY_GOAL_PCT = (8192, 8142), 85.0
RATIO_TARGETS = (("vs compiled", P.COMPILED, 2.0), ("vs naive", P.NAIVE, 8.0),
                 ("vs F.cross_entropy", "F.cross_entropy", 1.5))
CLIFF_MAX_C, CLIFF_GOAL_PCT, CLIFF_MIN_POINTS = 262144, 75.0, 3


def _fastest(rows, key):
    ours = [r for r in rows if r["kind"] == "cbkernels" and r["ok"] and r.get(key) is not None]
    return min(ours, key=lambda r: r[key]) if ours else None


def _group(rows, key):
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return groups


def _result(target, case, best, eager_best, value, eager_value, goal, unit, note=""):
    return {"target": target, "case": case, "provider": best["provider"], "value": value, "unit": unit,
            "goal": goal, "met": value >= goal, "eager_provider": eager_best["provider"], "eager_value": eager_value,
            "host_us": eager_best.get("host_us"), "note": note}


def evaluate(rows: list[dict]) -> list[dict]:
    """One record per (target, case) the run's rows can judge: the measured value (graph), the eager
    value beside it, the goal and whether it is met."""
    results = []
    for (loss, n, c, dtype), group in _group(rows, lambda r: (r["loss"], r["N"], r["C"], r["dtype"])).items():
        best, eager_best = _fastest(group, "graph_ms"), _fastest(group, "ms_median")
        if best is None:
            continue
        case = f"{loss} {n} x {c} {dtype}"
        if losses.loss(loss).family is losses.SOFTMAX_CE and (n, c) == COPY_SHAPE:
            results.append(_result("copy bandwidth", case, best, eager_best, best["graph_pct_copy"],
                                   eager_best["pct_copy"], COPY_GOAL_PCT, "% of copy"))
        for target, peer_name, goal in RATIO_TARGETS:
            peer = next((r for r in group if r["provider"] == peer_name and r["ok"]), None)
            if peer is None:
                continue
            captured = peer.get("graph_ms") is not None
            value = (peer["graph_ms"] if captured else peer["ms_median"]) / best["graph_ms"]
            note = "" if captured else f"{peer_name} not capturable, its eager time used ({peer.get('graph_error')})"
            results.append(_result(target, case, best, eager_best, value, peer["ms_median"] / eager_best["ms_median"],
                                   goal, "x", note))
    sweeps = _group(rows, lambda r: (r["loss"], r["dtype"]))
    for (loss, dtype), group in sweeps.items():
        per_c = _group([r for r in group if r["C"] <= CLIFF_MAX_C], lambda r: r["C"])
        bests = {c: (_fastest(g, "graph_ms"), _fastest(g, "ms_median")) for c, g in per_c.items()}
        bests = {c: b for c, b in bests.items() if b[0] is not None}
        if len(bests) < CLIFF_MIN_POINTS:
            continue
        worst_c = min(bests, key=lambda c: bests[c][0]["graph_pct_copy"])
        eager_worst = min(bests.values(), key=lambda b: b[1]["pct_copy"])[1]
        best, _ = bests[worst_c]
        results.append(_result("no cliff", f"{loss} {dtype}, C = {min(bests)} .. {max(bests)}: lowest at C = {worst_c}",
                               best, eager_worst, best["graph_pct_copy"], eager_worst["pct_copy"], CLIFF_GOAL_PCT,
                               "% of copy"))
    return results


def _value(value, unit):
    return f"{value:.0f}%" if unit == "% of copy" else f"{value:.2f}x"


def markdown(results: list[dict]) -> str:
    """The targets as a table: graph value and goal, met or not, the eager value and host time beside."""
    if not results:
        return ""
    out = ["| target | case | fastest cbkernels (graph) | graph | goal | met | eager (fastest eager) | host us/call |",
           "|---|---|---|---:|---:|---|---:|---:|"]
    for t in results:
        host = "-" if t["host_us"] is None else f"{t['host_us']:.0f}"
        note = f" ({t['note']})" if t["note"] else ""
        out.append(f"| {t['target']} | {t['case']} | {t['provider']} | {_value(t['value'], t['unit'])} | "
                   f">= {_value(t['goal'], t['unit'])} | {'yes' if t['met'] else 'NO'}{note} | "
                   f"{_value(t['eager_value'], t['unit'])} ({t['eager_provider']}) | {host} |")
    met = sum(t["met"] for t in results)
    out.append(f"\n{met} of {len(results)} met.")
    return "\n".join(out) + "\n"
