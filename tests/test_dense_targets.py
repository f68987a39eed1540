"""Dense (N, C) targets and weighting="row" | "element" (docs/math.md, section 14) on every loss and backend.

Two oracles:
- hand_losses.general_hand_rows: the issue's formulas in plain Python floats (the official code's soft-target
  focal term written literally), which the reference must match;
- the reference (float64, autograd for the gradient), which every kernel backend must match on every loss x
  weighting x target kind x reduction x dtype, with sample weights and a normalizer.
PyTorch's own losses pin the "element" convention: F.cross_entropy(weight=w, label_smoothing=eps) with class
indices and with probability targets, F.binary_cross_entropy_with_logits(weight=w).
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import cbkernels as cb
from cases import DTYPES, REDUCTIONS, assert_grad_close, assert_loss_close, loss_cases, make_inputs
from cbkernels import losses
from hand_losses import general_hand_rows

IGNORE = -100
WEIGHTINGS = ("row", "element")
TARGET_KINDS = ("index", "multi_hot", "soft", "mixup")


def make_target(kind, spec, n, c, generator, device):
    """Targets of `kind`: class indices (some ignored), multi-hot rows (one with no positive class), soft rows
    (the sigmoid losses: independent values in [0, 1]; the softmax losses: rows summing to 1), or mixup rows
    lam * onehot(a) + (1 - lam) * onehot(b) (one a zero row, one a pure one-hot)."""
    if kind == "index":
        _, target, _ = make_inputs(n, c, torch.float32, device, generator=generator)
        return target
    if kind == "multi_hot":
        target = (torch.rand(n, c, generator=generator) < 0.3).double()
        target[0] = 0.0
    elif kind == "soft":
        target = torch.rand(n, c, generator=generator, dtype=torch.float64)
        if spec.family.name != "sigmoid_focal":
            target = target / target.sum(dim=1, keepdim=True)
    else:
        lam = torch.rand(n, 1, generator=generator, dtype=torch.float64)
        a, b = torch.randint(0, c, (n,), generator=generator), torch.randint(0, c, (n,), generator=generator)
        target = lam * F.one_hot(a, c) + (1 - lam) * F.one_hot(b, c)
        target[0] = 0.0
        target[-1] = F.one_hot(b[-1], c)
    return target.to(device)


def _dense_in(target, dtype):
    """A dense target rounded to the logits' dtype, as the API reads it (the oracle sees the same values)."""
    return target.to(dtype) if target.dim() == 2 else target


def _expected(spec, hyper, logits, target, weight, weighting, reduction, sample_weight, normalizer, upstream):
    z = logits.detach().double().cpu().requires_grad_(True)
    target = target.cpu().double() if target.dim() == 2 else target.cpu()
    out = spec.reference(z, target, None if weight is None else weight.double().cpu(), reduction, IGNORE,
                         sample_weight=None if sample_weight is None else sample_weight.double().cpu(),
                         normalizer=normalizer, weighting=weighting, **hyper)
    (grad,) = torch.autograd.grad(out, z, upstream.double().reshape(out.shape))
    return out.detach(), grad


