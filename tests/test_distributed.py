"""Class-parallel losses (cbkernels.distributed) on gloo with 2 and 3 processes on loopback.

Every rank builds the same global inputs from one seed (the test's, from tests/conftest.py), keeps its
column slice of the logits and compares the class-parallel loss and the gradient of its slice with the
single-process spec (`losses.Loss.reference`) on the gathered float64 logits, for every registered loss
(losses.LOSSES) at every hyperparameter setting of `Loss.test_cases()`. The class-parallel function of a
loss is cbkernels.distributed.<spec.function>_parallel. Processes are spawned once per world size and run
every case; the gloo timeout and a join deadline turn a hang into a failure instead of a stuck CI job.
"""
from __future__ import annotations

import datetime
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cases import weighted_reduction_by_hand
from cbkernels import class_balanced_weights, losses
from cbkernels import distributed as cbd

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
# A hang guard, not a speed target: about 20 s of CPU per world size, but spawning and importing torch
# on 2 cores shared with other jobs has taken over 80 s of wall time.
JOIN_DEADLINE_S = 240
IGNORE = -100
# Shard layouts over C classes: uneven (C not divisible by the world size) and lopsided (a 1-class shard).
LAYOUTS = {2: ([6, 5], [1, 10], [20, 17]), 3: ([4, 4, 3], [1, 7, 3], [13, 12, 12])}
# Tolerances against the float64 reference: float64 shards differ only by summation order; float32 and
# bfloat16 inputs are computed in float32 and the gradient is rounded once to the input dtype.
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-5, 1e-5), torch.bfloat16: (2e-5, 4 * 2.0**-8)}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_inputs(seed, n, c, *, ignore_frac, weighted, target_dtype=torch.int64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    target = torch.randint(0, c, (n,), generator=g)
    if n >= 2:  # the first and last class (first and last shard) always appear
        target[0], target[-1] = 0, c - 1
    ignored = torch.rand(n, generator=g) < ignore_frac
    target = torch.where(ignored, torch.full_like(target, IGNORE), target).to(target_dtype)
    weight = torch.rand(c, generator=g) * 2 + 0.1 if weighted else None
    upstream = torch.randn(n, generator=g, dtype=torch.float64)
    return logits, target, weight, upstream


def parallel_function(spec):
    """The public class-parallel function of a registered loss."""
    return getattr(cbd, f"{spec.function}_parallel")


def _expected(spec, logits, target, weight, reduction, hyper, sample_weight, normalizer, weighting):
    """The single-device definition: the spec's rows (class weights applied per `weighting`), weighted and
    reduced by hand (cases.py)."""
    rows = spec.reference(logits, target, weight, "none", IGNORE, weighting=weighting, **hyper)
    return weighted_reduction_by_hand(rows, target, IGNORE, sample_weight, reduction, normalizer)


def _call(spec, logits, target, weight, reduction, hyper, parallel, sample_weight=None, normalizer=None,
          weighting="row", **shard):
    # Hyperparameters by keyword: the public functions' argument orders differ (gamma comes before reduction).
    if parallel:
        return parallel_function(spec)(logits, target, weight, reduction=reduction, ignore_index=IGNORE, **hyper,
                                       sample_weight=sample_weight, normalizer=normalizer, weighting=weighting,
                                       **shard)
    return _expected(spec, logits, target, weight, reduction, hyper, sample_weight, normalizer, weighting)


def _loss_and_grad(spec, logits, target, weight, reduction, hyper, upstream, parallel, **shard):
    x = logits.detach().clone().requires_grad_(True)
    out = _call(spec, x, target, weight, reduction, hyper, parallel, **shard)
    (gx,) = torch.autograd.grad(out, x, upstream if reduction == "none" else upstream[0])
    return out.detach(), gx


def _check_case(rank, seed, spec, hyper, reduction, layout, *, dtype=torch.float64, n=33, weighted=True,
                ignore_frac=0.25, explicit_shard=True, target_dtype=torch.int64, scale=3.0, elementwise=False,
                adjusted=False, sample_weighted=False, normalizer=None, weighting="row"):
    """spec: a registered loss; hyper: its hyperparameters by name. elementwise: every gradient entry within
    rtol of its own value (no atol from the largest entry). adjusted: with a global logit_offset, and a
    target_margin for the losses that take one (the same tensors on every rank and for the reference).
    sample_weighted: (N,) weights of either sign and a 0, NaN on the ignored rows (row 1 is one), the same on
    every rank; normalizer: "mean"'s divisor, a number or "tensor" (a float64 0-d tensor). weighting: how the
    class weights apply ("row": per row, "element": per class term), for the parallel loss and the spec."""
    c = sum(layout)
    start = sum(layout[:rank])
    logits, target, weight, upstream = _global_inputs(seed, n, c, ignore_frac=ignore_frac, weighted=weighted,
                                                      target_dtype=target_dtype, scale=scale)
    logits = logits.to(dtype)  # the reference sees exactly these values, upcast to float64
    shard = {"class_start": start, "num_classes": c} if explicit_shard else {}
    local = logits[:, start:start + layout[rank]]
    if adjusted:
        generator = torch.Generator().manual_seed(seed)
        hyper = {**hyper, "logit_offset": torch.randn(c, generator=generator)}
        if spec.family.takes_target_margin:
            hyper["target_margin"] = torch.rand(c, generator=generator) * 2
    weighting = {"normalizer": torch.tensor(5.25, dtype=torch.float64) if normalizer == "tensor" else normalizer,
                 "weighting": weighting}
    if sample_weighted:
        target[1] = IGNORE
        sample_weight = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 1.5
        sample_weight[2] = 0.0
        weighting["sample_weight"] = torch.where(target == IGNORE, float("nan"), sample_weight)
    got_loss, got_grad = _loss_and_grad(spec, local, target, weight, reduction, hyper, upstream, True, **shard,
                                        **weighting)
    ref_loss, ref_grad = _loss_and_grad(spec, logits.double(), target, weight, reduction, hyper, upstream, False,
                                        **weighting)
    ref_grad = ref_grad[:, start:start + layout[rank]]
    loss_rtol, grad_rtol = TOL[dtype]
    where = (f"seed={seed} rank={rank} loss={spec.name} {hyper} reduction={reduction} layout={layout} "
             f"dtype={dtype} {weighting}")
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert got_loss.dtype == expected_dtype, where
    assert got_grad.dtype == dtype and got_grad.shape == local.shape, where
    loss_atol = loss_rtol * ref_loss.abs().max().item() + 1e-12
    torch.testing.assert_close(got_loss.double(), ref_loss, rtol=loss_rtol, atol=loss_atol,
                               msg=lambda m: f"loss: {where}\n{m}")
    atol = 1e-30 if elementwise else grad_rtol * ref_grad.abs().max().item() + 1e-15
    torch.testing.assert_close(got_grad.double(), ref_grad, rtol=grad_rtol, atol=atol,
                               msg=lambda m: f"grad: {where}\n{m}")
    ignored = target == IGNORE
    assert (got_grad[ignored] == 0).all(), f"ignored rows must get exactly zero gradient: {where}"


def _non_default_case(spec):
    """A setting of the loss's hyperparameters where each is nonzero ({} for one without any)."""
    return next(case for case in spec.test_cases() if all(value != 0 for value in case.values()))


def _all_cases(rank, world, seed):
    layouts = LAYOUTS[world]
    k = 0
    for spec in losses.LOSSES:
        for hyper in spec.test_cases():
            for reduction in ("none", "sum", "mean"):
                for layout in layouts:
                    k += 1  # vary the secondary options across cases instead of multiplying them
                    _check_case(rank, seed + k, spec, hyper, reduction, layout, weighted=k % 2 == 0,
                                explicit_shard=k % 3 != 0, target_dtype=torch.int32 if k % 4 == 0 else torch.int64)
    for spec in losses.LOSSES:
        hyper = _non_default_case(spec)
        for dtype in (torch.float32, torch.bfloat16):
            _check_case(rank, seed + 100, spec, hyper, "mean", layouts[0], dtype=dtype)
        _check_case(rank, seed + 101, spec, hyper, "mean", layouts[0], ignore_frac=1.0)  # every row ignored: 0
        _check_case(rank, seed + 102, spec, hyper, "none", layouts[1], n=1, ignore_frac=0.0)
        for layout in layouts:
            _check_case(rank, seed + 104, spec, hyper, "none", layout, adjusted=True)
        # Sample weights (NaN on ignored rows) under every reduction, and the normalizer as a number and a tensor.
        for reduction, normalizer in (("none", None), ("sum", None), ("mean", None), ("mean", 7.5), ("mean", "tensor")):
            _check_case(rank, seed + 105, spec, hyper, reduction, layouts[0], sample_weighted=True,
                        normalizer=normalizer)
    _element_cases(rank, seed + 200, layouts)
    # Confident predictions in float32 (|z| up to ~40): tiny probabilities keep their relative accuracy,
    # which a 1 - p anywhere in the sigmoid family's gradient would destroy.
    for spec in losses.LOSSES:
        if spec.family is not losses.SIGMOID_FOCAL:
            continue
        for hyper in spec.test_cases():
            _check_case(rank, seed + 103, spec, hyper, "sum", layouts[2], dtype=torch.float32, scale=8.0,
                        elementwise=True)


def _element_cases(rank, seed, layouts):
    """weighting="element": every loss at every hyperparameter setting (label smoothing included) and reduction,
    the layouts taking turns; then with sample weights and the normalizer, logit adjustments, float32 inputs and
    every row ignored."""
    k = 0
    for spec in losses.LOSSES:
        for hyper in spec.test_cases():
            for reduction in ("none", "sum", "mean"):
                k += 1
                _check_case(rank, seed + k, spec, hyper, reduction, layouts[k % len(layouts)], weighting="element",
                            explicit_shard=k % 3 != 0)
    for spec in losses.LOSSES:
        hyper = _non_default_case(spec)  # label smoothing > 0 for the softmax losses
        for reduction, normalizer in (("none", None), ("sum", None), ("mean", None), ("mean", 7.5), ("mean", "tensor")):
            _check_case(rank, seed + 50, spec, hyper, reduction, layouts[0], sample_weighted=True,
                        normalizer=normalizer, weighting="element")
        _check_case(rank, seed + 51, spec, hyper, "none", layouts[1], adjusted=True, weighting="element")
        _check_case(rank, seed + 52, spec, hyper, "mean", layouts[2], dtype=torch.float32, weighting="element")
        _check_case(rank, seed + 53, spec, hyper, "mean", layouts[0], ignore_frac=1.0, weighting="element")


def _check_confident_softmax(rank, layout):
    """Rows whose target leads every other logit by 30 (p_y = 1 - ~1e-12 in float32): the loss and the
    true-class gradient are tiny but not 0, as on a single device (docs/math.md, section 7)."""
    c, start = sum(layout), sum(layout[:rank])
    target = torch.tensor([0, c - 1, c // 2, 1])
    logits = torch.zeros(4, c, dtype=torch.float64)
    logits[torch.arange(4), target] = 30.0
    logits[3] = torch.linspace(-3.0, 3.0, c, dtype=torch.float64)  # and a row that is not confident
    logits[3, 1] = 33.0
    spec = losses.loss("softmax")
    upstream = torch.ones(4, dtype=torch.float64)
    local = logits[:, start:start + layout[rank]].float()
    got_loss, got_grad = _loss_and_grad(spec, local, target, None, "none", {}, upstream, True, class_start=start,
                                        num_classes=c)
    ref_loss, ref_grad = _loss_and_grad(spec, logits, target, None, "none", {}, upstream, False)
    where = f"rank={rank} layout={layout}"
    assert (got_loss[:3] > 0).all(), f"confident rows lost their loss: {got_loss} ({where})"
    torch.testing.assert_close(got_loss.double(), ref_loss, rtol=1e-5, atol=0, msg=lambda m: f"{where}\n{m}")
    torch.testing.assert_close(got_grad.double(), ref_grad[:, start:start + layout[rank]], rtol=1e-5, atol=0,
                               msg=lambda m: f"grad: {where}\n{m}")


def _check_errors(rank, world):
    layout = LAYOUTS[world][0]
    c, start = sum(layout), sum(LAYOUTS[world][0][:rank])
    local = torch.randn(4, layout[rank], dtype=torch.float64)
    target = torch.tensor([0, 1, c - 1, IGNORE])
    with pytest.raises(ValueError, match="class_weight"):  # the local slice of the weights instead of all C
        cbd.cb_softmax_cross_entropy_parallel(local, target, torch.ones(layout[rank]), class_start=start,
                                              num_classes=c)
    with pytest.raises(ValueError, match="all but num_classes"):  # derived layout disagrees with class_weight
        cbd.cb_focal_loss_parallel(local, target, torch.ones(c + 1))
    with pytest.raises(RuntimeError, match="outside"):
        cbd.cb_sigmoid_cross_entropy_parallel(local, torch.tensor([0, 1, c, IGNORE]), class_start=start,
                                              num_classes=c)
    with pytest.raises(ValueError, match="class_start"):
        cbd.cb_softmax_cross_entropy_parallel(local, target, class_start=c - 1, num_classes=c)
    with pytest.raises(ValueError, match="num_classes"):
        cbd.cb_softmax_cross_entropy_parallel(local, target, class_start=start)
    with pytest.raises(ValueError, match="reduction"):
        cbd.cb_focal_loss_parallel(local, target, reduction="avg", class_start=start, num_classes=c)
    with pytest.raises(ValueError, match="normalizer applies to reduction='mean' only"):
        cbd.cb_softmax_focal_loss_parallel(local, target, reduction="sum", normalizer=2.0, class_start=start,
                                           num_classes=c)
    with pytest.raises(ValueError, match=r"sample_weight must have shape \(N,\) = \(4,\)"):
        cbd.cb_sigmoid_cross_entropy_parallel(local, target, sample_weight=torch.ones(layout[rank] + 4),
                                              class_start=start, num_classes=c)
    with pytest.raises(ValueError, match=r"weighting must be one of \('row', 'element'\), got 'elementwise'"):
        cbd.cb_softmax_focal_loss_parallel(local, target, torch.ones(c), weighting="elementwise", class_start=start,
                                           num_classes=c)
    # A dense (N, C) target, global or this shard's columns: refused with the memory reason, on every rank alike.
    for dense in (torch.rand(4, c, dtype=torch.float64), torch.rand(4, layout[rank], dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"cb_focal_loss_parallel takes class-index targets \(N,\) only: a "
                                             r"dense \(N, C\) target would be one more N x C tensor"):
            cbd.cb_focal_loss_parallel(local, dense, class_start=start, num_classes=c)
    with pytest.raises(ValueError, match="cb_softmax_cross_entropy_parallel takes class-index targets"):
        cbd.cb_softmax_cross_entropy_parallel(local, torch.rand(4, c, dtype=torch.float64), weighting="element",
                                              class_start=start, num_classes=c)
    assert cbd.class_shard_range(layout[rank]) == (start, c)


def _check_counts(rank, world, seed):
    num_classes = 9
    per_rank = []
    for r in range(world):  # every rank can rebuild every rank's labels, hence the whole-dataset histogram
        g = torch.Generator().manual_seed(seed + 1000 + r)
        labels = torch.randint(0, num_classes, (50 + 7 * r,), generator=g)
        labels[torch.rand(labels.shape, generator=g) < 0.1] = IGNORE
        per_rank.append(labels)
    everything = torch.cat(per_rank)
    expected = torch.bincount(everything[everything != IGNORE], minlength=num_classes)
    counts = cbd.global_class_counts(per_rank[rank], num_classes, ignore_index=IGNORE)
    assert torch.equal(counts, expected), f"seed={seed} rank={rank}: {counts} != {expected}"
    assert torch.equal(class_balanced_weights(counts, 0.99), class_balanced_weights(expected, 0.99))
    with pytest.raises(RuntimeError, match="outside"):
        cbd.global_class_counts(torch.tensor([0, num_classes]), num_classes)


def _worker(rank, world, port, seed):
    torch.set_num_threads(1)  # 2-3 processes share two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        _all_cases(rank, world, seed)
        for layout in LAYOUTS[world]:
            _check_confident_softmax(rank, layout)
        _check_errors(rank, world)
        _check_counts(rank, world, seed)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_every_registered_loss_has_a_class_parallel_function():
    for spec in losses.LOSSES:
        assert callable(parallel_function(spec)), spec.name
        assert spec.family.name in cbd._PARALLEL, f"no class-parallel implementation of family {spec.family.name}"


@pytest.mark.parametrize("world", [2, 3])
def test_class_parallel_matches_reference(world, seed):
    context = mp.start_processes(_worker, args=(world, _free_port(), seed), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + JOIN_DEADLINE_S
    # join raises ProcessRaisedException (with the failing rank's traceback) and stops the others.
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            pytest.fail(f"class-parallel workers (world={world}, seed={seed}) still running after {JOIN_DEADLINE_S} s")


def test_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        cbd.cb_softmax_cross_entropy_parallel(torch.randn(2, 3), torch.tensor([0, 1]), class_start=0, num_classes=3)
