"""The demo's figure: per-class test accuracy against training-set size (plain vs class-balanced, one
panel per imbalance factor), and the class-balanced weight 1/E_n against n for the paper's betas."""
from __future__ import annotations

import math

import torch

from ..weights import effective_number
from .report import choose_overall
from .train import BETAS


def _accuracy_panel(ax, results, counts, imbalance_factor):
    for balanced, color, marker in ((False, "tab:gray", "o"), (True, "tab:red", "s")):
        config = choose_overall(results, balanced)
        test = results[config]["test"] * 100  # (K, C)
        mean = test.mean(dim=0)
        std = test.std(dim=0) if test.shape[0] > 1 else torch.zeros_like(mean)
        name = "class-balanced" if balanced else "plain"
        details = config.label()
        ax.errorbar(counts, mean, yerr=std, color=color, marker=marker, capsize=3, linewidth=1.5,
                    label=f"{name}: {config.loss}" + ("" if details == "-" else f" ({details})"))
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log scale; blue numbers: the digit)")
    ax.set_ylabel("test accuracy of the class (%)")
    ax.set_title(f"imbalance factor {imbalance_factor:g}: per-class accuracy")
    ax.set_ylim(0, 105)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center right", fontsize=9)
    for c, n in enumerate(counts):  # each point is one digit class
        ax.annotate(str(c), (n, 2), ha="center", fontsize=8, color="tab:blue")


def _weights_panel(ax, max_n, digits_max_n):
    n = torch.logspace(0, math.log10(max_n), 200, dtype=torch.float64)
    ax.axvspan(1, digits_max_n, color="tab:blue", alpha=0.08, label="class sizes in this demo")
    ax.plot(n, torch.ones_like(n), color="black", linestyle=":", label="β = 0 (no re-weighting)")
    for beta in BETAS:
        ax.plot(n, 1.0 / effective_number(n, beta), linewidth=2, label=f"β = {beta:g}")
    ax.plot(n, 1.0 / n, color="black", linestyle="--", label="1/n (β → 1, inverse frequency)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("samples in the class, n (log scale)")
    ax.set_ylabel("class-balanced weight 1/E_n (before normalising)")
    ax.set_title("class-balanced weight vs class size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left", fontsize=9)


def save_figure(per_factor: dict, path) -> None:
    """per_factor: {imbalance factor: (results, counts)}; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(per_factor) + 1
    cols = min(panels, 2)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.8 * rows), squeeze=False)
    flat = axes.flatten()
    for ax, (factor, (results, counts)) in zip(flat, per_factor.items()):
        _accuracy_panel(ax, results, counts, factor)
    digits_max_n = max(max(counts) for _, counts in per_factor.values())
    _weights_panel(flat[len(per_factor)], max_n=10_000, digits_max_n=digits_max_n)
    for ax in flat[panels:]:
        ax.axis("off")
    fig.suptitle("cbkernels demo: long-tailed digits (class 0 = head, 9 = tail); mean ± std over seeds, "
                 "losses chosen on validation", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
