"""PNG plots of a run: time, % of copy bandwidth and peak extra memory per provider.

One panel per loss. A run over many class counts (the sweep) gets lines against C, one colour per
provider (the same in every panel and file), one line style per dtype. A run over a few shapes (inat,
quick) gets horizontal bars: one group per provider, one bar per shape and dtype.
"""
from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from ..losses import LOSS_TYPES  # noqa: E402
from .report import hyperparameter_label  # noqa: E402

PLOTS = (  # file, row field, axis label, log scale; a plot whose field no row has (a CPU run: graph_*) is skipped
    ("time.png", "ms_median", "forward + backward, ms (median)", True),
    ("bandwidth.png", "pct_copy", "% of measured copy bandwidth", False),
    ("time_graph.png", "graph_ms", "forward + backward replayed as a CUDA graph, ms (median)", True),
    ("bandwidth_graph.png", "graph_pct_copy", "CUDA graph replay: % of measured copy bandwidth", False),
    ("memory.png", "peak_extra_mib", "peak extra memory, MiB", True),
)
_STYLES = ("-", "--", ":", "-.")
_MIN_LINE_POINTS = 3  # fewer distinct class counts than this: bars read better than lines


def _minor_label(value, _pos) -> str:
    # label the 2s and 5s of each decade: enough to read values off, never crowded
    mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return f"{value:g}" if round(mantissa, 6) in (2.0, 5.0) else ""


def _log_axis(axis) -> None:
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.FuncFormatter(_minor_label))
    axis.set_tick_params(which="minor", labelsize=7)


def _lines(ax, rows, field, label, log, providers, colors, dtypes):
    for p in providers:
        for d_i, dtype in enumerate(dtypes):
            pts = sorted((r["C"], r[field]) for r in rows if r["provider"] == p and r["dtype"] == dtype)
            if pts:
                ax.plot(*zip(*pts), _STYLES[d_i % len(_STYLES)], marker="o", ms=4, color=colors[p],
                        label=f"{p} {dtype}" if len(dtypes) > 1 else p)
    xs = sorted({r["C"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs], rotation=45, fontsize=8)
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    if log:
        ax.set_yscale("log")
        _log_axis(ax.yaxis)
    ax.set_xlabel("number of classes C (N x C fixed)")
    ax.set_ylabel(label)


def _bars(ax, rows, field, label, log, providers, series):
    height = 0.8 / len(series)
    for s_i, (key, color) in enumerate(series.items()):
        vals = {r["provider"]: r[field] for r in rows if (r["N"], r["C"], r["dtype"]) == key}
        ys = [i + (s_i - (len(series) - 1) / 2) * height for i, p in enumerate(providers) if p in vals]
        ax.barh(ys, [vals[p] for p in providers if p in vals], height=height, color=color,
                label=f"N={key[0]}, C={key[1]}, {key[2]}")
    ax.set_yticks(range(len(providers)), providers, fontsize=8)
    ax.invert_yaxis()  # cbkernels first, at the top
    if log:
        ax.set_xscale("log")
        _log_axis(ax.xaxis)
        ax.set_xlim(left=min(r[field] for r in rows) / 2)  # every bar keeps a visible length
    ax.set_xlabel(label)


def write_all(out: str, rows: list[dict], meta: dict) -> list[str]:
    rows = [r for r in rows if r["ok"]]
    if not rows:
        return []
    as_lines = len({r["C"] for r in rows}) >= _MIN_LINE_POINTS
    providers = sorted({r["provider"] for r in rows}, key=lambda p: (not p.startswith("cbkernels"), p))
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(providers)}
    dtypes = sorted({r["dtype"] for r in rows})
    shapes = sorted({(r["N"], r["C"], r["dtype"]) for r in rows})
    series = {s: plt.cm.tab10(i % 10) for i, s in enumerate(shapes)}
    losses = [name for name in LOSS_TYPES if any(r["loss"] == name for r in rows)]
    hw = meta.get("gpu") or meta.get("cpu", "")
    written = []
    for fname, field, label, log in PLOTS:
        if not any(r.get(field) is not None for r in rows):
            continue
        fig, axes = plt.subplots(1, len(losses), figsize=(5.0 * len(losses), 5.2), squeeze=False)
        for ax, loss in zip(axes[0], losses):
            sub = [r for r in rows if r["loss"] == loss and r.get(field) is not None]
            if as_lines:
                _lines(ax, sub, field, label, log, providers, colors, dtypes)
            else:
                _bars(ax, sub, field, label, log, [p for p in providers if any(r["provider"] == p for r in sub)],
                      series)
            hyper = hyperparameter_label(sub[0]) if sub else ""
            ax.set_title(loss + (f" ({hyper})" if hyper else ""))
            ax.grid(True, which="major", alpha=0.3)
        handles = {}
        for ax in axes[0]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        ncol = min(len(handles), 4)
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
        fig.suptitle(f"{label} -- {hw}, torch {meta['torch']}, {meta['date_utc'][:10]}", fontsize=10)
        legend_rows = -(-len(handles) // ncol)
        fig.tight_layout(rect=(0, 0.035 * legend_rows + 0.02, 1, 0.95))
        path = os.path.join(out, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
