"""The implementations the benchmark puts side by side, each a function logits -> scalar loss.

Every provider computes the same objective, the paper's "mean": sum_i alpha_{y_i} * L_i divided by the
number of non-ignored rows (docs/math.md), at the registry's default hyperparameters, so loss and
gradient can be checked against the float64 reference and timings compare like with like. Providers:
  cbkernels[backend,strategy]  every kernel backend native to the device, once per backward strategy
               (CBKERNELS_BACKWARD, read at each forward call).
  naive        the loss's reference (losses.Loss.reference) under plain autograd: what a user writes
               without this library. The "reference" backend of cbkernels runs this same code, so it is
               not listed twice.
  compiled     torch.compile of naive (compile time reported apart, never timed).
The plain-PyTorch peers depend on the kernel family, not on the loss (a loss is a family at some
hyperparameters), and take the family's hyperparameters:
  F.cross_entropy   softmax_ce: F.cross_entropy(reduction="none", label_smoothing) * alpha[target],
               summed / valid rows.
  liger        softmax_ce: liger-kernel's Triton cross entropy with class weights, where importable.
  torchvision-style sigmoid_focal: torchvision.ops.sigmoid_focal_loss's formula written inline
               (torchvision is not installed beside this torch), alpha_y per row instead of its alpha.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .. import _backends, _reduction, functional, losses
from .cases import IGNORE_INDEX, Case

NAIVE = "naive"
COMPILED = "compiled"


@dataclass
class Provider:
    name: str
    kind: str  # "cbkernels" or "peer"
    build: Callable[[Case], Callable[[torch.Tensor], torch.Tensor]] | None
    env: dict = field(default_factory=dict)  # environment set while this provider runs
    unavailable: str | None = None  # why it cannot run here (reported, not timed)
    compiles: bool = False  # its first call compiles: that call's time is the compile time


def naive(case: Case):
    spec, target, weight, hyper = case.spec, case.target, case.weight, case.hyperparameters
    return lambda x: spec.reference(x, target, weight, "mean", IGNORE_INDEX, **hyper)


def _compiled(case: Case):
    # A fresh dynamo cache per case: the same code object is compiled once per shape and dtype, and the
    # recompile limit would otherwise silently fall back to eager after a few shapes of a sweep.
    torch._dynamo.reset()
    return torch.compile(naive(case), dynamic=False)


def _kernel(backend: str):
    def build(case: Case):
        spec, target, weight, hyper = case.spec, case.target, case.weight, case.hyperparameters
        return lambda x: functional.apply_loss(spec, x, target, weight, "mean", IGNORE_INDEX, backend, hyper)
    return build


def _torch_cross_entropy(case: Case):
    target, weight = case.target, case.weight
    smoothing = case.family_hyperparameters()["label_smoothing"]
    valid = _reduction.valid_row_count(target, IGNORE_INDEX)
    return lambda x: (F.cross_entropy(x, target, reduction="none", label_smoothing=smoothing)
                      * weight[target]).sum() / valid


def _torchvision_style(case: Case):
    # torchvision.ops.sigmoid_focal_loss: p = sigmoid(x), ce = BCE-with-logits, p_t, ce * (1 - p_t)^gamma,
    # in the logits' dtype as torchvision computes it; then alpha_y per row, summed over classes. For
    # gamma = 0 (sigmoid CE) it is plain BCE-with-logits, as a user would write it.
    target, weight = case.target, case.weight
    gamma = case.family_hyperparameters()["gamma"]
    valid = _reduction.valid_row_count(target, IGNORE_INDEX)

    def loss(x):
        onehot = F.one_hot(target, x.shape[1]).to(x.dtype)
        terms = F.binary_cross_entropy_with_logits(x, onehot, reduction="none")
        if gamma != 0:
            p = torch.sigmoid(x)
            terms = terms * ((1 - (p * onehot + (1 - p) * (1 - onehot))) ** gamma)
        return (terms.sum(dim=1) * weight[target]).sum() / valid
    return loss


def _liger_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "liger-kernel runs on CUDA tensors only"
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as exc:  # ImportError, or a Triton/torch version it does not support
        return f"liger-kernel is not importable ({type(exc).__name__}: {exc})"
    return None


def _liger(case: Case):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    # reduction="sum" then / valid rows: liger's "mean" with weights divides by sum(alpha_y), as
    # F.cross_entropy does, not by the row count the paper uses. A liger too old for class weights
    # raises TypeError here, which the runner reports.
    module = LigerCrossEntropyLoss(weight=case.weight, reduction="sum",
                                   label_smoothing=case.family_hyperparameters()["label_smoothing"])
    target = case.target
    valid = _reduction.valid_row_count(target, IGNORE_INDEX)
    return lambda x: module(x, target) / valid


def _family_peers(device: torch.device) -> dict[str, list[Provider]]:
    """The plain-PyTorch peers of each kernel family, by the registry's family name."""
    return {
        losses.SOFTMAX_CE.name: [Provider("F.cross_entropy", "peer", _torch_cross_entropy),
                                 Provider("liger", "peer", _liger, unavailable=_liger_unavailable(device))],
        losses.SIGMOID_FOCAL.name: [Provider("torchvision-style", "peer", _torchvision_style)],
    }


def providers_for(spec: losses.Loss, device) -> list[Provider]:
    """Every provider of this registered loss on this device, unavailable ones included (with the reason)."""
    device = torch.device(device)
    out = []
    for backend in _backends.native_kernel_backends(device):
        for strategy in _backends.STRATEGIES:
            out.append(Provider(f"cbkernels[{backend},{strategy}]", "cbkernels", _kernel(backend),
                                env={"CBKERNELS_BACKWARD": strategy}))
    out.append(Provider(NAIVE, "peer", naive))
    out.append(Provider(COMPILED, "peer", _compiled, compiles=True))
    out += _family_peers(device).get(spec.family.name, [])
    return out


class environment:
    """Sets a provider's environment variables for the duration of a with block, then restores them."""

    def __init__(self, env: dict):
        self.env = env
        self.saved: dict = {}

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
