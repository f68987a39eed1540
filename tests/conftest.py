import os

import pytest
import torch

# Triton's interpreter must be chosen before triton is first imported: on a machine without a GPU the
# Triton backend is tested on CPU tensors through it. On a GPU machine the real compiler runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device; run by `make gpu-check` on a GPU machine")
    no_slow = pytest.mark.skip(reason="slow; set CBKERNELS_SLOW=1 to run")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "slow" in item.keywords and os.environ.get("CBKERNELS_SLOW") != "1":
            item.add_marker(no_slow)
