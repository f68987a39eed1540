#!/usr/bin/env bash
# The GPU check (`make gpu-check`) for a lent device machine: builds the extension with CUDA, runs the
# GPU-marked tests, the benchmark and the launch-configuration sweeps, and leaves everything under $OUT
# (one archive, gpu_check.tar.gz, plus summary.md: the device tool returns at most 8 files).
# Each step is time-boxed so the whole run stays well under 8 minutes; a failed step is logged, not fatal.
# The device machine has no network: missing pure-Python wheels travel in .whl/ (expecttest, for opcheck).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
RES="$OUT/gpu_check"
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
SUMMARY="$OUT/summary.md"
# Prefer the system compiler when there is one (CXX set by the caller wins): built with /opt/gcc/bin/g++,
# the default on the H200 image of bench/results/gpu-h200-2026-11-27, the CUDA ops crash (SIGSEGV)
# whenever a TORCH_CHECK message formats a number, while messages that format dtypes or devices raise
# cleanly. Suspected cause, not verified: that compiler's libstdc++ headers are newer than the libstdc++
# loaded at run time, and number formatting goes through the locale's num_put facet.
if [ -z "${CXX:-}" ] && [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
start=$(date +%s)

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$RES/$name.log" 2>&1
  local rc=$?
  printf '| %s | %s | %ss |\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >>"$SUMMARY"
  tail -n 25 "$RES/$name.log"
  return 0
}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); compiler ${CXX:-$(command -v c++)}"
  echo '```'
  echo
  echo '| step | exit | time |'
  echo '| --- | --- | --- |'
} >"$SUMMARY"

export CBKERNELS_BUILD_CUDA=1 CBKERNELS_CUDA_ARCH="${CBKERNELS_CUDA_ARCH:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
step build 180 $PY setup.py build_ext --inplace
step info 20 $PY -m cbkernels info
# One pytest process per file: a crash in one file (a segfault in an op) cannot hide the others' results.
# Every file: the backend fixture (tests/conftest.py) marks its CUDA pairs gpu without the text appearing.
for f in tests/test_*.py; do
  step "tests_$(basename "$f" .py)" 150 $PY -m pytest -q -m gpu -p no:cacheprovider "$f" --timeout=60
done
if [ "${GPU_CHECK_ONLY:-}" = tests ]; then
  echo "total $(( $(date +%s) - start ))s (tests only)" >>"$SUMMARY"
  tar -czf "$OUT/gpu_check.tar.gz" -C "$OUT" gpu_check; rm -rf "$RES"; cat "$SUMMARY"; exit 0
fi
step bench_inat 90 $PY -m cbkernels bench --device cuda --preset inat --out "$RES/bench" --budget-s 70
[ -f bench/sweep_triton.py ] && step sweep_triton 60 $PY bench/sweep_triton.py --out "$RES/sweep_triton.json" --budget-s 50
[ -f bench/sweep_cuda.py ] && step sweep_cuda 50 $PY bench/sweep_cuda.py --out "$RES/sweep_cuda.json" --budget-s 40
[ -f bench/bench_linear.py ] && step bench_linear 40 $PY bench/bench_linear.py --device cuda --out "$RES/linear.json" --budget-s 30

echo "total $(( $(date +%s) - start ))s" >>"$SUMMARY"
tar -czf "$OUT/gpu_check.tar.gz" -C "$OUT" gpu_check
rm -rf "$RES"
cat "$SUMMARY"
