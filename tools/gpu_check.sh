#!/usr/bin/env bash
# The GPU check (`make gpu-check`) for a lent device machine, in this order:
#   1. build the extension with CUDA for sm_90;
#   2. the whole test suite with CUDA visible: every test file (not only the gpu mark), the slow tests
#      (CBKERNELS_SLOW=1), Triton compiled natively (no TRITON_INTERPRET); one pytest process per file,
#      several files at a time, so a crash in one file hides nothing in the others, and a file is resumed
#      past a test that kills its process;
#   3. the benchmark at the iNaturalist shapes (eager, CUDA-graph replay, host time per call, the copy peer,
#      the speed targets), then the class sweep up to C = 262144 (the "no cliff" target);
#   4. the launch-configuration sweeps (bench/sweep_triton.py, bench/sweep_cuda.py, by their CLI).
# Everything lands under $OUT as two files (the device tool returns at most 8): summary.md (steps, exit
# codes, times, per-file test results, the targets) and gpu_check.tar.gz (every log and result).
#
# Time: the device tool gives one `make gpu-check` 8 minutes. Each step has a limit, cut to what is left
# of GPU_CHECK_BUDGET_S (default 460 s, leaving time to archive); a step that runs out of time is killed
# and counts as failed, and a step with no time left is not started and counts as failed. Budget, in
# seconds: each step's limit, and in brackets a predicted need, extrapolated from the only earlier GPU run
# (bench/results/gpu-h200-2026-11-27: build 39 s; info 9 s; with -m gpu only, test_determinism 52 s and
# test_triton_backend 74 s; the inat benchmark 69 s without CUDA graphs); the whole suite's time on a GPU
# is not measured yet (each test log ends with pytest's --durations):
#   build 150 (~45) | info 20 (~10) | tests 170 for the whole pool, 150 a file (~150) |
#   bench_inat 95 (~85) | bench_classes 55 (~50) | sweep_triton 45 | sweep_cuda 35 | bench_linear 40,
#   only if that much is left (optional: skipped without failing the check).
# Every step runs to its end or its limit; any failed step makes the script exit 1 after the remaining
# steps ran and summary.md and the archive were written.
#
# Knobs: GPU_CHECK_ONLY=tests (stop after the tests), GPU_CHECK_FILES="tests/test_a.py ..." (these test
# files only), GPU_CHECK_JOBS (test files at a time, default 6), GPU_CHECK_BUDGET_S, GPU_CHECK_COMMIT (the
# commit to name in the summary where there is no .git), PYTHON, CXX.
# GPU_CHECK_DRY_RUN=1 prints every command instead of running it (CPU machines, tests/test_gpu_check.py);
# GPU_CHECK_DRY_FAIL="step=rc ..." then makes those steps fail with that exit code.
# The device machine has no network: missing pure-Python wheels travel in .whl/ (expecttest, for opcheck).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
RES="$OUT/gpu_check"
SUMMARY="$OUT/summary.md"
rm -rf "$RES"
mkdir -p "$RES/tests"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
DRY="${GPU_CHECK_DRY_RUN:-}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-460}"
JOBS="${GPU_CHECK_JOBS:-6}"
FILE_LIMIT_S=150
TESTS_PHASE_S=170
MAX_RESUMES=2        # a file is resumed past at most this many crashing tests
PER_TEST_TIMEOUT_S=120
START=$(date +%s)
DEADLINE=$(( START + BUDGET_S ))
FAILED=()

