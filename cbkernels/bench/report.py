"""Outputs of a benchmark run: the Markdown table, JSON (rows + provenance) and CSV."""
from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import platform
import sys

import torch

from .. import losses


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _case_key(r):
    return (r["device"], r["dtype"], r["N"], r["C"], r["loss"])


def hyperparameter_label(row: dict) -> str:
    """The settable hyperparameters of the row's loss that the row records, as "gamma 0.5" ("" for none)."""
    spec = losses.loss(row["loss"])
    return ", ".join(f"{h.name} {row[h.name]:g}" for h in spec.hyperparameters if row.get(h.name) is not None)


def _has_graph(rows) -> bool:
    """Whether the run replayed steps as CUDA graphs (a GPU run), captured or not."""
    return any("host_us" in r for r in rows)


def _ratio(ratios: dict, peer: str) -> str:
    return f"{ratios[peer]:.2f}x" if peer in ratios else "-"


def format_markdown(rows: list[dict]) -> str:
    """One table per case (loss, shape, dtype, device): every provider, its times and its ratios.

    Times are forward + backward unless the column says otherwise, medians with their spread (the
    interquartile range; max - min under 4 repeats) in brackets; "vs X" is X's time over this row's
    time (> 1: this row is faster), one column per peer timed in the case. On a GPU, "graph" is the step
    replayed as a CUDA graph (device time, no host in between), "host us" the host's time to issue one
    eager step, and each "vs X" cell reads "eager / graph".
    """
    cases: dict = {}
    for r in rows:
        cases.setdefault(_case_key(r), []).append(r)
    out = []
    for (device, dtype, n, c, loss), group in cases.items():
        head = group[0]
        graph = _has_graph(group)
        peers = [r["provider"] for r in group if r["kind"] == "peer" and r["ok"]]
        hyper = hyperparameter_label(head)
        copy = f"copy peer {head['copy_ms']:.3f} ms, " if head.get("copy_ms") is not None else ""
        out.append(f"### {loss}{', ' + hyper if hyper else ''}: N={n}, C={c}, {dtype}, {device} -- {copy}copy "
                   f"bandwidth {head['copy_gbps']:.1f} GB/s, floor {head['floor_ms']:.3f} ms\n")
        graph_head = "graph ms (spread) | graph % copy | host us | " if graph else ""
        ratio_head = " (eager / graph)" if graph else ""
        out.append("| provider | fwd ms | bwd ms | fwd+bwd ms (spread) | GB/s | % copy BW | " + graph_head
                   + "peak extra MiB | " + "".join(f"vs {p}{ratio_head} | " for p in peers) + "check |")
        out.append("|---|" + "---:|" * (6 + 3 * graph + len(peers)) + "---|")
        out.extend(_markdown_row(r, peers, graph) for r in group)
        out.append("")
    return "\n".join(out)


def _markdown_row(r: dict, peers: list[str], graph: bool) -> str:
    if not r["ok"]:
        return f"| {r['provider']} |" + " - |" * (6 + 3 * graph + len(peers)) + f" {r['status']}: {r['error']} |"
    check = f"ok (loss {r['loss_rel_err']:.0e}, grad {r['grad_rel_err']:.0e})"
    if r.get("compile_s") is not None:
        check += f"; compile {r['compile_s']:.1f} s"
    if r.get("graph_error"):
        check += f"; not capturable: {r['graph_error']}"
    graph_cells = ""
    if graph:
        graph_ms = "-" if r.get("graph_ms") is None else f"{r['graph_ms']:.3f} ({r['graph_spread']:.3f})"
        graph_cells = f"{graph_ms} | {_f(r.get('graph_pct_copy'), '.0f')}% | {_f(r.get('host_us'), '.0f')} | "
    if graph:
        ratios = "".join(f"{_ratio(r['speedup_vs'], p)} / {_ratio(r.get('graph_speedup_vs', {}), p)} | "
                         for p in peers)
    else:
        ratios = "".join(f"{_ratio(r['speedup_vs'], p)} | " for p in peers)
    return (f"| {r['provider']} | {r['fwd_ms']:.3f} | {r['bwd_ms']:.3f} | {r['ms_median']:.3f} "
            f"({r['ms_spread']:.3f}) | {r['gbps']:.1f} | {r['pct_copy']:.0f}% | {graph_cells}"
            f"{_f(r.get('peak_extra_mib'), '.1f')} | {ratios}{check} |")


# In the summary the plain-PyTorch peer of each kernel family (providers.py) shares one column.
_SUMMARY_COLUMN = {"F.cross_entropy": "torch", "torchvision-style": "torch"}
# The fields a summary reads per timing mode: time and % of copy bandwidth.
_MODES = {"eager": ("ms_median", "pct_copy"), "graph": ("graph_ms", "graph_pct_copy")}


