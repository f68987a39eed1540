"""The demo: quick mode runs and reports every row; the long-tail profile holds on the digits; the data
need no network; choices are made on validation and verdicts follow the numbers."""
import json
import math
import re
import socket

import pytest
import torch

from cbkernels import available_backends, losses
from cbkernels.bench import providers
from cbkernels.demo import data, main, report, speed
from cbkernels.demo.train import BETAS, GRID, LossConfig, search_space
from cbkernels.weights import long_tail_counts

FACTORS = (10, 50, 100)


@pytest.fixture(scope="module")
def splits():
    return data.split_digits(*data.load_digit_arrays())


def test_quick_demo_reports_every_row(tmp_path, capsys):
    # Speed table skipped here: test_speed_table_comes_from_the_bench_package covers that path cheaply.
    assert main(["--quick", "--no-speed", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for factor in FACTORS:
        section = out.split(f"### Imbalance factor {factor} ")[1].split("###")[0]
        for loss in losses.LOSS_TYPES:
            for weights in ("plain", "class-balanced"):
                assert re.search(rf"^\| {loss} \| {weights} \| .+ \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \|",
                                 section, re.M), f"missing row {loss}/{weights} at imbalance {factor}"
        assert re.search(rf"^imbalance {factor}: class balancing ", section, re.M)
    figure = tmp_path / "demo-digits.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"figure: {figure.resolve()}" in out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert sorted(saved["imbalance"]) == sorted(str(f) for f in FACTORS)
    assert all(len(v["rows"]) == 2 * len(losses.LOSS_TYPES) for v in saved["imbalance"].values())
    assert saved["backend"] in available_backends("cpu")  # the backend's name


def test_search_space_covers_every_loss_over_the_grid():
    configs = search_space()
    assert len(set(configs)) == len(configs)
    for spec in losses.LOSSES:
        mine = [c for c in configs if c.loss == spec.name]
        searched = [h.name for h in spec.hyperparameters if h.name in GRID]
        settings = math.prod(len(GRID[name]) for name in searched)
        assert len(mine) == settings * (1 + len(BETAS)), spec.name
        assert all([name for name, _ in c.hyperparameters] == searched for c in mine)


@pytest.mark.parametrize("factor", FACTORS)
def test_long_tail_profile_on_digits(splits, factor):
    expected = data.train_counts(splits, factor)
    assert expected == long_tail_counts(10, data.pool_n_max(splits), factor)
    assert expected == sorted(expected, reverse=True)
    # Rounding to whole images: the smallest class is within half an image of n_max / factor.
    assert abs(expected[-1] - expected[0] / factor) <= 0.5
    draws = [data.long_tailed_train(splits, factor, seed) for seed in (0, 1)]
    for train in draws:
        assert torch.bincount(train.y, minlength=10).tolist() == expected
    assert not torch.equal(draws[0].x, draws[1].x), "different seeds should draw different images"


def test_splits_are_balanced_and_cover_the_data(splits):
    x, y = data.load_digit_arrays()
    assert torch.bincount(splits.test.y).tolist() == [data.TEST_PER_CLASS] * 10
    assert torch.bincount(splits.val.y).tolist() == [data.VAL_PER_CLASS] * 10
    together = torch.cat([splits.pool.y, splits.val.y, splits.test.y])
    assert torch.equal(torch.bincount(together), torch.bincount(y))


def test_data_loading_needs_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted by the demo's data loader")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    x, y = data.load_digit_arrays()
    assert x.shape == (1797, 64) and y.shape == (1797,)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0


def _fake(val, test):
    return {"val": torch.full((3, 10), val), "test": torch.full((3, 10), test)}


def test_choices_use_validation_not_test():
    good_on_val, good_on_test = LossConfig("softmax", beta=0.9), LossConfig("softmax", beta=0.99)
    results = {LossConfig("softmax"): _fake(0.5, 0.5), good_on_val: _fake(0.9, 0.6), good_on_test: _fake(0.8, 0.95)}
    assert report.choose(results, "softmax", True) == good_on_val
    assert report.choose(results, "softmax", False) == LossConfig("softmax")


def test_verdict_follows_the_numbers():
    counts = [100, 60, 40, 25, 15, 10, 6, 4, 2, 1]
    plain = torch.tensor([0.70, 0.72, 0.71])
    rows = []
    better, worse, mixed = losses.LOSS_TYPES[:3]  # any three names: the verdict only labels rows with them
    gains = (0.05, -0.01, torch.tensor([0.02, -0.02, 0.01]))
    for loss, cb in zip((better, worse, mixed), (plain + g for g in gains)):
        rows += [report.Row(LossConfig(loss), plain, plain), report.Row(LossConfig(loss, beta=0.99), cb, cb, cb - plain)]
    line = report.verdict(100, rows)
    assert f"helps {better} (+5.0 pts)" in line
    assert f"hurts {worse} (-1.0 pts)" in line
    assert f"has no clear effect on {mixed} (+0.3 pts)" in line
    assert report.tail_classes(counts) == [9, 8, 7]


def test_speed_table_comes_from_the_bench_package(monkeypatch):
    # The demo's real shape is iNaturalist's (1024 x 8142); a small one keeps this test fast, and compiling
    # is left out as --quick does.
    monkeypatch.setattr(speed, "INAT_SHAPE", (64, 100))
    names = speed.provider_names("cpu", compiled=False, peers=False)
    kernels = {p.name for spec in losses.LOSSES for p in providers.providers_for(spec, "cpu") if p.kind == "cbkernels"}
    assert set(names) == {"naive", *kernels}
    assert "compiled" in speed.provider_names("cpu", compiled=True, peers=False)
    table = speed.speed_markdown("cpu", repeats=1, compiled=False)
    for loss in losses.LOSS_TYPES:
        assert f"### {loss}" in table
    for name in names:
        assert f"| {name} |" in table


def test_demo_without_its_extra_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    import cbkernels.demo as demo

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    assert demo.main(["--quick"]) == 2
    assert 'the demo needs sklearn: pip install "cbkernels[demo]"' in capsys.readouterr().err
