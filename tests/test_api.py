"""The public API: argument checking, backend choice, dtypes, the module's buffer.

Every registered loss (losses.LOSSES) is reached through its public function, cbkernels.<spec.function>;
random inputs come from torch's global generator, seeded per test by tests/conftest.py.
"""
import os
import subprocess
import sys

import pytest
import torch

import cbkernels as cb
from cbkernels import _backends, losses

# The public function of every registered loss (arguments after class_weight by keyword: their order differs).
LOSSES = [pytest.param(getattr(cb, spec.function), id=spec.name) for spec in losses.LOSSES]


def _non_default_case(spec):
    """A setting of the loss's hyperparameters where each is nonzero ({} for one without any)."""
    return next(case for case in spec.test_cases() if all(value != 0 for value in case.values()))


def _inputs(n=4, c=5, dtype=torch.float32):
    return torch.randn(n, c, dtype=dtype), torch.randint(0, c, (n,)), torch.rand(c) + 0.5


def test_every_registered_loss_is_public():
    for spec in losses.LOSSES:
        assert spec.function in cb.__all__ and callable(getattr(cb, spec.function)), spec.name
    assert losses.LOSS_TYPES == tuple(spec.name for spec in losses.LOSSES)


@pytest.mark.parametrize("loss", LOSSES)
def test_bad_inputs_name_the_argument(loss):
    x, t, w = _inputs()
    cases = [
        ((x[0], t, w), {}, ValueError, "logits must have shape"),
        ((x, t[:3], w), {}, ValueError, "target must have shape"),
        ((x, t.float(), w), {}, TypeError, "target must hold class indices"),
        ((x.int(), t, w), {}, TypeError, "logits must be float"),
        ((x, t, w[:4]), {}, ValueError, "class_weight must have shape"),
        ((x, t, w.long()), {}, TypeError, "class_weight must be a floating-point"),
        ((x, t, w), {"reduction": "avg"}, ValueError, "reduction must be one of"),
        ((x, t, w), {"backend": "tpu"}, ValueError, "backend must be one of"),
        ((x, t, w), {"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
        ((x[:, :0], t, None), {}, ValueError, "at least one class"),
        (([[1.0]], t, w), {}, TypeError, "logits must be a torch.Tensor"),
    ]
    for args, kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            loss(*args, **kwargs)


def test_gamma_and_label_smoothing_checks():
    x, t, w = _inputs()
    for gamma in (-0.5, float("nan"), float("inf"), "2"):
        with pytest.raises(ValueError, match="gamma"):
            cb.cb_focal_loss(x, t, w, gamma=gamma)
    for eps in (-0.1, 1.5):
        with pytest.raises(ValueError, match="label_smoothing"):
            cb.cb_softmax_cross_entropy(x, t, w, label_smoothing=eps)


@pytest.mark.parametrize("loss", LOSSES)
def test_out_of_range_target_is_an_error(loss):
    x, _, w = _inputs()
    for bad in ([0, 1, 2, 5], [0, -1, 2, 3]):
        with pytest.raises(RuntimeError, match=r"outside \[0, C\)|not a class index in \[0, 5\)"):
            loss(x, torch.tensor(bad), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("loss", LOSSES)
def test_output_dtypes(loss, dtype):
    x, t, w = _inputs(dtype=dtype)
    x.requires_grad_(True)
    out = loss(x, t, w)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    out.backward()
    assert x.grad.dtype == dtype
    assert loss(x, t, w, reduction="none").shape == (4,)


@pytest.mark.parametrize("loss", LOSSES)
def test_empty_batch(loss):
    x = torch.randn(0, 5, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    out = loss(x, t)
    assert out.item() == 0
    out.backward()
    assert x.grad.shape == (0, 5)


def test_unknown_and_unavailable_backends():
    x, t, w = _inputs()
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        cb.cb_focal_loss(x, t, w, backend="cuda")
    assert "reference" in cb.available_backends("cpu")


def test_kernel_backend_rejects_float64():
    if "cpu" not in cb.available_backends("cpu"):
        pytest.skip("the C++ extension is not built here")
    x, t, w = _inputs()
    with pytest.raises(TypeError, match="float64"):
        cb.cb_focal_loss(x.double(), t, w, backend="cpu")


def test_auto_picks_fastest_available_and_env_forces(monkeypatch):
    x, _, _ = _inputs()
    monkeypatch.delenv("CBKERNELS_BACKEND", raising=False)
    expected = "cpu" if "cpu" in cb.available_backends("cpu") else "reference"
    assert _backends.resolve("auto", x).name == expected
    assert _backends.resolve("auto", x) is _backends.get(expected)
    assert _backends.resolve("auto", x.double()).name == "reference"
    monkeypatch.setenv("CBKERNELS_BACKEND", "reference")
    assert _backends.resolve("auto", x).name == "reference"
    monkeypatch.setenv("CBKERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="CBKERNELS_BACKEND"):
        _backends.resolve("auto", x)


def test_import_without_extension(tmp_path):
    # `import cbkernels` must work when _C is missing: block it with a meta-path finder in a subprocess.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'cbkernels._C': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, cbkernels\n"
        "assert cbkernels.available_backends('cpu') == ['reference'], cbkernels.available_backends('cpu')\n"
        "x = torch.randn(3, 4, requires_grad=True)\n"
        "cbkernels.cb_focal_loss(x, torch.tensor([0, 1, 3])).backward()\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


class TestModule:
    def test_weights_buffer_and_forward(self):
        counts = [500, 100, 20, 4]
        m = cb.ClassBalancedLoss(counts, loss_type="focal", beta=0.99, gamma=2.0)
        torch.testing.assert_close(m.class_weight, cb.class_balanced_weights(counts, 0.99))
        assert "class_weight" in m.state_dict()
        x, t = torch.randn(6, 4), torch.randint(0, 4, (6,))
        torch.testing.assert_close(m(x, t), cb.cb_focal_loss(x, t, m.class_weight, gamma=2.0))
        assert "num_classes=4" in repr(m)

    @pytest.mark.parametrize("spec", losses.LOSSES, ids=lambda spec: spec.name)
    def test_loss_types(self, spec):
        counts = [50, 5, 1]
        hyper = _non_default_case(spec)
        m = cb.ClassBalancedLoss(counts, loss_type=spec.name, beta=0.9, reduction="sum", **hyper)
        assert m.hyperparameters() == hyper
        x, t = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, -100])
        w = cb.class_balanced_weights(counts, 0.9)
        expected = getattr(cb, spec.function)(x, t, w, reduction="sum", **hyper)
        torch.testing.assert_close(m(x, t), expected)
        # The module's value is the spec's, at its own hyperparameters (not the public defaults).
        torch.testing.assert_close(m(x.double(), t), spec.reference(x.double(), t, w, "sum", **hyper))

    def test_buffer_follows_to_and_load_state_dict(self):
        m = cb.ClassBalancedLoss([10, 1], beta=0.9)
        assert m.double().class_weight.dtype == torch.float64
        m2 = cb.ClassBalancedLoss([1, 10], beta=0.9)
        m2.load_state_dict(m.float().state_dict())
        torch.testing.assert_close(m2.class_weight, m.class_weight)
        if torch.cuda.is_available():
            assert m.cuda().class_weight.is_cuda

    def test_bad_module_arguments(self):
        with pytest.raises(ValueError, match="loss_type"):
            cb.ClassBalancedLoss([1, 2], loss_type="hinge")
        with pytest.raises(ValueError, match="backend"):
            cb.ClassBalancedLoss([1, 2], backend="gpu")
        with pytest.raises(ValueError, match="0 samples"):
            cb.ClassBalancedLoss([1, 0])
        m = cb.ClassBalancedLoss([1, 0], empty_classes="zero")
        assert m.class_weight[1] == 0

    def test_num_classes_mismatch(self):
        m = cb.ClassBalancedLoss([10, 5, 1])
        with pytest.raises(ValueError, match="class_weight must have shape"):
            m(torch.randn(2, 4), torch.tensor([0, 1]))


@pytest.mark.parametrize("spec", losses.LOSSES, ids=lambda spec: spec.name)
def test_reference_backend_compiles_without_graph_breaks(spec):
    model = torch.nn.Linear(6, 5)
    w = torch.rand(5) + 0.5
    loss, hyper = getattr(cb, spec.function), _non_default_case(spec)

    def step(x, t):
        return loss(model(x), t, w, backend="reference", **hyper)

    x, t = torch.randn(8, 6), torch.tensor([0, 1, 2, 3, 4, -100, 0, 4])
    eager = step(x, t)
    compiled = torch.compile(step, fullgraph=True)(x, t)
    torch.testing.assert_close(compiled, eager)
