"""The audit's records (one per backend x kernel x loss x dtype x GPU, plus the loss's forward + backward
sum), the table printed to stdout and the JSON list."""
from __future__ import annotations

import json

LOSS_LEVEL_KERNEL = "forward+backward"


def _fmt(value, digits=1):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


_COLUMNS = (
    ("backend", "backend", None), ("kernel", "kernel", None), ("loss", "loss", None), ("target", "target", None),
    ("dtype", "dtype", None),
    ("gpu", "gpu", None), ("regs", "registers", None), ("CTA/SM", "ctas_per_sm", None),
    ("local B", "local_bytes", None), ("instr/el", "instr_per_elem", 1), ("MUFU/el", "mufu_per_elem", 2),
    ("ld/st B", "access_widths", None), ("bar/loop", "barriers_in_main_loop", None),
    ("overlap", "overlap", None), ("pred. ms", "predicted_ms", 4), ("pred. %copy", "predicted_pct_copy", 1),
    ("gates", "gates", None),
)


def table(records) -> str:
    rows = []
    for r in records:
        cells = dict(r)
        cells["access_widths"] = f"{_fmt(r['load_width_bytes'])}/{_fmt(r['store_width_bytes'])}"
        cells["overlap"] = "yes" if r["overlapped"] else "no"
        cells["gates"] = ("ok" if r["gates_passed"] else "FAIL: " + "; ".join(r["failed_gates"])) + \
            "".join(f"; missed: {m}" for m in r.get("missed_targets", ()))
        rows.append([_fmt(cells.get(key), digits) if digits else _fmt(cells.get(key)) for _, key, digits in _COLUMNS])
    header = [title for title, _, _ in _COLUMNS]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def reread_source(kernel_rows) -> str | None:
    """Where the loss's launches serve their second reads: "L2", "DRAM", "L2+DRAM", or None (no re-read)."""
    served = {"L2" if r["reread_from_l2"] else "DRAM" for r in kernel_rows if r["reread_from_l2"] is not None}
    return "+".join(sorted(served, key=("L2", "DRAM").index)) or None


def sweep_table(records, shapes, gpu: str) -> str:
    """One row per backend x loss x target kind x dtype, one column per shape: the loss's predicted % of copy on
    `gpu`, with where a streamed row's second read is served (a markdown table)."""
    cells: dict[tuple, dict] = {}
    for r in records:
        if r["level"] == "loss" and r["gpu"] == gpu:
            where = f" ({r['reread_from']})" if r.get("reread_from") else ""
            cells.setdefault((r["backend"], r["loss"], r["target"], r["dtype"]), {})[(r["n"], r["c"])] = \
                f"{r['predicted_pct_copy']:.0f}%{where}"
    header = ["backend", "loss", "target", "dtype"] + [f"{n} x {c}" for n, c in shapes]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 4 + "---:|" * len(shapes)]
    for key, row in cells.items():
        lines.append("| " + " | ".join([*key, *(row.get(tuple(s), "-") for s in shapes)]) + " |")
    return "\n".join(lines)


def write_json(records, path) -> None:
    with open(path, "w") as f:
        json.dump(list(records), f, indent=1)
        f.write("\n")
