"""The `bench` command end to end on the quick preset (on the default device: the GPU where there is one,
so the CUDA-graph mode runs there), the runner's handling of bad providers, and the GPU-only outputs (graph
replay, host time, targets) on rows of the shape a GPU run writes."""
import csv
import json

import pytest
import torch

from cbkernels import bench, losses
from cbkernels.bench import cases, presets, providers, report, runner, targets, timing

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

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
        want = [p.name for p in providers.providers_for(losses.loss(loss), DEVICE) if p.name not in preset["exclude"]]
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
        assert r["copy_ms"] > 0 and r["copy_gbps"] > 0
        if r["provider"] != providers.NAIVE:
            assert r["speedup_vs_naive"] > 0
        if DEVICE == "cuda":  # every step replayed as a CUDA graph; the kernels' must be capturable
            assert r["host_us"] > 0
            if r["kind"] == "cbkernels":
                assert r.get("graph_error") is None and r["graph_ms"] > 0 and r["graph_pct_copy"] > 0, r
        else:
            assert "graph_ms" not in r and "host_us" not in r
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
    kernels = [f"{b},{s}" for b in _backends.native_kernel_backends(DEVICE) for s in _backends.STRATEGIES]
    assert kernels  # the extension is built in the test environment
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


# --- GPU-run outputs on rows of a GPU run's shape (CUDA graphs cannot run here) ------------------------------

def _gpu_row(loss, provider, kind, ms, graph_ms, n=8192, c=8142, dtype="float32", copy_ms=0.13):
    nbytes = cases.useful_bytes(n, c, getattr(torch, dtype))
    copy_gbps = runner.gbps(2 * n * c * getattr(torch, dtype).itemsize, copy_ms)
    row = {"loss": loss, "N": n, "C": c, "dtype": dtype, "device": "cuda", "provider": provider, "kind": kind,
           "status": "ok", "ok": True, "error": None, "useful_bytes": nbytes, "copy_ms": copy_ms,
           "copy_gbps": copy_gbps, "floor_ms": copy_ms, "fwd_ms": ms / 2, "bwd_ms": ms / 2, "ms_median": ms,
           "ms_spread": 0.01, "gbps": runner.gbps(nbytes, ms), "loss_rel_err": 1e-8, "grad_rel_err": 1e-8,
           "host_us": 40.0, **losses.loss(loss).defaults()}
    row["pct_copy"] = 100 * row["gbps"] / copy_gbps
    if graph_ms is None:
        row["graph_error"] = "RuntimeError: operation not permitted when stream is capturing"
    else:
        row.update(graph_ms=graph_ms, graph_spread=0.001,
                   graph_pct_copy=100 * runner.gbps(nbytes, graph_ms) / copy_gbps)
    return row


def _gpu_case(loss="softmax", ours=0.14, compiled=0.35, naive=1.2, torch_peer=0.25, **shape):
    rows = [_gpu_row(loss, "cbkernels[cuda,recompute]", "cbkernels", 0.3, ours, **shape),
            _gpu_row(loss, "cbkernels[triton,fused]", "cbkernels", 0.2, ours * 1.5, **shape),
            _gpu_row(loss, providers.NAIVE, "peer", 2.5, naive, **shape),
            _gpu_row(loss, providers.COMPILED, "peer", 0.6, compiled, **shape)]
    if loss == "softmax":
        rows.append(_gpu_row(loss, "F.cross_entropy", "peer", 0.3, torch_peer, **shape))
    runner.add_speedups(rows)
    return rows


def test_graph_speedups_pair_graph_times_and_skip_uncapturable_peers():
    rows = _gpu_case(naive=None)
    ours = rows[0]
    assert ours["graph_speedup_vs"] == pytest.approx({providers.COMPILED: 0.35 / 0.14, "F.cross_entropy": 0.25 / 0.14})
    assert ours["speedup_vs"][providers.NAIVE] == pytest.approx(2.5 / 0.3)


def test_targets_judge_graph_times_with_eager_beside():
    rows = _gpu_case(ours=0.14, compiled=0.35, naive=1.0, torch_peer=0.2)
    by_target = {t["target"]: t for t in targets.evaluate(rows)}
    assert set(by_target) == {"copy bandwidth", "vs compiled", "vs naive", "vs F.cross_entropy"}
    copy = by_target["copy bandwidth"]
    assert copy["provider"] == "cbkernels[cuda,recompute]" and copy["eager_provider"] == "cbkernels[triton,fused]"
    assert copy["value"] == pytest.approx(100 * 0.13 / 0.14, rel=1e-3) and copy["met"]  # ~93% of the copy
    assert by_target["vs compiled"]["value"] == pytest.approx(2.5) and by_target["vs compiled"]["met"]
    assert by_target["vs compiled"]["eager_value"] == pytest.approx(0.6 / 0.2)
    assert by_target["vs naive"]["value"] == pytest.approx(1.0 / 0.14) and not by_target["vs naive"]["met"]
    assert not by_target["vs F.cross_entropy"]["met"]  # 0.2 / 0.14 = 1.43 < 1.5
    table = targets.markdown(list(by_target.values()))
    assert "| vs naive | softmax 8192 x 8142 float32 | cbkernels[cuda,recompute] | 7.14x | >= 8.00x | NO |" in table
    assert "2 of 4 met." in table


