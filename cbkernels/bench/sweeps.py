"""What the launch-configuration sweeps (bench/sweep_cuda.py, bench/sweep_triton.py) share: the inputs of a
case, its float64 reference, the two backward strategies over a backend's ops, the correctness check that
gates every timing, the rates a timing is reported as and the report's header.

A sweep times the ops of one kernel family (losses.FAMILIES) at the registry's default hyperparameters,
the values a user gets; a shape is (family name, N, C, dtype), the name being what the JSON report and
cbkernels/triton/configs.py key on.
"""
from __future__ import annotations

import datetime
import json
import os
import platform

import torch

from .. import _ops, losses
from .cases import IGNORE_INDEX, Inputs, make_inputs, useful_bytes

__all__ = ["GRAD_RTOL", "family_shapes", "sweep_inputs", "reference_rows_and_grad", "strategies", "mismatch",
           "useful_bytes", "with_rates", "copy_bandwidth_gbps", "new_report", "write_report"]

# tests/backend_cases.py's table: one rounding of fp32 math to the dtype, with 4x headroom.
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}
USEFUL_BYTES = "logits read once + gradient written once + targets (int64) + class weights (fp32)"


def family_shapes(shapes) -> list[tuple[str, int, int, torch.dtype]]:
    """(family name, N, C, dtype) for every (N, C, dtype) of `shapes` and every kernel family, in order."""
    return [(family.name, n, c, dtype) for n, c, dtype in shapes for family in losses.FAMILIES]


def sweep_inputs(n: int, c: int, dtype: torch.dtype, device) -> Inputs:
    """A sweep's inputs, seeded by the shape (each shape its own values, the same in every run), with
    every 17th row ignored so the kernels' ignored-row path is checked too."""
    return make_inputs(n, c, dtype, device, seed=n * 131 + c, scale=3.0, ignore_every=17)


def _defaults(family: losses.Family) -> dict[str, float]:
    return {h.name: h.default for h in family.hyperparameters}


def reference_rows_and_grad(family_name: str, inputs: Inputs):
    """float64 reference loss rows and upstream-scaled gradient, on the logits' device."""
    family = losses.family(family_name)
    x = inputs.logits.detach().double().requires_grad_(True)
    rows = family.reference_rows(x, inputs.target, inputs.weight.double(), IGNORE_INDEX, **_defaults(family))
    (grad,) = torch.autograd.grad(rows, x, inputs.upstream.double())
    return rows.detach(), grad


def strategies(ops, family_name: str, inputs: Inputs):
    """{"fused": fn, "recompute": fn}, each returning (loss rows, upstream-scaled gradient) through `ops`
    (torch.ops.cbkernels or torch.ops.cbkernels_triton) as the autograd formula of _ops.py does."""
    family = losses.family(family_name)
    fwd, bwd = family.op(ops, "forward"), family.op(ops, "backward")
    hyper = tuple(_defaults(family).values())  # schema order: the family's order
    logits, target, weight, upstream = inputs.logits, inputs.target, inputs.weight, inputs.upstream

    def fused():
        loss, grad = fwd(logits, target, weight, *hyper, IGNORE_INDEX, True)
        return loss, _ops.scale_rows(grad, upstream, in_place=True)

    def recompute():
        loss, _ = fwd(logits, target, weight, *hyper, IGNORE_INDEX, False)
        return loss, bwd(logits, target, weight, upstream, *hyper, IGNORE_INDEX)

    return {"fused": fused, "recompute": recompute}


def mismatch(result, ref_rows, ref_grad, dtype):
    """None when (loss, scaled grad) match the float64 reference, else what differs."""
    loss, grad = result
    scale = float(ref_rows.abs().max())
    if not torch.allclose(loss.double(), ref_rows, rtol=2e-5, atol=1e-6 * scale):
        return f"loss differs by {float((loss.double() - ref_rows).abs().max()):.3g}"
    rtol = GRAD_RTOL[dtype]
    if not torch.allclose(grad.double(), ref_grad, rtol=rtol, atol=rtol * float(ref_grad.abs().max())):
        return f"grad differs by {float((grad.double() - ref_grad).abs().max()):.3g}"
    return None


def with_rates(result: dict, nbytes: int, copy_gbps: float) -> dict:
    """Adds GB/s of useful bytes and the % of copy bandwidth to a timed result ({"ms": ...}); returns it."""
    if "ms" in result:
        gbps = nbytes / result["ms"] / 1e6
        result.update(gbps=round(gbps, 1), pct_copy=round(100 * gbps / copy_gbps, 1))
    return result


def copy_bandwidth_gbps(time_ms, device, nbytes: int = 2**30) -> float:
    """The device's copy bandwidth: bytes read + written by a copy of `nbytes`, per time_ms(fn)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    return 2 * nbytes / time_ms(lambda: y.copy_(x)) / 1e6


def new_report(device_name: str, budget_s: float, copy_gbps: float, timing: str, versions=None, **fields) -> dict:
    """A sweep report with no shapes yet; `versions` adds to torch's, Python's and CUDA's."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "versions": {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda,
                     **(versions or {})},
        **fields, "budget_s": budget_s, "copy_gbps": round(copy_gbps, 1), "timing": timing,
        "useful_bytes": USEFUL_BYTES, "shapes": [], "complete": True,
    }


def write_report(report: dict, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)  # a run killed mid-write keeps the previous complete file