def summary_markdown(rows: list[dict], mode: str = "eager") -> str:
    """One line per case: the fastest cbkernels provider against every peer (forward + backward ms).

    mode "eager": eager times (host overhead included where the host is the slower side); "graph": the
    steps replayed as CUDA graphs (device time), with the eager time and host time per eager call of the
    same provider beside ("" when the run has no graph times). A peer whose step could not be captured
    has no graph time and no ratio there.
    "torch" is the plain-PyTorch peer of the loss's kernel family: F.cross_entropy * alpha_y for the softmax
    family, the torchvision-style loss for the sigmoid / focal family.
    """
    time_key, pct_key = _MODES[mode]
    timed = [r for r in rows if r["ok"] and r.get(time_key) is not None]
    if mode == "graph" and not timed:
        return ""
    cases: dict = {}
    for r in timed:
        cases.setdefault(_case_key(r), []).append(r)
    cols = list(dict.fromkeys(_SUMMARY_COLUMN.get(r["provider"], r["provider"]) for r in timed if r["kind"] == "peer"))
    extra_head, extra_n = ("eager ms | host us | ", 2) if mode == "graph" else ("", 0)
    out = ["| loss | N x C | dtype | fastest cbkernels | ms | % copy BW | " + extra_head + "peak MiB | "
           + "".join(f"{p} ms | " for p in cols) + " | ".join(f"vs {p}" for p in cols) + " |",
           "|---|---|---|---|" + "---:|" * (3 + extra_n + 2 * len(cols))]
    for (_device, dtype, n, c, loss), group in cases.items():
        ours = [r for r in group if r["kind"] == "cbkernels"]
        if not ours:
            continue
        best = min(ours, key=lambda r: r[time_key])
        times = {_SUMMARY_COLUMN.get(r["provider"], r["provider"]): r[time_key] for r in group if r["kind"] == "peer"}
        ratios = {col: ms / best[time_key] for col, ms in times.items()}
        extra = f"{best['ms_median']:.3f} | {_f(best.get('host_us'), '.0f')} | " if mode == "graph" else ""
        out.append((f"| {loss} | {n} x {c} | {dtype} | {best['provider']} | {best[time_key]:.3f} | "
                    f"{best[pct_key]:.0f}% | {extra}{_f(best.get('peak_extra_mib'), '.1f')} | "
                    + "".join(f"{_f(times.get(p), '.3f')} | " for p in cols)
                    + "".join(f"{_ratio(ratios, p)} | " for p in cols)).rstrip())
    return "\n".join(out) + "\n"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: str, argv: list[str]) -> dict:
    import cbkernels

    meta = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python -m cbkernels bench " + " ".join(argv),
        "device": device, "cpu": _cpu_model(), "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
        "cbkernels": cbkernels.__version__, "liger_kernel": _version("liger-kernel"),
        "platform": platform.platform(), "argv0": sys.argv[0],
    }
    if torch.device(device).type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
        meta["cuda"] = torch.version.cuda
    return meta


def provenance_markdown(meta: dict) -> str:
    hw = meta.get("gpu") or f"{meta['cpu']} ({meta['cpu_threads']} threads)"
    return (f"Device: {hw}. torch {meta['torch']}, triton {meta['triton']}, cbkernels {meta['cbkernels']}, "
            f"Python {meta['python']}. {meta['date_utc']}. Command: `{meta['command']}`\n")


def write_json(path, meta: dict, rows: list[dict], targets: list[dict] | None = None) -> None:
    data = {"meta": meta, "rows": rows}
    if targets is not None:
        data["targets"] = targets
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1, default=str)


# Every hyperparameter of the registry has a column (empty where the row's loss does not set it).
HYPERPARAMETER_FIELDS = tuple(dict.fromkeys(h.name for family in losses.FAMILIES for h in family.hyperparameters))
CSV_FIELDS = ("loss", "provider", "kind", "device", "dtype", "N", "C", *HYPERPARAMETER_FIELDS, "status", "ok",
              "fwd_ms", "fwd_spread", "bwd_ms", "bwd_spread", "ms_median", "ms_spread", "useful_bytes", "gbps",
              "copy_ms", "copy_gbps", "pct_copy", "floor_ms", "graph_ms", "graph_spread", "graph_pct_copy", "host_us",
              "graph_error", "peak_extra_mib", "speedup_vs_naive", "compile_s", "loss_rel_err", "grad_rel_err", "error")


def write_csv(path, meta: dict, rows: list[dict]) -> None:
    """One row per (case, provider), each carrying the run's provenance columns."""
    peers = sorted({p for r in rows for p in r.get("speedup_vs", {})} - {"naive"})
    graph_peers = sorted({p for r in rows for p in r.get("graph_speedup_vs", {})})
    hw = meta.get("gpu") or meta.get("cpu")
    prov = {"device_name": hw, "torch": meta["torch"], "triton": meta["triton"], "cbkernels": meta["cbkernels"],
            "date_utc": meta["date_utc"], "command": meta["command"]}
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(list(CSV_FIELDS) + [f"speedup_vs_{p}" for p in peers]
                        + [f"graph_speedup_vs_{p}" for p in graph_peers] + list(prov))
        for r in rows:
            sv, gv = r.get("speedup_vs", {}), r.get("graph_speedup_vs", {})
            writer.writerow([r.get(k) for k in CSV_FIELDS] + [sv.get(p) for p in peers]
                            + [gv.get(p) for p in graph_peers] + list(prov.values()))
