#!/usr/bin/env bash
# Packaging as a user meets it: build a wheel of the project (no make), install it into a fresh virtual
# environment beside the CPU torch, and run tools/smoke_installed.py from outside the source tree.
# Usage: tools/wheel_check.sh [python with torch, used for the build; default .venv/bin/python]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_PY=${1:-.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# --no-build-isolation: the extension compiles against the torch already installed (an isolated build
# would download a second, multi-GB torch); the in-tree build reuses build/'s objects.
"$BUILD_PY" -m pip wheel --no-build-isolation --no-deps -q -w "$WORK/dist" .
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 numpy packaging 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
"$WORK/venv/bin/python" -m pip install -q --no-deps "$WORK"/dist/cbkernels-*.whl
# Run from $WORK: the script's own folder (tools/) and the working directory hold no cbkernels package.
SMOKE=$(pwd)/tools/smoke_installed.py
(cd "$WORK" && "$WORK/venv/bin/python" "$SMOKE")
