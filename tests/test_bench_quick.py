"""The `bench` command end to end on the quick preset, and the runner's handling of bad providers."""
import csv
import json

import pytest
import torch

from cbkernels import bench, losses
from cbkernels.bench import cases, presets, providers, runner

OUTPUTS = ("table.md", "results.json", "results.csv", "time.png", "bandwidth.png", "memory.png")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick"
    assert bench.main(["--preset", "quick", "--out", str(out)]) == 0
    return out


def test_quick_preset_writes_every_output(quick_run):
    for name in OUTPUTS:
        assert (quick_run / name).stat().st_size > 0, name
    meta = json.loads((quick_run / "results.json").read_text())["meta"]
    for key in ("date_utc", "command", "device", "cpu", "torch", "triton", "cbkernels"):
        assert meta[key], key
    assert meta["command"].endswith(f"--preset quick --out {quick_run}")


def test_quick_preset_checks_and_times_every_provider(quick_run):
    rows = json.loads((quick_run / "results.json").read_text())["rows"]
    preset = presets.PRESETS["quick"]
    expected_cases = {(loss, n, c) for loss in losses.LOSS_TYPES for n, c in preset["shapes"]}
    assert {(r["loss"], r["N"], r["C"]) for r in rows} == expected_cases
    for loss, n, c in expected_cases:
        got = [r["provider"] for r in rows if (r["loss"], r["N"], r["C"]) == (loss, n, c)]
        want = [p.name for p in providers.providers_for(losses.loss(loss), "cpu") if p.name not in preset["exclude"]]
        assert got == want
    for r in rows:
        # every loss runs at the registry's defaults, recorded in its rows
        assert {h.name: r[h.name] for h in losses.loss(r["loss"]).hyperparameters} == losses.loss(r["loss"]).defaults()
        if r["status"] == "unavailable":
            continue
        # fp32 on CPU: every provider, peers included, must agree with the float64 reference
        assert r["status"] == "ok" and r["ok"], (r["provider"], r["error"])
        assert r["loss_rel_err"] <= 1e-4 and r["grad_rel_err"] <= 1e-4
        assert r["ms_median"] > 0 and r["fwd_ms"] > 0 and r["bwd_ms"] > 0
        assert r["peak_extra_mib"] is not None and r["peak_extra_mib"] >= 0
        if r["provider"] != providers.NAIVE:
            assert r["speedup_vs_naive"] > 0
    table = (quick_run / "table.md").read_text()
    assert all(f"| {r['provider']} |" in table for r in rows)
    with open(quick_run / "results.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)


def _fake_provider(name, build):
    return providers.Provider(name, "peer", build)


def test_a_disagreeing_or_failing_provider_is_reported_not_timed(monkeypatch):
    real = providers.providers_for

    def wrong(case):
        fn = providers.naive(case)
        return lambda x: 1.01 * fn(x)

    def broken(case):
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setattr(providers, "providers_for", lambda loss, device: real(loss, device) + [
        _fake_provider("wrong", wrong), _fake_provider("broken", broken)])
    rows = runner.run_case("focal", 8, 33, torch.float32, "cpu", repeats=1, warmup=0, memory=False)
    by_name = {r["provider"]: r for r in rows}
    assert by_name["wrong"]["status"] == "mismatch" and not by_name["wrong"]["ok"]
    assert by_name["wrong"]["loss_rel_err"] == pytest.approx(0.01, rel=1e-3)
    assert "fwd_ms" not in by_name["wrong"] and by_name["wrong"]["speedup_vs"] == {}
    assert by_name["broken"]["status"] == "error" and "no kernel for this shape" in by_name["broken"]["error"]
    assert by_name[providers.NAIVE]["ok"]
    assert "wrong" not in by_name[providers.NAIVE]["speedup_vs"]  # a failed peer is no yardstick


def test_speed_table_api():
    rows = bench.speed_table(shape=(16, 100), losses=("softmax",), repeats=2, providers=["naive", "F.cross_entropy"])
    assert [r["provider"] for r in rows] == ["naive", "F.cross_entropy"]
    for r in rows:
        assert {"loss", "provider", "ms_median", "ms_spread", "speedup_vs_naive", "ok"} <= r.keys()
        assert r["loss"] == "softmax" and r["ok"]
    assert rows[0]["speedup_vs_naive"] is None and rows[1]["speedup_vs_naive"] > 0
    md = bench.format_markdown(rows)
    assert "| naive |" in md and "| F.cross_entropy |" in md and "N=16, C=100" in md


def test_useful_bytes_counts_logits_twice_plus_targets_and_weights():
    assert cases.useful_bytes(3, 5, torch.bfloat16) == 2 * 3 * 5 * 2 + 3 * 8 + 5 * 4
    inputs = cases.make_inputs(3, 5, torch.bfloat16, "cpu")  # the dtypes it assumes are those of the inputs
    tensors = (inputs.logits, inputs.logits, inputs.target, inputs.weight)
    assert cases.useful_bytes(3, 5, torch.bfloat16) == sum(t.numel() * t.element_size() for t in tensors)


def test_cases_are_seeded_and_shared_by_the_benchmarks():
    a = cases.make_case(losses.LOSSES[0], 8, 33, torch.float32, "cpu")
    b = cases.make_inputs(8, 33, torch.float32, "cpu")
    assert torch.equal(a.logits, b.logits) and torch.equal(a.target, b.target) and torch.equal(a.weight, b.weight)
    assert a.hyperparameters == losses.LOSSES[0].defaults()
    ignored = cases.make_inputs(8, 33, torch.float32, "cpu", ignore_every=3).target
    assert ignored[::3].eq(cases.IGNORE_INDEX).all() and ignored[1::3].ge(0).all()


def test_render_rewrites_table_and_plots_from_json(quick_run, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    (out / "results.json").write_text((quick_run / "results.json").read_text())
    assert bench.main(["--render", str(out)]) == 0
    assert (out / "table.md").read_text() == (quick_run / "table.md").read_text()
    assert (out / "time.png").stat().st_size > 0


def test_peers_follow_the_kernel_family():
    for spec in losses.LOSSES:
        names = {p.name for p in providers.providers_for(spec, "cpu")}
        assert ("F.cross_entropy" in names) == (spec.family is losses.SOFTMAX_CE), spec.name
        assert ("torchvision-style" in names) == (spec.family is losses.SIGMOID_FOCAL), spec.name


def test_overhead_preset_times_every_provider_against_cross_entropy(tmp_path):
    from cbkernels import _backends
    from cbkernels.bench import overhead

    out = tmp_path / "overhead"
    threads = torch.get_num_threads()
    assert bench.main(["--preset", "overhead", "--rounds", "2", "--inner", "2", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # restored after the one-thread measurement
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["preset"] == "overhead" and data["meta"]["rounds"] == 2 and data["meta"]["measure_threads"] == 1
    rows = data["rows"]
    kernels = [f"{b},{s}" for b in _backends.native_kernel_backends("cpu") for s in _backends.STRATEGIES]
    assert kernels  # the CPU extension is built in the test environment
    expected = set()
    for spec in losses.LOSSES:
        names = [overhead.PEER, f"{spec.function}[reference]"]
        names += [f"{via}[{k}]" for k in kernels for via in (spec.function, "ClassBalancedLoss")]
        expected |= {(spec.name, n, c, red, name) for n, c in presets.PRESETS["overhead"]["shapes"]
                     for red in ("mean", "sum") for name in names}
    assert {(r["loss"], r["N"], r["C"], r["reduction"], r["provider"]) for r in rows} == expected
    assert len(rows) == len(expected)
    for r in rows:
        assert r["ok"], (r["provider"], r["error"])
        assert r["us_median"] > 0 and r["ratio_to_peer"] > 0 and len(r["us_samples"]) == 2
    table = (out / "table.md").read_text()
    assert all(f"| {r['reduction']} | {r['provider']} |" in table for r in rows)
    assert data["meta"]["torch"] in table and "Commit " in table
