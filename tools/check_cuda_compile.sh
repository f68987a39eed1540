#!/usr/bin/env bash
# Compile-checks the CUDA backend on a machine without a GPU (CI):
#   1. nvcc compiles csrc/cuda/launch.cu for sm_80 and sm_90 (in parallel) with the shipped build's flags,
#      failing on any warning (-Werror all-warnings, host -Werror) or any register spill; ptxas's
#      per-kernel report (registers, spills) is saved under $CBK_CHECK_OUT, the objects under
#      build/cuda-objects (for the audit).
#   2. g++ syntax-checks csrc/cuda/bindings.cpp (and through it csrc/common/loss_ops.h, the op wrappers it
#      shares with the CPU backend) against the installed torch's headers and the CUDA headers. A
#      CPU-only torch ships c10/cuda headers but not the generated c10/cuda/impl/cuda_cmake_macros.h; a
#      stub with its one definition stands in for it.
# Exit status 0 only when all of it passes. Needs nvcc (CUDA_HOME, or /usr/local/cuda) and g++.
# Environment: PYTHON (default .venv/bin/python, else python3), CBK_CHECK_OUT (default build/cuda-check).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
NVCC="${NVCC:-$CUDA_HOME/bin/nvcc}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT="${CBK_CHECK_OUT:-build/cuda-check}"
mkdir -p "$OUT"
[[ -x "$NVCC" ]] || { echo "check_cuda_compile: nvcc not found at $NVCC" >&2; exit 2; }

# The shipped build's flags (torch's and setup.py's, as cbkernels/audit/compile_cuda.py reads them for the
# audit), plus -fPIC as torch's extension build adds it, warnings as errors on the host and device side, and
# ptxas's report: none of these changes the device code. Each object is written where the audit looks for it
# (compile_cuda.object_path: a name hashing the flags, nvcc and csrc/), so a later `make audit` links its
# probe with the sm_90 one instead of compiling the kernels again.
pids=()
for sm in 80 90; do
  mapfile -t spec < <(CUDA_HOME="$CUDA_HOME" "$PYTHON" -m cbkernels.audit.compile_cuda "$sm")
  [[ ${#spec[@]} -gt 1 ]] || { echo "check_cuda_compile: cannot read the shipped nvcc flags" >&2; exit 2; }
  obj="${spec[0]}"
  mkdir -p "$(dirname "$obj")"
  ( "$NVCC" "${spec[@]:1}" -Xcompiler -fPIC,-Wall,-Wextra,-Werror -Werror all-warnings \
      -Xptxas -v,-warn-spills,-warn-lmem-usage -c csrc/cuda/launch.cu -o "$obj.$$.partial" \
    && mv "$obj.$$.partial" "$obj" ) > "$OUT/ptxas_sm$sm.txt" 2>&1 &
  pids+=($!)
done

status=0
TORCH_INC=$("$PYTHON" -c "from torch.utils import cpp_extension as c; print(' '.join('-isystem ' + p for p in c.include_paths()))")
PY_INC=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
STUB="$OUT/stub"
mkdir -p "$STUB/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$STUB/c10/cuda/impl/cuda_cmake_macros.h"
# shellcheck disable=SC2086
if ! ${CXX:-g++} -std=c++17 -fsyntax-only -Wall -Wextra -Wno-unused-parameter -Werror -DCBKERNELS_WITH_CUDA=1 -I csrc \
    $TORCH_INC -isystem "$STUB" -isystem "$CUDA_HOME/include" -isystem "$PY_INC" csrc/cuda/bindings.cpp \
    > "$OUT/bindings.txt" 2>&1; then
  echo "FAIL: bindings.cpp does not compile:" >&2; cat "$OUT/bindings.txt" >&2; status=1
fi

for i in 0 1; do
  sm=$([[ $i == 0 ]] && echo 80 || echo 90)
  log="$OUT/ptxas_sm$sm.txt"
  if ! wait "${pids[$i]}"; then
    echo "FAIL: nvcc sm_$sm:" >&2; grep -v '^ptxas info' "$log" >&2 || true; status=1; continue
  fi
  kernels=$(grep -c "Compiling entry function" "$log" || true)
  spills=$(grep -E "bytes spill (stores|loads)" "$log" | grep -Ev " 0 bytes spill stores, 0 bytes spill loads" || true)
  if [[ -n "$spills" || "$kernels" == 0 ]]; then
    echo "FAIL: sm_$sm: $kernels kernels; register spills:" >&2; echo "$spills" >&2; status=1
  fi
  maxreg=$(grep -oE "Used [0-9]+ registers" "$log" | awk '{print $2}' | sort -n | tail -1)
  echo "sm_$sm: $kernels kernels, no spills, at most ${maxreg:-?} registers (report: $log)"
done
[[ $status == 0 ]] && echo "OK: launch.cu (sm_80, sm_90) and bindings.cpp compile cleanly"
exit $status