def test_targets_fall_back_to_a_peers_eager_time_and_skip_other_shapes_and_cpu_runs():
    rows = _gpu_case(loss="focal", naive=None, n=1024)
    by_target = {t["target"]: t for t in targets.evaluate(rows)}
    assert set(by_target) == {"vs compiled", "vs naive"}  # no copy target off (8192, 8142) or for focal
    naive = by_target["vs naive"]
    assert naive["value"] == pytest.approx(2.5 / 0.14) and "not capturable" in naive["note"]
    cpu_rows = [dict(r, device="cpu") for r in rows]
    for r in cpu_rows:
        for key in ("graph_ms", "graph_pct_copy", "graph_error", "host_us"):
            r.pop(key, None)
    assert targets.evaluate(cpu_rows) == [] and targets.markdown([]) == ""


def test_no_cliff_target_takes_the_lowest_c_of_a_class_sweep():
    rows = []
    for c, ours in ((1000, 0.14), (65536, 0.2), (262144, 0.15), (524288, 1.0)):
        rows += _gpu_case(loss="sigmoid", ours=ours, n=2**24 // c, c=c)
    (cliff,) = [t for t in targets.evaluate(rows) if t["target"] == "no cliff"]
    assert "C = 1000 .. 262144: lowest at C = 65536" in cliff["case"]  # C > 262144 is outside the target
    assert cliff["value"] == pytest.approx(100 * 0.13 / 0.2, rel=1e-2) and not cliff["met"]


def test_gpu_tables_show_graph_times_host_time_and_both_ratios():
    rows = _gpu_case(naive=None)
    table = report.format_markdown(rows)
    assert "| graph ms (spread) | graph % copy | host us |" in table and "vs compiled (eager / graph)" in table
    assert "| cbkernels[cuda,recompute] | 0.150 | 0.150 | 0.300 (0.010) |" in table
    assert "| 0.140 (0.001) | 93% | 40 |" in table and "| 2.00x / 2.50x |" in table
    assert "not capturable: RuntimeError: operation not permitted" in table  # the naive row
    graph = report.summary_markdown(rows, mode="graph")
    assert "| softmax | 8192 x 8142 | float32 | cbkernels[cuda,recompute] | 0.140 | 93% | 0.300 | 40 |" in graph
    eager = report.summary_markdown(rows)
    assert "| softmax | 8192 x 8142 | float32 | cbkernels[triton,fused] | 0.200 |" in eager
    assert report.summary_markdown([dict(r, graph_ms=None) for r in rows], mode="graph") == ""


def test_strict_fails_on_kernel_errors_and_uncapturable_kernels_only():
    rows = _gpu_case(naive=None)
    assert bench.strict_problems(rows, []) == []  # an uncapturable peer is reported, not fatal
    rows[1].pop("graph_ms")
    rows[1]["graph_error"] = "RuntimeError: capture failed"
    rows[0].update(ok=False, status="mismatch", error="relative error vs float64 reference: loss 1e-02")
    problems = bench.strict_problems(rows, ["focal N=8, C=3: OutOfMemoryError"])
    assert len(problems) == 3 and problems[0].startswith("case failed: focal")
    assert "cbkernels[cuda,recompute] softmax N=8192 C=8142 float32: mismatch" in problems[1]
    assert "not capturable as a CUDA graph: RuntimeError: capture failed" in problems[2]


def test_an_uncapturable_step_is_reported_with_its_host_time(monkeypatch):
    def refuse(run, device, repeats, warmup):  # as torch.cuda.graph reports a host sync inside the capture
        try:
            raise RuntimeError("operation not permitted when stream is capturing\nsecond line")
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(timing, "cuda_graph_replay_ms", refuse)
    monkeypatch.setattr(timing, "host_us_per_call", lambda run, device, calls: [30.0, 50.0, 40.0])
    row = {}
    runner._measure_graph(lambda: None, torch.device("cpu"), 3, 0, row)
    assert row == {"host_us": 40.0, "graph_error": "RuntimeError: operation not permitted when stream is capturing"}


def test_host_time_per_call_times_each_call():
    calls = []
    samples = timing.host_us_per_call(lambda: calls.append(1), torch.device("cpu"), 4)
    assert len(samples) == 4 == len(calls) and all(s >= 0 for s in samples)
