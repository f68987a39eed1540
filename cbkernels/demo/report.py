"""From per-seed, per-class recalls to the demo's choices, tables and verdicts.

Every choice (gamma, beta, "best" loss) is made on the validation split, averaged over seeds; the test
numbers are only reported. Balanced accuracy = mean per-class recall; tail accuracy = mean recall of the
rarest third of the classes. Plain and class-balanced runs of the same seed share the long-tailed draw
and the initial weights, so their difference is compared seed by seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses import LOSS_TYPES
from .train import LossConfig


@dataclass
class Row:
    config: LossConfig
    balanced: torch.Tensor  # (K,) test balanced accuracy per seed
    tail: torch.Tensor      # (K,) test tail accuracy per seed
    gain: torch.Tensor | None = None  # (K,) balanced accuracy minus the plain loss's, per seed (CB rows only)


def tail_classes(counts) -> list[int]:
    """The rarest third of the classes (at least one)."""
    order = sorted(range(len(counts)), key=lambda c: counts[c])
    return order[: max(1, len(counts) // 3)]


def val_score(recalls) -> float:
    return float(recalls["val"].mean())


def choose(results: dict, loss: str, balanced: bool) -> LossConfig:
    """The configuration of this loss with the best mean validation balanced accuracy."""
    candidates = [c for c in results if c.loss == loss and c.balanced == balanced]
    return max(candidates, key=lambda c: val_score(results[c]))  # max keeps the first of equals (grid order)


def choose_overall(results: dict, balanced: bool) -> LossConfig:
    return max((c for c in results if c.balanced == balanced), key=lambda c: val_score(results[c]))


def make_row(results: dict, config: LossConfig, tail: list[int]) -> Row:
    test = results[config]["test"]
    return Row(config, test.mean(dim=1), test[:, tail].mean(dim=1))


def rows_for(results: dict, counts) -> list[Row]:
    """Plain and class-balanced row for each registered loss, each chosen on validation."""
    tail = tail_classes(counts)
    rows = []
    for loss in LOSS_TYPES:
        plain = make_row(results, choose(results, loss, False), tail)
        cb = make_row(results, choose(results, loss, True), tail)
        cb.gain = cb.balanced - plain.balanced
        rows += [plain, cb]
    return rows


def pct(values: torch.Tensor) -> str:
    """mean +- std over seeds, in percent (std is 0 for a single seed)."""
    std = float(values.std()) if values.numel() > 1 else 0.0
    return f"{100 * float(values.mean()):.1f} ± {100 * std:.1f}"


def markdown_table(rows: list[Row]) -> str:
    lines = ["| loss | weights | chosen on validation | balanced acc. (%) | tail acc. (%) | CB − plain, balanced (pts) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        weights = "class-balanced" if r.config.balanced else "plain"
        gain = "" if r.gain is None else f"{100 * float(r.gain.mean()):+.1f} ({_wins(r.gain)})"
        lines.append(f"| {r.config.loss} | {weights} | {r.config.label()} | {pct(r.balanced)} | {pct(r.tail)} | {gain} |")
    return "\n".join(lines)


def _wins(gain: torch.Tensor) -> str:
    return f"better on {int((gain > 0).sum())}/{gain.numel()} seeds"


def verdict(imbalance_factor, rows: list[Row]) -> str:
    """One line from the numbers: class balancing 'helps' a loss when it is better on every seed,
    'hurts' when worse on every seed, otherwise the effect is not clear at this number of seeds."""
    groups = {"helps": [], "hurts": [], "has no clear effect on": []}
    for r in rows:
        if r.gain is None:
            continue
        if bool((r.gain > 0).all()):
            key = "helps"
        elif bool((r.gain < 0).all()):
            key = "hurts"
        else:
            key = "has no clear effect on"
        groups[key].append(f"{r.config.loss} ({100 * float(r.gain.mean()):+.1f} pts)")
    parts = [f"{key} {', '.join(items)}" for key, items in groups.items() if items]
    seeds = rows[0].balanced.numel()
    return (f"imbalance {imbalance_factor:g}: class balancing {'; '.join(parts)} "
            f"[test balanced accuracy, paired over {seeds} seed{'s' if seeds > 1 else ''}]")


def grid_table(results: dict) -> str:
    """Every configuration trained: validation (used for the choices) and test balanced accuracy."""
    lines = ["| loss | weights | setting | val balanced acc. (%) | test balanced acc. (%) |", "|---|---|---|---|---|"]
    for c, rec in results.items():
        lines.append(f"| {c.loss} | {'class-balanced' if c.balanced else 'plain'} | {c.label()} | "
                     f"{pct(rec['val'].mean(dim=1))} | {pct(rec['test'].mean(dim=1))} |")
    return "\n".join(lines)
