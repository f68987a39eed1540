"""Shared test cases: inputs, the loss cases of the registry, calls, and the one tolerance table.

Every loss/backend test compares a backend with cbkernels' reference backend run in float64 on exactly
the same input values (drawn in the backend's dtype, upcast), so what is left is the kernel's fp32
arithmetic and the final rounding of the gradient to the logits' dtype. The tolerance table
(docs/guarantees.md, "Precision"):

  loss (float32 out): |got - ref| <= LOSS_RTOL |ref| + 1e-6 max|ref| (the batch's largest row loss).
    fp32 sums over up to ~10^5 terms carry a relative error of a few 1e-6 (blocked accumulation): 2e-5
    is 4x headroom.
  gradient: one rounding of fp32 math to the dtype (unit roundoff u = 2^-24, 2^-11, 2^-8), per ROW:
    |got - ref| <= r |ref| + r max_j |ref[i, j]|,  r = GRAD_RTOL[dtype] = 4u (at least 1e-5 for fp32),
    plus 2^-24 for fp16 (below 2^-14 fp16 is subnormal with a fixed spacing of 2^-24: one rounding there
    is an absolute error) and 1e-30 otherwise (fp32/bf16 flush below ~1e-38).
    The bound is relative to the row's largest entry, not the tensor's: with class weights or upstream
    gradients that differ between rows by 100x (class-balanced weights do), a tensor-wide bound passes a
    bf16 gradient whose small rows are zeroed or scaled by 1.5 (test_tolerances.py shows this bound
    fails such gradients, and that the tensor-wide one passed them).

Loss cases come from the registry (cbkernels.losses.LOSSES and each loss's test_cases()): `loss_cases()`
is the one parametrisation helper, so a new loss or hyperparameter value reaches every test by itself.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

import cbkernels
from cbkernels import losses

GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8,
             torch.float64: 1e-12}
LOSS_RTOL = 2e-5
LOSS_ATOL_OF_MAX = 1e-6
GRAD_FLOOR = {torch.float16: 2.0**-24}  # others: 1e-30
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REDUCTIONS = ("none", "mean", "sum")


# --- loss cases --------------------------------------------------------------------------------------

def family_hyperparameters(family: losses.Family) -> tuple[float, ...]:
    """A family's hyperparameters in schema order, each at its largest test value (for the raw ops)."""
    return tuple(max(h.test_values) for h in family.hyperparameters)


FAMILY_PARAMS = [pytest.param(family, id=family.name) for family in losses.FAMILIES]


def case_id(spec: losses.Loss, hyper: dict) -> str:
    return "-".join([spec.name] + [f"{k}={v:g}" for k, v in hyper.items()])


def loss_cases(*, full: bool = True, where=None):
    """pytest.params of (spec, hyper): every loss of the registry with each of its test_cases() (full),
    or with its defaults only; where(spec, hyper) -> bool keeps a subset."""
    params = []
    for spec in losses.LOSSES:
        for hyper in (spec.test_cases() if full else [spec.defaults()]):
            if where is None or where(spec, hyper):
                params.append(pytest.param(spec, hyper, id=case_id(spec, hyper)))
    return params


def name_of(backend) -> str:
    """A backend name from a name or a conftest.BackendCase."""
    return backend if isinstance(backend, str) else backend.name


def call(spec: losses.Loss, logits, target, weight=None, *, backend, reduction="mean", ignore_index=-100,
         hyper=None):
    """The loss's public function (cbkernels.<spec.function>) with its hyperparameters by name."""
    fn = getattr(cbkernels, spec.function)
    return fn(logits, target, weight, reduction=reduction, ignore_index=ignore_index, backend=name_of(backend),
              **(hyper or {}))


def loss_and_grad(spec, logits, target, weight, upstream, **kw):
    """(loss, d(upstream . loss)/d logits). detach() keeps strides and storage offset (clone() would make
    a dense copy): a non-contiguous or misaligned input reaches the backend as it is."""
    x = logits.detach().requires_grad_(True)
    out = call(spec, x, target, weight, **kw)
    grad_out = upstream if out.dim() else upstream.reshape(())
    (gx,) = torch.autograd.grad(out, x, grad_out)
    return out.detach(), gx


