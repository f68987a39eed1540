#!/usr/bin/env bash
# Memory-safety check of the CPU kernels: build cbkernels._C with AddressSanitizer + UBSan
# (setup.py's CBKERNELS_SANITIZE=1) in a private copy of the working tree, so the normal in-place build
# is untouched, then run the bad-input and property tests (their CPU-backend and raw-op cases) under it.
#
#   tools/asan_check.sh [extra pytest args...]     e.g. tools/asan_check.sh tests/test_numerics.py
#
# Environment: PYTHON (default .venv/bin/python), ASAN_WORKDIR (default: a fresh /tmp directory,
# removed on success). Python itself is not instrumented, so libasan is LD_PRELOADed, and leak detection
# is off (the interpreter keeps its allocations until exit by design). Exit status 0 only when the build
# succeeds, no sanitizer report appears and the selected tests pass. The -O1 -g build takes ~5 minutes
# on 2 cores (the AVX2 and AVX-512 variants of every kernel template).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
WORK=${ASAN_WORKDIR:-$(mktemp -d /tmp/cbkernels-asan.XXXXXX)}
LOG="$WORK/asan_check.log"

echo "asan_check: copying the working tree to $WORK"
mkdir -p "$WORK"
# Tracked and untracked-but-not-ignored files: the kernels under test may not be committed yet.
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - --ignore-failed-read) \
    | tar -xf - -C "$WORK"
rm -f "$WORK"/cbkernels/_C*.so

echo "asan_check: building cbkernels._C with -fsanitize=address,undefined (log: $WORK/build.log)"
if ! (cd "$WORK" && CBKERNELS_SANITIZE=1 CBKERNELS_BUILD_CUDA=0 "$PY" setup.py -q build_ext --inplace) \
        >"$WORK/build.log" 2>&1; then
    tail -n 30 "$WORK/build.log"
    echo "asan_check: VERDICT: BUILD FAILED"
    exit 2
fi

# Sanitizer reports go to files: pytest's output capture would lose a report printed as the process dies.
REPORTS="$WORK/sanitizer"
# libasan first; libstdc++ right after it, or ASan's __cxa_throw interceptor finds no real symbol (the
# python binary does not link libstdc++) and the first C++ exception (any TORCH_CHECK) dies with
# "CHECK failed: asan_interceptors.cpp:320 ... real___cxa_throw".
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:print_summary=1:log_path=$REPORTS"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$REPORTS"
export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"
cd "$WORK"

# The copy must shadow the editable install of the main checkout, or this checks the wrong binary.
"$PY" - <<PY
import cbkernels._C as c, cbkernels._ops as ops
assert c.__file__.startswith("$WORK"), f"imported {c.__file__}, not the sanitized build"
assert ops.extension_has_kernel("CPU"), "the sanitized build has no CPU kernels (csrc/cpu/*.cpp missing?)"
print("asan_check: testing", c.__file__)
PY

echo "asan_check: running the tests (log: $LOG)"
set +e
"$PY" -m pytest -q -p no:cacheprovider -k "cpu or raw_ops" \
    tests/test_bad_inputs.py tests/test_properties.py "$@" >"$LOG" 2>&1
status=$?
set -e
tail -n 15 "$LOG"

if compgen -G "$REPORTS.*" >/dev/null; then
    for report in "$REPORTS".*; do
        echo "---- $report"
        grep -E -m1 "ERROR: AddressSanitizer|runtime error:|CHECK failed" "$report" || head -n 3 "$report"
        grep -E "^    #[0-9]+ " "$report" | grep -v -E "Python/|Objects/|Include/" | head -n 12
    done
    echo "asan_check: VERDICT: SANITIZER REPORT(S) in $REPORTS.* (test log: $LOG)"
    exit 1
fi
if [ "$status" -ne 0 ]; then
    echo "asan_check: VERDICT: no sanitizer report, but pytest exited $status (full log: $LOG)"
    exit 1
fi
echo "asan_check: VERDICT: CLEAN (no AddressSanitizer or UBSan report; tests passed)"
[ -n "${ASAN_WORKDIR:-}" ] || rm -rf "$WORK"
