# The README's two commands are `make demo` and `make test`. Each creates (or reuses) the local virtual
# environment .venv, installs what it needs (torch==2.13.0 when the venv has no torch: the CPU wheel),
# builds the C++ extension in place, then runs.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.cbkernels-installed
TRITON_PIN := triton==3.8.0

.PHONY: venv build test demo bench wheel-check gpu-check audit clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install torch==2.13.0
	$(VPY) -m pip install "$(TRITON_PIN)" pytest pytest-benchmark pytest-timeout pytest-xdist hypothesis expecttest \
	    scikit-learn matplotlib tqdm numpy packaging ninja setuptools wheel
	CBKERNELS_NO_EXTENSION=1 $(VPY) -m pip install --no-build-isolation --no-deps -e .
	touch $(STAMP)

# Incremental (ninja) build of cbkernels/_C*.so next to the sources.
build: venv
	$(VPY) setup.py -q build_ext --inplace

# One pytest worker per core (pytest-xdist): most tests are single-threaded Python (Triton's interpreter, small
# tensors), so a second core otherwise sits idle for most of the suite. TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= auto
test: build
	$(VPY) -m pytest -q -n $(TEST_WORKERS)

demo: build
	$(VPY) -m cbkernels demo

bench: build
	$(VPY) -m cbkernels bench --preset inat

# A wheel of the project installed into a fresh venv beside the CPU torch, smoke-tested from outside the tree.
wheel-check: build
	bash tools/wheel_check.sh $(VPY)

# Static GPU audit, no GPU needed: compiles every shipped kernel variant for sm_90 and checks the gates of
# docs/roofline.md (the CUDA half is reported as skipped where nvcc is missing).
audit: build
	mkdir -p build
	$(VPY) -m cbkernels audit --arch sm_90 --json build/audit.json

# On a lent GPU machine, in under 8 minutes (tools/gpu_check.sh; what it needs: pyproject's gpu-check extra):
# build with CUDA, the whole test suite with CUDA, the benchmark (eager and CUDA-graph replay), the sweeps
# -> $$OUT/summary.md and $$OUT/gpu_check.tar.gz; exits 1 if any step failed. GPU_CHECK_DRY_RUN=1 prints the steps.
gpu-check:
	bash tools/gpu_check.sh

clean:
	rm -rf build cbkernels/_C*.so
