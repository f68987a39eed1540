"""The implementations the benchmark puts side by side, each a function logits -> scalar loss.

Every provider computes the same objective, the paper's "mean": sum_i alpha_{y_i} * L_i divided by the
number of non-ignored rows (paper-notes.md section 4), so loss and gradient can be checked against
reference.py and timings compare like with like. Peers:
  naive        reference.py under plain autograd: what a user writes without this library. The
               "reference" backend of cbkernels runs this same code, so it is not listed twice.
  compiled     torch.compile of naive (compile time reported apart, never timed).
  F.cross_entropy   softmax: F.cross_entropy(reduction="none") * alpha[target], summed / valid rows.
  torchvision-style sigmoid / focal: torchvision.ops.sigmoid_focal_loss's formula written inline
               (torchvision is not installed beside this torch), alpha_y per row instead of its alpha.
  liger        softmax: liger-kernel's Triton cross entropy with class weights, where importable.
Kernel backends appear once per backward strategy (CBKERNELS_BACKWARD, read at each forward call).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .. import _backends, functional, reference

LOSSES = ("softmax", "sigmoid", "focal")
FOCAL_GAMMA = 0.5  # the paper's choice for its focal runs
NAIVE = "naive"
COMPILED = "compiled"


@dataclass
class Case:
    """One benchmark input: logits (N, C) in the timed dtype, targets, class weights, the loss."""
    loss: str
    logits: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor

    @property
    def gamma(self) -> float:
        return FOCAL_GAMMA if self.loss == "focal" else 0.0


@dataclass
class Provider:
    name: str
    kind: str  # "cbkernels" or "peer"
    build: Callable[[Case], Callable[[torch.Tensor], torch.Tensor]] | None
    env: dict = field(default_factory=dict)  # environment set while this provider runs
    unavailable: str | None = None  # why it cannot run here (reported, not timed)
    compiles: bool = False  # its first call compiles: that call's time is the compile time


def make_case(loss: str, n: int, c: int, dtype: torch.dtype, device, seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, generator=g) * 2.0).to(dtype).to(device)
    target = torch.randint(0, c, (n,), generator=g).to(device)
    weight = (torch.rand(c, generator=g) * 2 + 0.1).to(device)
    return Case(loss, logits, target, weight)


def _valid_rows(target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    # A device tensor: dividing by it never syncs.
    return (target != ignore_index).sum().clamp(min=1)


def naive(case: Case):
    target, weight, gamma = case.target, case.weight, case.gamma
    if case.loss == "softmax":
        return lambda x: reference.cb_softmax_cross_entropy(x, target, weight)
    return lambda x: reference.cb_focal_loss(x, target, weight, gamma)


def _compiled(case: Case):
    # A fresh dynamo cache per case: the same code object is compiled once per shape and dtype, and the
    # recompile limit would otherwise silently fall back to eager after a few shapes of a sweep.
    torch._dynamo.reset()
    return torch.compile(naive(case), dynamic=False)


def _kernel(backend: str):
    def build(case: Case):
        target, weight, gamma = case.target, case.weight, case.gamma
        if case.loss == "softmax":
            return lambda x: functional.cb_softmax_cross_entropy(x, target, weight, backend=backend)
        return lambda x: functional.cb_focal_loss(x, target, weight, gamma, backend=backend)
    return build


def _torch_cross_entropy(case: Case):
    target, weight = case.target, case.weight
    valid = _valid_rows(target)
    return lambda x: (F.cross_entropy(x, target, reduction="none") * weight[target]).sum() / valid


def _torchvision_style(case: Case):
    # torchvision.ops.sigmoid_focal_loss: p = sigmoid(x), ce = BCE-with-logits, p_t, ce * (1 - p_t)^gamma,
    # in the logits' dtype as torchvision computes it; then alpha_y per row, summed over classes. For
    # gamma = 0 (sigmoid CE) it is plain BCE-with-logits, as a user would write it.
    target, weight, gamma = case.target, case.weight, case.gamma
    valid = _valid_rows(target)

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
    module = LigerCrossEntropyLoss(weight=case.weight, reduction="sum")
    target = case.target
    valid = _valid_rows(target)
    return lambda x: module(x, target) / valid


def _kernel_backends(device: torch.device) -> list[str]:
    # The interpreter is a debugging tool, not something to time: Triton is benchmarked on GPUs only.
    return [b for b in _backends.available_backends(device)
            if b != "reference" and not (b == "triton" and device.type == "cpu")]


def providers_for(loss: str, device) -> list[Provider]:
    """Every provider for this loss on this device, unavailable ones included (with the reason)."""
    device = torch.device(device)
    out = []
    for backend in _kernel_backends(device):
        for strategy in _backends.STRATEGIES:
            out.append(Provider(f"cbkernels[{backend},{strategy}]", "cbkernels", _kernel(backend),
                                env={"CBKERNELS_BACKWARD": strategy}))
    out.append(Provider(NAIVE, "peer", naive))
    out.append(Provider(COMPILED, "peer", _compiled, compiles=True))
    if loss == "softmax":
        out.append(Provider("F.cross_entropy", "peer", _torch_cross_entropy))
        out.append(Provider("liger", "peer", _liger, unavailable=_liger_unavailable(device)))
    else:
        out.append(Provider("torchvision-style", "peer", _torchvision_style))
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