def reference_loss_and_grad(spec, logits, target, weight, upstream, *, reduction="mean", ignore_index=-100,
                            hyper=None):
    """The oracle: the loss's specification (spec.reference: reference.py's rows, reduced) in float64 on the
    CPU, on the same values, with plain autograd."""
    x = logits.detach().double().cpu().requires_grad_(True)
    out = spec.reference(x, target.cpu(), None if weight is None else weight.double().cpu(), reduction,
                         ignore_index, **(hyper or {}))
    upstream = upstream.double().cpu()
    (gx,) = torch.autograd.grad(out, x, upstream if out.dim() else upstream.reshape(()))
    return out.detach(), gx


def weighted_reduction_by_hand(rows, target, ignore_index, sample_weight, reduction, normalizer):
    """The definition of sample_weight and normalizer, written here (not reference.weighted_rows or
    _reduction): unweighted rows times sample_weight, an ignored row's weight taken as 0 whatever it is, then
    for "mean" summed and divided by the normalizer or by the non-ignored rows (at least 1)."""
    valid = target != ignore_index
    if sample_weight is not None:
        rows = rows * torch.where(valid, sample_weight.to(rows.dtype), 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (max(1, int(valid.sum())) if normalizer is None else float(normalizer))


# --- inputs -----------------------------------------------------------------------------------------

def make_inputs(n, c, dtype, device, *, scale=3.0, ignore_frac=0.2, weighted=True, target_dtype=torch.int64,
                ignore_index=-100, noncontiguous=False, generator=None):
    """(logits (N, C) in dtype, target (N,), class_weight (C,) or None), on `device`.

    Without a generator the draws come from torch's global generator, which conftest.py seeds from the
    test's id: every test draws the same inputs on every run, and a failure reports its seed."""
    g = generator if generator is not None else torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    if noncontiguous:  # every other column of a wider tensor: row stride != C
        base = torch.randn(n, 2 * c, generator=g, dtype=torch.float64) * scale
        logits = base.to(dtype).to(device)[:, ::2]
    else:
        logits = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    target = torch.randint(0, c, (n,), generator=g)
    if n >= 2:  # the edges of the class range always appear
        target[0], target[-1] = 0, c - 1
    ignored = torch.rand(n, generator=g) < ignore_frac
    if n >= 3:
        ignored[0] = ignored[-1] = False
    target = torch.where(ignored, torch.full_like(target, ignore_index), target).to(target_dtype).to(device)
    weight = (torch.rand(c, generator=g) * 2 + 0.1).to(device) if weighted else None
    return logits, target, weight


# --- the tolerance table ----------------------------------------------------------------------------

def assert_loss_close(got, ref, what="loss", *, rtol=LOSS_RTOL):
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(got, ref, rtol=rtol, atol=LOSS_ATOL_OF_MAX * scale + 1e-12,
                               msg=lambda m: f"{what}: {m}")


def grad_bound(ref: torch.Tensor, dtype: torch.dtype, *, extra_rtol: float = 0.0, mask=None) -> torch.Tensor:
    """The allowed |got - ref| of each gradient entry (float64, the shape of ref): GRAD_RTOL[dtype]
    (+ extra_rtol) times (|ref| + the largest |ref| of its row over `mask`), plus the dtype's floor."""
    ref = ref.double()
    rtol = GRAD_RTOL[dtype] + extra_rtol
    magnitude = ref.abs() if mask is None else torch.where(mask, ref.abs(), torch.zeros_like(ref))
    row_max = magnitude.amax(dim=-1, keepdim=True) if ref.numel() else magnitude
    return rtol * (ref.abs() + row_max) + GRAD_FLOOR.get(dtype, 1e-30)


def assert_grad_close(got, ref, dtype=None, what="grad", *, extra_rtol=0.0, mask=None):
    """got within the per-row bound of ref (dtype: the logits' dtype, default got's). Entries outside
    `mask` are not compared (numerics: where the reference is not finite)."""
    dtype = got.dtype if dtype is None else dtype
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    if mask is not None:
        mask = mask.cpu()
    bound = grad_bound(ref, dtype, extra_rtol=extra_rtol, mask=mask)
    error = (got - ref).abs()
    compared = torch.ones_like(ref, dtype=torch.bool) if mask is None else mask
    bad = compared & ~(error <= bound)  # NaN error counts as bad
    if bad.any():
        ratio = torch.where(bad, torch.nan_to_num(error / bound, nan=float("inf")), torch.zeros_like(error))
        index = tuple(int(i) for i in torch.nonzero(ratio == ratio.max())[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {int(compared.sum())} entries outside the per-row bound "
            f"{GRAD_RTOL[dtype] + extra_rtol:.3g} (|ref| + row max); worst at {index}: got {float(got[index])!r}, "
            f"ref {float(ref[index])!r}, error {float(error[index]):.3g} > bound {float(bound[index]):.3g} "
            f"(row max {float(ref[index[:-1]].abs().max()):.3g})")


def assert_finite_means_right(got, ref, what, *, grad_dtype=None, extra_rtol=0.0):
    """Non-finite inputs (docs/guarantees.md): a finite result must be the reference's (finite) value,
    and a non-finite reference must give a non-finite result. grad_dtype: compare as a gradient of that
    dtype (per-row bound over the entries finite in both), else as losses."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    ref_finite, got_finite = torch.isfinite(ref), torch.isfinite(got)
    assert not (got_finite & ~ref_finite).any(), (
        f"{what}: finite result where the reference is not finite:\n got {got}\n ref {ref}")
    both = got_finite & ref_finite
    if grad_dtype is not None:
        assert_grad_close(got, ref, grad_dtype, what, extra_rtol=extra_rtol, mask=both)
    elif both.any():
        assert_loss_close(got[both], ref[both], what)


# --- one comparison ---------------------------------------------------------------------------------

def assert_matches_reference(backend, spec, hyper, logits, target, weight, *, reduction="mean",
                             ignore_index=-100, upstream_scale=None, unit_upstream=False, what=""):
    """Loss and gradient of `backend` (a name or BackendCase) vs the float64 reference on the same values.

    The upstream gradient is random (times upstream_scale), or exactly 1 with unit_upstream (what
    loss.backward() passes, and the case where the fused backward skips its scaling pass)."""
    n = logits.shape[0]
    upstream = torch.randn(n if reduction == "none" else 1, dtype=torch.float64)
    if unit_upstream:
        upstream = torch.ones_like(upstream)
    if upstream_scale is not None:
        upstream = upstream * upstream_scale
    if reduction != "none":
        upstream = upstream.reshape(())
    kw = dict(reduction=reduction, ignore_index=ignore_index, hyper=hyper)
    out, grad = loss_and_grad(spec, logits, target, weight, upstream.to(torch.float32).to(logits.device),
                              backend=backend, **kw)
    ref_out, ref_grad = reference_loss_and_grad(spec, logits, target, weight, upstream, **kw)
    what = f"{name_of(backend)} {case_id(spec, hyper or {})} {logits.dtype} {reduction} {what}".strip()
    assert out.dtype == torch.float32, f"{what}: loss dtype {out.dtype}"
    assert grad.dtype == logits.dtype and grad.shape == logits.shape, f"{what}: grad {grad.dtype} {grad.shape}"
    assert not torch.isnan(out).any() and not torch.isnan(grad).any(), f"{what}: NaN from finite inputs"
    assert_loss_close(out, ref_out, f"{what} loss")
    assert_grad_close(grad, ref_grad, logits.dtype, f"{what} grad")
    ignored = target.cpu() == ignore_index
    assert (grad.cpu()[ignored] == 0).all(), f"{what}: ignored rows must get exactly zero gradient"


def check_on_configs(backend, spec, hyper, logits, target, weight, *, configs="all", **kw):
    """assert_matches_reference under the launch-configuration overrides of the pair (conftest.BackendCase):
    configs="all" of them, or only the "first" (the pair's most demanding one: Triton's small tiles) or the
    "last" (Triton's table, CUDA's streaming softmax); a plain backend name runs once."""
    overrides = backend.configs() if hasattr(backend, "configs") else [contextlib.nullcontext()]
    overrides = {"all": overrides, "first": overrides[:1], "last": overrides[-1:]}[configs]
    for override in overrides:
        with override as config:
            assert_matches_reference(backend, spec, hyper, logits, target, weight,
                                     what=f"config {config}" if config else "", **kw)


# --- subprocesses -----------------------------------------------------------------------------------

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def run_under_cpu_capability(script: str, capability: str) -> None:
    """Runs `script` in a fresh interpreter with ATEN_CPU_CAPABILITY=capability (ATen's override, which the
    CPU extension follows when it picks its instruction-set variant), the tests folder on PYTHONPATH (so
    the script can import cases and test modules) and the capability checked to have taken effect; fails
    with the child's stderr if the script fails. The child does not import Triton (TRITON_INTERPRET unset):
    it runs the CPU kernels only."""
    prologue = ("import sys, torch\n"
                "assert torch.backends.cpu.get_cpu_capability() == sys.argv[1].upper(), "
                "torch.backends.cpu.get_cpu_capability()\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["ATEN_CPU_CAPABILITY"] = capability
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, "-c", prologue + script, capability], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
