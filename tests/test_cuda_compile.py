"""CI gate for the CUDA backend on machines without a GPU: tools/check_cuda_compile.sh compiles
csrc/cuda/launch.cu with nvcc for sm_80 and sm_90 (any warning or register spill fails) and syntax-checks
csrc/cuda/bindings.cpp against the installed torch's headers. About a minute of CPU on 2 cores."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
NVCC = shutil.which("nvcc") or str(Path(CUDA_HOME) / "bin" / "nvcc")


@pytest.mark.skipif(not Path(NVCC).exists(), reason=f"nvcc not found (PATH, or {CUDA_HOME}/bin): "
                    "the CUDA compile check needs the CUDA toolkit")
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no host C++ compiler (g++)")
def test_cuda_sources_compile_without_warnings_or_spills(tmp_path):
    env = dict(os.environ, CUDA_HOME=str(Path(NVCC).parent.parent), PYTHON=sys.executable,
               CBK_CHECK_OUT=str(tmp_path))
    proc = subprocess.run(["bash", str(ROOT / "tools" / "check_cuda_compile.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"CUDA compile check failed:\n{proc.stdout}\n{proc.stderr}"
    for sm in (80, 90):
        report = (tmp_path / f"ptxas_sm{sm}.txt").read_text()
        # Every kernel family is instantiated (a dispatch typo would silently drop one).
        for kernel in ("sigmoid_focal_kernel", "softmax_stream_kernel", "softmax_cached_kernel"):
            assert kernel in report, f"{kernel} missing from the sm_{sm} build"