SMOOTHED_CASES = loss_cases(full=False) + loss_cases(where=lambda spec, hyper: hyper.get("label_smoothing", 0) > 0)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("kind", TARGET_KINDS)
@pytest.mark.parametrize("spec,hyper", SMOOTHED_CASES)
def test_reference_matches_the_formulas_by_hand(spec, hyper, kind, weighting):
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 9, generator=generator, dtype=torch.float64) * 3
    target = make_target(kind, spec, 6, 9, generator, "cpu")
    weight = torch.rand(9, generator=generator, dtype=torch.float64) + 0.1
    for class_weight in (weight, None):
        got = spec.reference(logits, target, class_weight, "none", IGNORE, weighting=weighting, **hyper)
        expected = torch.tensor(general_hand_rows(spec, logits, target, class_weight, weighting, IGNORE, hyper),
                                dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", TARGET_KINDS[1:])
@pytest.mark.parametrize("spec,hyper", SMOOTHED_CASES)
def test_reference_gradient_passes_gradcheck(spec, hyper, kind):
    generator = torch.Generator().manual_seed(9)
    logits = (torch.randn(3, 5, generator=generator, dtype=torch.float64) * 2).requires_grad_(True)
    target = make_target(kind, spec, 3, 5, generator, "cpu")
    weight = torch.rand(5, generator=generator, dtype=torch.float64) + 0.1
    for weighting in WEIGHTINGS:
        assert torch.autograd.gradcheck(
            lambda x: spec.reference(x, target, weight, "sum", IGNORE, weighting=weighting, **hyper), (logits,))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec,hyper", SMOOTHED_CASES)
def test_every_backend_matches_the_reference(backend, spec, hyper, dtype, reduction):
    """Every target kind and weighting, with and without class weights, sample weights and a normalizer."""
    n, c = (4, 7) if backend.max_elements < 10_000 else (6, 1031)
    generator = torch.Generator().manual_seed(17)
    logits = (torch.randn(n, c, generator=generator) * 3).to(dtype).to(backend.device)
    weight = (torch.rand(c, generator=generator) * 2 + 0.1).to(backend.device)
    sample_weight = (torch.rand(n, generator=generator) * 2).to(backend.device)
    fn = getattr(cb, spec.function)
    for kind in TARGET_KINDS:
        target = _dense_in(make_target(kind, spec, n, c, generator, backend.device), dtype)
        for weighting in WEIGHTINGS:
            for class_weight, rows_weight, normalizer in ((weight, None, None), (None, sample_weight, None),
                                                          (weight, sample_weight, 3.5)):
                if normalizer is not None and reduction != "mean":
                    normalizer = None
                upstream = torch.randn(n if reduction == "none" else 1, generator=generator, dtype=torch.float64)
                x = logits.detach().requires_grad_(True)
                out = fn(x, target, class_weight, reduction=reduction, backend=backend.name, weighting=weighting,
                         sample_weight=rows_weight, normalizer=normalizer, **hyper)
                (grad,) = torch.autograd.grad(out, x, upstream.to(out.dtype).to(out.device).reshape(out.shape))
                expected, expected_grad = _expected(spec, hyper, logits, target, class_weight, weighting, reduction,
                                                    rows_weight, normalizer, upstream)
                what = (f"{backend.id} {spec.name} {hyper} {dtype} {reduction} {kind} {weighting} "
                        f"w={class_weight is not None} sw={rows_weight is not None} normalizer={normalizer}")
                assert_loss_close(out, expected, f"{what} loss")
                assert_grad_close(grad, expected_grad, dtype, f"{what} grad")


@pytest.mark.parametrize("spec,hyper", loss_cases())
def test_every_hyperparameter_with_dense_targets_and_element_weights(backend, spec, hyper):
    """Each hyperparameter test value (every gamma case of the kernels) on soft targets with element weights,
    and on class indices with element weights, under the pair's launch configurations (Triton: small tiles,
    so that C spans several tiles and the streamed softmax runs; CUDA: its table and the streaming kernels)."""
    n, c = (3, 33) if backend.max_elements < 10_000 else (5, 70001)
    backend.require(n, c)
    generator = torch.Generator().manual_seed(23)
    logits = (torch.randn(n, c, generator=generator, dtype=torch.float64) * 4).to(backend.device)
    weight = (torch.rand(c, generator=generator) + 0.1).to(backend.device)
    fn = getattr(cb, spec.function)
    for override in backend.configs():
        with override as config:
            for kind in ("soft", "index"):
                target = make_target(kind, spec, n, c, generator, backend.device)
                for weighting in WEIGHTINGS:
                    x = logits.float().detach().requires_grad_(True)
                    out = fn(x, target, weight, reduction="sum", backend=backend.name, weighting=weighting,
                             **hyper)
                    (grad,) = torch.autograd.grad(out, x)
                    expected, expected_grad = _expected(spec, hyper, x, target, weight, weighting, "sum", None,
                                                        None, torch.ones(()))
                    what = f"{backend.id} {spec.name} {hyper} {kind} {weighting} config {config}"
                    assert_loss_close(out, expected, f"{what} loss")
                    assert_grad_close(grad, expected_grad, torch.float32, f"{what} grad")


def test_every_op_takes_dense_targets_and_element_weights(backend):
    """The op contract: forward (with and without the fused gradient) and backward ops of every family take a
    dense target in the logits' dtype and element_weight (C,) as their last input."""
    if not backend.is_kernel:
        pytest.skip("the reference backend has no ops")
    ops = getattr(torch.ops, backend.record.namespace)
    generator = torch.Generator().manual_seed(29)
    n, c = 4, 13
    logits = (torch.randn(n, c, generator=generator) * 3).to(backend.device)
    weight = (torch.rand(c, generator=generator) + 0.1).to(backend.device)
    element_weight = (torch.rand(c, generator=generator) + 0.1).to(backend.device)
    sample_weight = (torch.rand(n, generator=generator) + 0.5).to(backend.device)
    grad_loss = torch.randn(n, generator=generator).to(backend.device)
    for family in losses.FAMILIES:
        spec = next(s for s in losses.LOSSES if s.family is family)
        hyper = tuple(h.test_values[1] for h in family.hyperparameters)
        for target in (make_target("soft", spec, n, c, generator, backend.device).float(),
                       make_target("index", spec, n, c, generator, backend.device)):
            args = dict(sample_weight=sample_weight, element_weight=element_weight)
            loss, grad = family.op(ops, "forward")(logits, target, weight, *hyper, IGNORE, True, **args)
            loss_only, empty = family.op(ops, "forward")(logits, target, weight, *hyper, IGNORE, False, **args)
            back = family.op(ops, "backward")(logits, target, weight, grad_loss, *hyper, IGNORE, **args)
            z = logits.detach().double().cpu().requires_grad_(True)
            named = {h.name: v for h, v in zip(family.hyperparameters, hyper)}
            cpu_target = target.cpu().double() if target.dim() == 2 else target.cpu()
            rows = family.reference_rows(z, cpu_target, weight.cpu().double(), IGNORE, **named,
                                         element_weight=element_weight.cpu().double())
            rows = torch.where(cpu_target != IGNORE, rows * sample_weight.double().cpu(), 0.0) \
                if target.dim() == 1 else rows * sample_weight.double().cpu()
            (ref_grad,) = torch.autograd.grad(rows.sum(), z, retain_graph=True)
            (ref_back,) = torch.autograd.grad(rows, z, grad_loss.double().cpu())
            what = f"{backend.id} {family.name} target {tuple(target.shape)}"
            assert_loss_close(loss, rows.detach(), f"{what} op loss")
            assert_loss_close(loss_only, rows.detach(), f"{what} op loss without gradient")
            assert empty.numel() == 0
            assert_grad_close(grad, ref_grad, torch.float32, f"{what} op grad")
            assert_grad_close(back, ref_back, torch.float32, f"{what} op backward")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_element_weighting_is_pytorchs_weight_convention(backend, label_smoothing):
    """weighting="element", reduction="sum": F.cross_entropy(weight=w, label_smoothing=eps) with class indices
    and with probability rows, and F.binary_cross_entropy_with_logits(weight=w) with multi-hot rows."""
    generator = torch.Generator().manual_seed(31)
    n, c = 5, 8
    logits = (torch.randn(n, c, generator=generator, dtype=torch.float64) * 2).float().to(backend.device)
    weight = (torch.rand(c, generator=generator) + 0.1).to(backend.device)
    index = torch.randint(0, c, (n,), generator=generator).to(backend.device)
    probabilities = torch.softmax(torch.randn(n, c, generator=generator), dim=1).to(backend.device)
    for target in (index, probabilities):
        got = cb.cb_softmax_cross_entropy(logits, target, weight, reduction="sum", weighting="element",
                                          label_smoothing=label_smoothing, backend=backend.name)
        expected = F.cross_entropy(logits.double(), target.double() if target.dim() == 2 else target,
                                   weight=weight.double(), label_smoothing=label_smoothing, reduction="sum")
        assert_loss_close(got, expected, f"{backend.id} softmax element {tuple(target.shape)}")
    multi_hot = (torch.rand(n, c, generator=generator) < 0.4).float().to(backend.device)
    got = cb.cb_sigmoid_cross_entropy(logits, multi_hot, weight, reduction="sum", weighting="element",
                                      backend=backend.name)
    expected = F.binary_cross_entropy_with_logits(logits.double(), multi_hot.double(), weight=weight.double(),
                                                  reduction="sum")
    assert_loss_close(got, expected, f"{backend.id} sigmoid element multi-hot")


@pytest.mark.parametrize("spec,hyper", SMOOTHED_CASES)
def test_one_hot_rows_are_class_indices_and_mean_divides_by_n(backend, spec, hyper):
    """A dense one-hot target gives the class-index loss and gradient under both weightings (no ignored
    rows); "mean" of dense rows is their sum / N."""
    generator = torch.Generator().manual_seed(37)
    n, c = 5, 6
    logits, _, weight = make_inputs(n, c, torch.float32, backend.device, generator=generator)
    index = torch.randint(0, c, (n,), generator=generator).to(backend.device)
    one_hot = F.one_hot(index, c).float()
    fn = getattr(cb, spec.function)
    for weighting in WEIGHTINGS:
        results = []
        for target in (index, one_hot):
            x = logits.detach().requires_grad_(True)
            out = fn(x, target, weight, reduction="mean", backend=backend.name, weighting=weighting, **hyper)
            results.append((out, torch.autograd.grad(out, x)[0]))
        assert_loss_close(results[1][0], results[0][0], f"{backend.id} {spec.name} {weighting} one-hot loss")
        assert_grad_close(results[1][1], results[0][1], torch.float32, f"{backend.id} one-hot grad")
        total = fn(logits, one_hot, weight, reduction="sum", backend=backend.name, weighting=weighting, **hyper)
        assert_loss_close(results[1][0], total / n, f"{backend.id} {spec.name} dense mean")


@pytest.mark.parametrize("spec,hyper", loss_cases(full=False))
def test_nan_logit_gives_nan_row_with_dense_targets(backend, spec, hyper):
    generator = torch.Generator().manual_seed(41)
    logits = torch.randn(3, 5, generator=generator).to(backend.device)
    logits[1, 2] = float("nan")
    target = make_target("soft", spec, 3, 5, generator, backend.device)
    out = getattr(cb, spec.function)(logits, target, None, reduction="none", backend=backend.name, **hyper)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("spec,hyper", loss_cases(full=False))
def test_out_of_range_dense_target_is_an_error_or_nan(backend, spec, hyper):
    """Sigmoid losses take values in [0, 1], softmax losses values >= 0: on CPU tensors a clear error, on a
    GPU (no host sync) a NaN row from the kernel's op."""
    bad = 1.5 if spec.family.name == "sigmoid_focal" else -0.25
    generator = torch.Generator().manual_seed(43)
    logits = torch.randn(3, 5, generator=generator).to(backend.device)
    for value in (bad, float("nan")):
        target = make_target("soft", spec, 3, 5, generator, backend.device)
        target[1, 3] = value
        fn = getattr(cb, spec.function)
        if backend.bad_target_raises and backend.name != "triton":
            with pytest.raises(RuntimeError, match="target"):
                fn(logits, target, None, reduction="none", backend=backend.name, **hyper)
        else:
            out = fn(logits, target, None, reduction="none", backend=backend.name, **hyper)
            assert torch.isnan(out[1]), f"{backend.id}: out-of-range target {value} gave {out[1]}"


def test_module_takes_weighting_and_dense_targets():
    counts = [50, 9, 3, 1]
    generator = torch.Generator().manual_seed(47)
    logits = torch.randn(6, 4, generator=generator)
    target = make_target("soft", losses.loss("focal"), 6, 4, generator, "cpu")
    for weighting in WEIGHTINGS:
        module = cb.ClassBalancedLoss(counts, loss_type="focal", beta=0.99, backend="reference", weighting=weighting)
        expected = cb.cb_focal_loss(logits, target, module.class_weight, backend="reference", weighting=weighting)
        torch.testing.assert_close(module(logits, target), expected)
        assert (weighting == "element") == ("weighting='element'" in repr(module))


def test_dense_targets_compile_fullgraph():
    backend = "cpu" if "cpu" in cb.available_backends("cpu") else "reference"
    generator = torch.Generator().manual_seed(53)
    logits = torch.randn(6, 11, generator=generator)
    target = make_target("mixup", losses.loss("softmax"), 6, 11, generator, "cpu").float()
    weight = torch.rand(11, generator=generator) + 0.1

    def step(x):
        return cb.cb_softmax_cross_entropy(x, target, weight, backend=backend, label_smoothing=0.1,
                                           weighting="element")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logits), step(logits))


