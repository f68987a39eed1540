"""`python -m cbkernels info` (cbkernels/__main__.py): runs in a fresh interpreter and prints the version, the
state of the C++ extension and the backends available on each device, as this process sees them."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

import cbkernels
from cbkernels import _ops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs `python -m cbkernels info` with the C++ extension blocked by a meta-path finder.
BLOCKED_INFO = (
    "import runpy, sys\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'cbkernels._C': raise ImportError('blocked for the test')\n"
    "sys.meta_path.insert(0, Block())\n"
    "sys.argv = ['cbkernels', 'info']\n"
    "runpy.run_module('cbkernels', run_name='__main__', alter_sys=True)\n"
)


def _run(args):
    # The child inherits this process's environment (TRITON_INTERPRET included), so it should see the
    # same backends; it runs from the repository root like a user's `python -m cbkernels`.
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=240)
    assert result.returncode == 0, (f"exit {result.returncode}\nstdout:\n{result.stdout}\n"
                                    f"stderr:\n{result.stderr[-3000:]}")
    return result.stdout.splitlines()


def test_info_prints_version_extension_and_backends():
    lines = _run(["-m", "cbkernels", "info"])
    assert lines[0] == f"cbkernels {cbkernels.__version__}, torch {torch.__version__}", lines
    if _ops.extension_loaded():
        assert "extension: loaded" in lines, lines
    else:
        assert f"extension: not built ({_ops.extension_error()})" in lines, lines
    assert f"backends on cpu: {cbkernels.available_backends('cpu')}" in lines, lines
    has_cuda_line = any(line.startswith("backends on cuda:") for line in lines)
    assert has_cuda_line == torch.cuda.is_available(), lines
    if torch.cuda.is_available():
        assert f"backends on cuda: {cbkernels.available_backends('cuda')}" in lines, lines


def test_info_without_the_extension_says_why():
    lines = _run(["-c", BLOCKED_INFO])
    assert lines[0].startswith(f"cbkernels {cbkernels.__version__}, "), lines
    assert "extension: not built (ImportError: blocked for the test)" in lines, lines
    cpu_line = next(line for line in lines if line.startswith("backends on cpu: "))
    assert "'reference'" in cpu_line and "'cpu'" not in cpu_line, lines