# Prefer the system compiler when there is one (CXX set by the caller wins): built with /opt/gcc/bin/g++,
# the default on the H200 image of bench/results/gpu-h200-2026-11-27, the CUDA ops crash (SIGSEGV)
# whenever a TORCH_CHECK message formats a number, while messages that format dtypes or devices raise
# cleanly. Suspected cause, not verified: that compiler's libstdc++ headers are newer than the libstdc++
# loaded at run time, and number formatting goes through the locale's num_put facet.
if [ -z "${CXX:-}" ] && [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi

now() { date +%s; }

# run_limited NAME LIMIT_S COMMAND...: the command under `timeout` (its whole process group is killed at
# the limit, KILL 10 s after TERM), or in a dry run the command printed and GPU_CHECK_DRY_FAIL's exit code.
run_limited() {
  local name=$1 limit=$2; shift 2
  if [ -n "$DRY" ]; then
    echo "DRY [$name, ${limit}s]: $*"
    local rc=0 entry
    for entry in ${GPU_CHECK_DRY_FAIL:-}; do [ "${entry%%=*}" = "$name" ] && rc=${entry#*=}; done
    # A simulated crash names a test the way pytest -v does, unless this is the resumed run past it.
    if (( rc > 128 )) && [[ "$*" == *pytest* ]]; then
      [[ "$*" == *--deselect* ]] && return 0
      echo "${*: -1}::test_dry_crash Fatal Python error: Segmentation fault"
    fi
    return "$rc"
  fi
  timeout -k 10 "$limit" "$@"
}

# limit_for LIMIT_S: LIMIT_S, cut to the time left before the deadline (0: none left).
limit_for() {
  local left=$(( DEADLINE - $(now) ))
  (( left < 0 )) && left=0
  echo $(( $1 < left ? $1 : left ))
}

summary_row() { printf '| %s | %s | %ss | %s |\n' "$1" "$2" "$3" "${4:-}" >>"$SUMMARY"; }

# step NAME LIMIT_S COMMAND...: runs the command with its output in $RES/NAME.log, one summary row.
step() {
  local name=$1 limit; limit=$(limit_for "$2"); shift 2
  if (( limit < 5 )); then
    summary_row "$name" "not run" 0 "no time left"; FAILED+=("$name"); return
  fi
  local t0; t0=$(now)
  run_limited "$name" "$limit" "$@" >"$RES/$name.log" 2>&1
  local rc=$? note=""
  (( rc == 124 || rc == 137 )) && note="timed out after ${limit}s"
  summary_row "$name" "$rc" $(( $(now) - t0 )) "$note"
  (( rc != 0 )) && FAILED+=("$name")
  tail -n 25 "$RES/$name.log"
}

# test_file FILE: one pytest process for FILE (run in the background by the pool below). When a test
# kills the process (a signal: segfault, abort), the file runs again with that test deselected, at most
# MAX_RESUMES times, so the tests after it still report. Writes $RES/tests/NAME.log and NAME.status
# ("exit|seconds|pytest's result line|crashed tests"); the exit is the first failure's.
test_file() {
  local f=$1 name; name=$(basename "$f" .py)
  local log="$RES/tests/$name.log" t0; t0=$(now)
  local rc=0 first_rc=0 crashed="" deselect=() try line node limit
  : >"$log"
  for (( try = 0; try <= MAX_RESUMES; try++ )); do
    limit=$(( FILE_LIMIT_S - ($(now) - t0) ))
    (( limit > TESTS_DEADLINE - $(now) )) && limit=$(( TESTS_DEADLINE - $(now) ))
    if (( limit < 5 )); then
      echo "=== no time left for this file" >>"$log"; rc=124
    else
      (( try > 0 )) && echo "=== resumed past ${crashed##* }" >>"$log"
      run_limited "tests_$name" "$limit" "$PY" -m pytest -v -p no:cacheprovider --durations=10 \
        "${TIMEOUT_OPTS[@]}" "${deselect[@]}" "$f" >>"$log" 2>&1
      rc=$?
    fi
    (( first_rc == 0 )) && first_rc=$rc
    case $rc in 132|134|135|136|139) ;; *) break ;; esac   # SIGILL, SIGABRT, SIGBUS, SIGFPE, SIGSEGV
    # pytest -v writes a test's node id when it starts and its outcome when it ends: the crashed test is
    # the last node id without an outcome.
    line=$(grep -aE "^$f::" "$log" | tail -n 1)
    node=${line%% *}
    [ -z "$node" ] && break                                            # crashed before any test started
    [[ "$line" =~ (PASSED|FAILED|SKIPPED|XFAIL|XPASS|ERROR)\ +\[ ]] && break  # crashed between tests
    [[ " $crashed " == *" $node "* ]] && break                         # the deselection did not take
    crashed="$crashed $node"
    deselect+=(--deselect "$node")
  done
  local result; result=$(grep -aE "(passed|failed|errors?|skipped|deselected|no tests ran).* in [0-9.]+s" "$log" \
                         | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')
  echo "$first_rc|$(( $(now) - t0 ))|$result|${crashed# }" >"$RES/tests/$name.status"
}

# ---------------------------------------------------------------------------------------------------------
if [ -z "$DRY" ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)${DRY:+ (dry run: commands printed, not run)}"
  echo
  echo '```'
  if [ -z "$DRY" ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
    $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
      'cuda', torch.version.cuda, 'triton', triton.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')" 2>&1
  fi
  # The device machine gets a copy of the working tree without .git: the caller may name the commit.
  commit="${GPU_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"
  if [ -z "${GPU_CHECK_COMMIT:-}" ] && [ -n "$commit" ] && ! git diff --quiet HEAD 2>/dev/null; then
    commit="$commit (with uncommitted changes)"
  fi
  echo "commit ${commit:-unknown}; compiler ${CXX:-$(command -v c++)}; budget ${BUDGET_S}s"
  echo '```'
  echo
  echo '| step | exit | time | note |'
  echo '| --- | --- | --- | --- |'
} >"$SUMMARY"

export CBKERNELS_BUILD_CUDA=1 CBKERNELS_CUDA_ARCH="${CBKERNELS_CUDA_ARCH:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
step build 150 "$PY" setup.py build_ext --inplace
# The GPU and both GPU backends must be there: without them the tests would skip their CUDA cases and pass.
step info 20 "$PY" -c "
import sys, torch, cbkernels
from cbkernels import _ops
print('cbkernels', cbkernels.__version__, 'torch', torch.__version__, 'extension:', _ops.extension_error() or 'loaded')
backends = cbkernels.available_backends('cuda') if torch.cuda.is_available() else []
print('device:', torch.cuda.get_device_name() if backends else 'no CUDA device', 'backends on cuda:', backends)
missing = sorted({'cuda', 'triton'} - set(backends))
sys.exit(f'not available on CUDA tensors: {missing}' if missing else 0)"

# --- 2. the test suite ------------------------------------------------------------------------------------
export CBKERNELS_SLOW=1
unset TRITON_INTERPRET
# Several pytest processes share the 16 cores: each gets an equal share of CPU threads, as oversubscribed
# OpenMP threads spin at barriers.
export OMP_NUM_THREADS=$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))
TIMEOUT_OPTS=()
if [ -n "$DRY" ] || $PY -c "import pytest_timeout" 2>/dev/null; then
  TIMEOUT_OPTS=(--timeout="$PER_TEST_TIMEOUT_S")  # a hung test fails with its stack instead of eating the file's time
