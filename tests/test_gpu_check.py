"""tools/gpu_check.sh (`make gpu-check`) without a GPU: its syntax, and its control flow in a dry run, where
every command is printed instead of run and GPU_CHECK_DRY_FAIL makes chosen steps fail. What a dry run
cannot show (the commands' own behaviour on a GPU) is what the script exists to find out on a device."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tools", "gpu_check.sh")
STEPS = ("build", "info", "bench_inat", "bench_classes", "sweep_triton", "sweep_cuda", "bench_linear")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _dry_run(out, **env):
    # OUT is always a temporary folder: the script empties $OUT/gpu_check, and on a device machine the
    # caller's OUT is the real check's.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "OUT"}
    result = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=120, cwd=REPO,
                            env=dict(clean, OUT=str(out), GPU_CHECK_DRY_RUN="1", **env))
    summary = (out / "summary.md").read_text()
    return result, summary


def _rows(summary):
    """{first cell: (exit, note)} of the summary's step table."""
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] not in ("step", "---"):
            rows[cells[0]] = (cells[1], cells[3])
    return rows


def _logs(out) -> dict[str, str]:
    """The archive's logs by path."""
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        return {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


def _test_files():
    return sorted(os.path.relpath(f, REPO) for f in glob.glob(os.path.join(REPO, "tests", "test_*.py"))
                  + glob.glob(os.path.join(REPO, "bench", "test_*.py")))


def test_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_dry_run_runs_every_step_and_every_test_file(tmp_path):
    result, summary = _dry_run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = _rows(summary)
    assert set(rows) == set(STEPS) | set(_test_files())
    assert all(exit_code == "0" for exit_code, _ in rows.values()), rows
    assert "every step passed" in summary
    # two files come back: the summary and one archive holding every log
    assert sorted(os.listdir(tmp_path)) == ["gpu_check.tar.gz", "summary.md"]
    logs = _logs(tmp_path)
    # one pytest process per file, the whole file (not a mark's subset), each test under a timeout
    for f in _test_files():
        (line,) = logs[f"gpu_check/tests/{os.path.basename(f)[:-3]}.log"].splitlines()
        assert " -m pytest " in line and line.endswith(f" {f}") and "--timeout=" in line, line
        assert " -m " not in line.split(" -m pytest ", 1)[1], line
    # the benchmark fails the check on kernel errors (--strict)
    assert "--preset inat --strict" in logs["gpu_check/bench_inat.log"]
    assert "--preset sweep --strict" in logs["gpu_check/bench_classes.log"]


def test_a_failed_step_fails_the_check_after_every_other_step_ran(tmp_path):
    result, summary = _dry_run(tmp_path, GPU_CHECK_DRY_FAIL="build=2 tests_test_weights=1")
    assert result.returncode == 1
    rows = _rows(summary)
    assert rows["build"][0] == "2" and rows["tests/test_weights.py"][0] == "1"
    assert rows["sweep_cuda"][0] == "0" and rows["bench_inat"][0] == "0"  # later steps still ran
    assert "FAILED: build tests/test_weights.py" in summary
    assert (tmp_path / "gpu_check.tar.gz").exists()


def test_a_crashing_test_file_is_resumed_past_the_crash(tmp_path):
    result, summary = _dry_run(tmp_path, GPU_CHECK_DRY_FAIL="tests_test_api=139")
    assert result.returncode == 1
    exit_code, note = _rows(summary)["tests/test_api.py"]
    assert exit_code == "139" and "crashed (exit 139) in: tests/test_api.py::test_dry_crash" in note
    log = _logs(tmp_path)["gpu_check/tests/test_api.log"]
    assert "--deselect tests/test_api.py::test_dry_crash tests/test_api.py" in log


def test_no_time_left_means_not_started_and_failed(tmp_path):
    result, summary = _dry_run(tmp_path, GPU_CHECK_BUDGET_S="0", GPU_CHECK_FILES="tests/test_api.py")
    assert result.returncode == 1
    rows = _rows(summary)
    assert rows["build"] == ("not run", "no time left")
    assert rows["tests/test_api.py"][0] == "124"
    assert _logs(tmp_path)["gpu_check/tests/test_api.log"] == "=== no time left for this file\n"
