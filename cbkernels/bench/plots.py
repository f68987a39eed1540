"""PNG plots of a run: time, % of copy bandwidth and peak extra memory against the varying dimension.

One panel per loss, one colour per provider (the same in every panel and file), one line style per
dtype. The x axis is the number of classes C when the run varies it (the sweep), else the batch N.
"""
from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from .providers import LOSSES  # noqa: E402

PLOTS = (  # file, row field, y label, log y
    ("time.png", "ms_median", "forward + backward, ms (median)", True),
    ("bandwidth.png", "pct_copy", "% of measured copy bandwidth", False),
    ("memory.png", "peak_extra_mib", "peak extra memory, MiB", True),
)
_STYLES = ("-", "--", ":", "-.")


def _minor_label(value, _pos) -> str:
    # label the 2s and 5s of each decade: enough to read values off, never crowded
    mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return f"{value:g}" if round(mantissa, 6) in (2.0, 5.0) else ""


def write_all(out: str, rows: list[dict], meta: dict) -> list[str]:
    rows = [r for r in rows if r["ok"]]
    if not rows:
        return []
    xkey = "C" if len({r["C"] for r in rows}) > 1 else "N"
    providers = sorted({r["provider"] for r in rows}, key=lambda p: (not p.startswith("cbkernels"), p))
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(providers)}
    dtypes = sorted({r["dtype"] for r in rows})
    losses = [l for l in LOSSES if any(r["loss"] == l for r in rows)]
    hw = meta.get("gpu") or meta.get("cpu", "")
    written = []
    for fname, field, ylabel, logy in PLOTS:
        if not any(r.get(field) is not None for r in rows):
            continue
        fig, axes = plt.subplots(1, len(losses), figsize=(5.0 * len(losses), 5.2), squeeze=False)
        for ax, loss in zip(axes[0], losses):
            for p in providers:
                for d_i, dtype in enumerate(dtypes):
                    pts = sorted((r[xkey], r[field]) for r in rows if r["loss"] == loss and r["provider"] == p
                                 and r["dtype"] == dtype and r.get(field) is not None)
                    if pts:
                        ax.plot(*zip(*pts), _STYLES[d_i % len(_STYLES)], marker="o", ms=4, color=colors[p],
                                label=f"{p} {dtype}" if len(dtypes) > 1 else p)
            ax.set_xscale("log", base=2)
            xs = sorted({r[xkey] for r in rows})
            ax.set_xticks(xs, [str(x) for x in xs], rotation=45, fontsize=8)
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            if logy:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(ticker.FuncFormatter(_minor_label))
                ax.tick_params(axis="y", which="minor", labelsize=7)
            ax.set_title(loss + (" (gamma 0.5)" if loss == "focal" else ""))
            ax.set_xlabel("number of classes C" if xkey == "C" else "batch N (rows)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="major", alpha=0.3)
        handles, labels = {}, []
        for ax in axes[0]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        ncol = min(len(handles), 4)
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
        fig.suptitle(f"{ylabel} -- {hw}, torch {meta['torch']}, {meta['date_utc'][:10]}", fontsize=10)
        legend_rows = -(-len(handles) // ncol)
        fig.tight_layout(rect=(0, 0.035 * legend_rows + 0.02, 1, 0.95))
        path = os.path.join(out, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