fi
if [ -n "${GPU_CHECK_FILES:-}" ]; then
  read -r -a FILES <<<"$GPU_CHECK_FILES"
else
  # The known long files first (longest first keeps the pool's end near the longest file's time); the
  # logs' --durations lists show what to move up here.
  FILES=()
  for name in test_triton_backend test_scale test_determinism test_cuda_backend test_compile test_cuda_compile \
              test_properties test_numerics test_bad_inputs test_linear; do
    [ -f "tests/$name.py" ] && FILES+=("tests/$name.py")
  done
  for f in tests/test_*.py bench/test_*.py; do
    [[ " ${FILES[*]} " == *" $f "* ]] || FILES+=("$f")
  done
fi
TESTS_START=$(now)
TESTS_DEADLINE=$(( TESTS_START + $(limit_for "$TESTS_PHASE_S") ))
for f in "${FILES[@]}"; do
  while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done
  test_file "$f" &
done
wait
for f in "${FILES[@]}"; do
  name=$(basename "$f" .py)
  [ -f "$RES/tests/$name.status" ] || echo "1|0|no status written (its runner failed)|" >"$RES/tests/$name.status"
  IFS='|' read -r rc secs result crashed <"$RES/tests/$name.status"
  note="$result"
  [ -n "$crashed" ] && note="crashed (exit $rc) in: $crashed${result:+; after resuming: $result}"
  (( rc == 124 || rc == 137 )) && note="timed out${result:+; $result}"
  summary_row "$f" "$rc" "$secs" "$note"
  (( rc != 0 && rc != 5 )) && FAILED+=("$f")   # 5: pytest collected no test
done
echo "tests: ${#FILES[@]} files in $(( $(now) - TESTS_START ))s, $JOBS at a time"

if [ "${GPU_CHECK_ONLY:-}" != tests ]; then
  # --- 3. the benchmark: --budget-s leaves each run time to write its results before its limit -----------
  unset OMP_NUM_THREADS CBKERNELS_SLOW
  limit=$(limit_for 95)
  step bench_inat 95 "$PY" -m cbkernels bench --device cuda --preset inat --strict --out "$RES/bench_inat" \
    --budget-s $(( limit > 40 ? limit - 35 : 5 ))
  # The class sweep for the "no cliff" target: the kernels and the plain-PyTorch peers, no compiling.
  limit=$(limit_for 55)
  step bench_classes 55 "$PY" -m cbkernels bench --device cuda --preset sweep --strict --no-memory \
    --exclude compiled,naive,liger --out "$RES/bench_classes" --budget-s $(( limit > 25 ? limit - 20 : 5 ))
  # --- 4. the launch-configuration sweeps -------------------------------------------------------------
  limit=$(limit_for 45)
  step sweep_triton 45 "$PY" bench/sweep_triton.py --out "$RES/sweep_triton.json" \
    --budget-s $(( limit > 15 ? limit - 10 : 5 ))
  limit=$(limit_for 35)
  step sweep_cuda 35 "$PY" bench/sweep_cuda.py --out "$RES/sweep_cuda.json" \
    --budget-s $(( limit > 15 ? limit - 10 : 5 ))
  if [ -f bench/bench_linear.py ] && (( $(limit_for 40) >= 40 )); then
    step bench_linear 40 "$PY" bench/bench_linear.py --device cuda --out "$RES/linear.json" --budget-s 30
  else
    summary_row bench_linear "not run" 0 "optional: run only when 40 s are left"
  fi
fi

for bench in bench_inat bench_classes; do
  if [ -f "$RES/$bench/targets.md" ]; then
    printf '\n## Targets, %s (from %s/targets.md)\n\n' "$bench" "$bench" >>"$SUMMARY"
    cat "$RES/$bench/targets.md" >>"$SUMMARY"
  fi
done
{
  echo
  echo "total $(( $(now) - START ))s"
  if (( ${#FAILED[@]} > 0 )); then echo "FAILED: ${FAILED[*]}"; else echo "every step passed"; fi
} >>"$SUMMARY"
tar -czf "$OUT/gpu_check.tar.gz" -C "$OUT" gpu_check
rm -rf "$RES"
cat "$SUMMARY"
(( ${#FAILED[@]} == 0 ))