# --- bad inputs ---------------------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    (dict(target=torch.rand(2, 4)), ValueError, r"target must have shape \(N, C\) = \(2, 3\)"),
    (dict(target=torch.ones(2, 3, dtype=torch.int64)), TypeError,
     r"target must hold target values as a floating-point tensor when it has the logits' shape \(N, C\)"),
    (dict(target=torch.ones(2, 1, dtype=torch.int64)), ValueError, r"target must have shape \(N,\) = \(2,\)"),
    (dict(target=torch.rand(2, 3, requires_grad=True)), ValueError, "target must not require grad"),
    (dict(target=torch.rand(2, 3, device="meta")), ValueError, "target is on meta but logits are on cpu"),
    (dict(weighting="class"), ValueError, r"weighting must be one of \('row', 'element'\), got 'class'"),
    (dict(weighting=None), ValueError, "weighting must be one of"),
    (dict(target=torch.rand(2, 3), target_margin=torch.ones(3)), ValueError,
     "target_margin needs class-index targets"),
]


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
@pytest.mark.parametrize("kwargs,error,message", BAD_ARGUMENTS)
def test_bad_dense_targets_and_weighting_are_refused_by_name(backend_name, kwargs, error, message):
    if backend_name not in cb.available_backends("cpu"):
        pytest.skip("the C++ extension is not built")
    logits, target, _ = make_inputs(2, 3, torch.float32, "cpu")
    kwargs = {"target": target, **kwargs}
    with pytest.raises(error, match=message):
        cb.cb_softmax_cross_entropy(logits, backend=backend_name, **kwargs)


