"""The CUDA backend's checks that need no GPU (CI): tools/check_cuda_compile.sh compiles
csrc/cuda/launch.cu with nvcc for sm_80 and sm_90 (any warning or register spill fails) and syntax-checks
csrc/cuda/bindings.cpp against the installed torch's headers (about a minute of CPU on 2 cores); and the
host-side parts of bench/sweep_cuda.py (configuration grid, arguments, JSON report, summary table)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cbkernels import losses

ROOT = Path(__file__).resolve().parents[1]


def _cuda_home():
    """A CUDA toolkit with nvcc and the runtime headers: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, or the
    one holding the nvcc on PATH (resolved: /usr/local/bin/nvcc may be a wrapper script)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  str(Path(nvcc).resolve().parent.parent) if nvcc else None]
    for home in filter(None, candidates):
        if (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "include" / "cuda_runtime.h").exists():
            return home
    return None


CUDA_HOME = _cuda_home()


@pytest.mark.skipif(CUDA_HOME is None, reason="no CUDA toolkit (nvcc and cuda_runtime.h under $CUDA_HOME, "
                    "$CUDA_PATH or /usr/local/cuda): the CUDA compile check needs one")
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no host C++ compiler (g++)")
def test_cuda_sources_compile_without_warnings_or_spills(tmp_path):
    env = dict(os.environ, CUDA_HOME=CUDA_HOME, PYTHON=sys.executable, CBK_CHECK_OUT=str(tmp_path))
    proc = subprocess.run(["bash", str(ROOT / "tools" / "check_cuda_compile.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"CUDA compile check failed:\n{proc.stdout}\n{proc.stderr}"
    for sm in (80, 90):
        report = (tmp_path / f"ptxas_sm{sm}.txt").read_text()
        # Every kernel family is instantiated (a dispatch typo would silently drop one), the softmax kernels
        # with each loss they compute (kernels.cuh: SoftmaxCe, SoftmaxFocal, SoftmaxFocalSmooth; mangled names).
        for kernel in ("sigmoid_focal_kernel", "softmax_stream_kernel", "softmax_cached_kernel",
                       "scale_rows_unless_one_kernel", "9SoftmaxCe", "12SoftmaxFocalE", "18SoftmaxFocalSmooth",
                       "sigmoid_split_kernel", "sum_parts_kernel", "softmax_split_stats_kernel",
                       "softmax_split_finish_kernel"):
            assert kernel in report, f"{kernel} missing from the sm_{sm} build"


def _load_sweep_cuda():
    """bench/sweep_cuda.py is a script, not a package module: load it by path."""
    spec = importlib.util.spec_from_file_location("sweep_cuda", ROOT / "bench" / "sweep_cuda.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sweep_cuda = _load_sweep_cuda()


def test_sweep_config_grid_matches_the_launcher_rules():
    for family in (f.name for f in losses.FAMILIES):
        for c in (7, 1000, 8142, 70001, 262144):
            grid = sweep_cuda.config_grid(family, c)
            assert grid and len(set(grid)) == len(grid)
            for config in grid:  # the rules of config_error in csrc/cuda/launch.cu
                tpr = config.threads // config.rows
                assert config.threads % config.rows == 0 and tpr % 32 == 0 and 32 <= config.threads <= 1024
                assert config.vec in (16, 8, 1) and config.cache in (0, 1) and 0 <= config.ctas <= 32
            assert grid[0].threads // grid[0].rows == sweep_cuda.default_tpr(c)
    assert sweep_cuda.default_tpr(8142) == 128 and sweep_cuda.default_tpr(1) == 32
    assert sweep_cuda.default_tpr(10**6) == 512  # two blocks per SM for long rows (launch.cu)
    assert sweep_cuda.Config(512, 2, 8, 0).env() == "threads=512,rows=2,vec=8,cache=0"
    assert sweep_cuda.Config(256, 1, 16, 1, 2).env() == "threads=256,rows=1,vec=16,cache=1,ctas=2"
    assert any(config.ctas for config in sweep_cuda.config_grid("softmax_ce", 8142)[1:4])


def test_sweep_config_env_is_restored(monkeypatch):
    monkeypatch.setenv(sweep_cuda.ENV, "threads=64")
    with sweep_cuda.ConfigEnv(sweep_cuda.Config(128, 1)):
        assert os.environ[sweep_cuda.ENV] == "threads=128,rows=1,vec=16,cache=1"
    with sweep_cuda.ConfigEnv(None):
        assert sweep_cuda.ENV not in os.environ
    assert os.environ[sweep_cuda.ENV] == "threads=64"


def test_sweep_arguments_report_and_table(tmp_path):
    args = sweep_cuda.parse_args(["--out", str(tmp_path / "s.json")])
    assert args.budget_s == 120.0
    with pytest.raises(SystemExit):
        sweep_cuda.parse_args(["--out", "x.json", "--budget-s", "0"])
    with pytest.raises(SystemExit):
        sweep_cuda.parse_args([])
    rates = sweep_cuda.with_rates({"ms": 2.0}, 4 * 10**9, 1000.0)
    assert rates == {"ms": 2.0, "gbps": 2000.0, "pct_copy": 200.0}
    assert sweep_cuda.useful_bytes(2, 3, __import__("torch").bfloat16) == 2 * 2 * 3 * 2 + 16 + 12
    entry = {"family": "softmax_ce", "n": 8192, "c": 8142, "dtype": "bfloat16",
             "default": {"fused": {"ms": 1.0, "pct_copy": 80.0}, "recompute": {"error": "x"}},
             "best": {"config": {"threads": 512, "rows": 1, "vec": 16, "cache": 1},
                      "fused": {"ms": 0.5, "gbps": 1500.0, "pct_copy": 90.0}, "recompute": {"ms": 0.6},
                      "faster": "fused", "pct_copy": 90.0}}
    report = {"device": "test", "copy_gbps": 1666.0, "complete": False, "shapes": [entry]}
    path = tmp_path / "s.json"
    sweep_cuda.write_report(report, str(path))
    assert json.loads(path.read_text()) == report
    lines = sweep_cuda.summary_lines(report)
    assert "threads=512,rows=1,vec=16,cache=1" in lines[-1] and "90.0" in lines[-1] and "80.0" in lines[-1]
    (row,) = sweep_cuda.table_rows(report)
    assert "softmax_ce C=8142 bfloat16" in row and "threads=512, rows=1, vec=16, cache=1, ctas=0" in row
