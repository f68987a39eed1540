"""`python -m cbkernels demo`: class-balanced losses on long-tailed real digits, then a speed table.

Trains a small MLP on scikit-learn's bundled digits (no download) made long-tailed with the paper's
profile, with every registered loss (cbkernels/losses.py: softmax, sigmoid and focal), plain and
class-balanced (beta and gamma chosen on a validation split of the training data), over several seeds;
prints a table per imbalance factor with a verdict computed from the numbers, saves a figure, and times
loss + gradient at iNaturalist scale.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from .. import _backends
from . import data, report
from .figure import save_figure
from .speed import INAT_SHAPE, speed_markdown
from .train import TrainSettings, search_space, train_and_evaluate

# Presets: --quick keeps CI under a minute, the default under three minutes on two CPU cores.
PRESETS = {
    "quick": {"seeds": 2, "steps": 100, "speed_repeats": 3, "compiled": False, "peers": False},
    "default": {"seeds": 5, "steps": 200, "speed_repeats": 3, "compiled": True, "peers": False},
    "full": {"seeds": 10, "steps": 400, "speed_repeats": 10, "compiled": True, "peers": True},
}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m cbkernels demo", description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer seeds and steps (CI, under a minute)")
    mode.add_argument("--full", action="store_true", help="more seeds and steps; prints the whole beta/gamma grid")
    p.add_argument("--imbalance", type=float, nargs="+", default=[10, 50, 100], metavar="F",
                   help="imbalance factors n_max / n_min (default: 10 50 100)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (overrides the preset)")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (default: demo-out)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu or cuda")
    p.add_argument("--no-speed", action="store_true", help="skip the speed table")
    args = p.parse_args(argv)
    if any(f < 1 for f in args.imbalance):
        p.error("imbalance factors must be >= 1")
    if args.seeds is not None and args.seeds < 1:
        p.error("--seeds must be >= 1")
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return device


def run_training(splits, factors, seeds, settings, device):
    """{factor: (results {LossConfig: {"val", "test": (K, C) recall}}, counts)}, with a progress bar."""
    from tqdm import tqdm

    configs = search_space()
    evals = {"val": splits.val, "test": splits.test}
    out = {}
    with tqdm(total=len(factors) * len(configs), desc="training", unit="config") as bar:
        for factor in factors:
            counts = data.train_counts(splits, factor)
            trains = [data.long_tailed_train(splits, factor, s) for s in seeds]
            results = {}
            for config in configs:
                bar.set_postfix_str(f"imbalance {factor:g}, {config.loss} {config.label()}")
                results[config] = train_and_evaluate(config, trains, seeds, counts, evals, splits.num_classes,
                                                     settings, device)
                bar.update()
            out[factor] = (results, counts)
    return out


def summarise(per_factor, out: Path, show_grid: bool):
    """Markdown tables with their verdicts, and the numbers behind them; every grid goes to out/grid-if*.md."""
    sections, summary = [], {}
    for factor, (results, counts) in per_factor.items():
        rows = report.rows_for(results, counts)
        line = report.verdict(factor, rows)
        title = f"### Imbalance factor {factor:g} (training images per class: {counts})"
        sections.append(f"{title}\n\n{report.markdown_table(rows)}\n\n{line}")
        if show_grid:
            sections.append(f"All configurations, imbalance factor {factor:g}:\n\n{report.grid_table(results)}")
        (out / f"grid-if{factor:g}.md").write_text(report.grid_table(results) + "\n")
        summary[f"{factor:g}"] = {
            "counts": counts,
            "rows": [{"loss": r.config.loss, "balanced": r.config.balanced,
                      "hyperparameters": dict(r.config.hyperparameters), "beta": r.config.beta,
                      "test_balanced_acc": r.balanced.tolist(), "test_tail_acc": r.tail.tolist()} for r in rows],
            "verdict": line,
        }
    return "\n\n".join(sections), summary


# What the demo needs beyond cbkernels itself: the "demo" extra of pyproject.toml.
DEMO_MODULES = ("sklearn", "matplotlib", "tqdm")


def missing_demo_modules() -> list[str]:
    return [name for name in DEMO_MODULES if importlib.util.find_spec(name) is None]


def main(argv=None) -> int:
    missing = missing_demo_modules()
    if missing:
        print(f"the demo needs {', '.join(missing)}: pip install \"cbkernels[demo]\"", file=sys.stderr)
        return 2
    args = parse_args([] if argv is None else argv)
    preset = PRESETS["quick" if args.quick else "full" if args.full else "default"]
    seeds = list(range(args.seeds or preset["seeds"]))
    device = pick_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    splits = data.split_digits(*data.load_digit_arrays())
    settings = TrainSettings(steps=preset["steps"])
    backend = _backends.resolve(settings.backend, torch.empty(1, 1, device=device))
    print(f"cbkernels demo on {device} (loss backend: {backend.name}): digits, {len(splits.test.y)} balanced "
          f"test / {len(splits.val.y)} validation images, {len(seeds)} seeds, {settings.steps} full-batch steps per run")
    # The MLP's matmuls are tiny: one thread avoids threading overhead (and is kind to a shared machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per_factor = run_training(splits, args.imbalance, seeds, settings, device)
    finally:
        torch.set_num_threads(threads)
    train_seconds = time.perf_counter() - start

    tables, summary = summarise(per_factor, args.out, show_grid=args.full)
    print("\n" + tables + "\n")
    figure = args.out / "demo-digits.png"
    save_figure(per_factor, figure)

    speed = None
    if not args.no_speed:
        speed_start = time.perf_counter()
        print(f"Speed: loss + gradient, logits {INAT_SHAPE[0]} x {INAT_SHAPE[1]} float32 on {device} "
              f"({torch.get_num_threads()} threads){'' if preset['compiled'] else '; torch.compile left out (--quick)'}")
        speed = speed_markdown(device, preset["speed_repeats"], preset["compiled"], preset["peers"])
        print(speed + f"\n(speed table: {time.perf_counter() - speed_start:.0f} s)\n")

    wall = time.perf_counter() - start
    (args.out / "results.md").write_text(tables + ("\n\n## Speed\n\n" + speed if speed else "") + "\n")
    (args.out / "results.json").write_text(json.dumps({
        "device": str(device), "backend": backend.name, "seeds": seeds, "steps": settings.steps,
        "imbalance": summary, "train_seconds": train_seconds, "wall_seconds": wall}, indent=1) + "\n")
    print(f"training {train_seconds:.0f} s, total {wall:.0f} s")
    print(f"figure: {figure.resolve()}")
    return 0