def test_the_ops_refuse_bad_dense_targets_by_name():
    if "cpu" not in cb.available_backends("cpu"):
        pytest.skip("the C++ extension is not built")
    logits = torch.randn(2, 3)
    op = torch.ops.cbkernels.softmax_ce_forward
    cases = [(torch.rand(2, 4), "a dense target must have the logits' shape"),
             (torch.rand(2, 3, dtype=torch.float64), "a dense target must have the logits' dtype"),
             (torch.rand(2, 3, 1), "target must have shape"),
             (torch.ones(2, 3, dtype=torch.int64), r"target must have shape \(N,\) = \(2,\) of class indices"),
             (torch.full((2, 3), -1.0), r"target\[0, 0\] = -1 is out of range")]
    for target, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(logits, target, None, 0.0, IGNORE, True)
    with pytest.raises(RuntimeError, match="target_margin needs class-index targets"):
        op(logits, torch.rand(2, 3), None, 0.0, IGNORE, True, target_margin=torch.zeros(3))
    with pytest.raises(RuntimeError, match=r"element_weight must have shape \(C,\)"):
        op(logits, torch.tensor([0, 1]), None, 0.0, IGNORE, True, element_weight=torch.ones(4))
    assert math.isfinite(float(op(logits, torch.rand(2, 3), None, 0.0, 7, False)[0].sum()))  # ignore_index unused


def test_the_dense_targets_example_runs():
    """examples/dense_targets.py (multi-label and mixup training), shortened: it runs and prints its scores."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "examples", "dense_targets.py"), "--classes", "8",
                          "--steps", "20"], capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("macro average precision") == 2 and out.stdout.count("balanced test accuracy") == 2
