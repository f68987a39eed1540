"""The benchmark's inputs and the byte count its bandwidth figures are measured against.

One generator serves every benchmark: the provider comparison (runner.py, bench/test_bench_losses.py),
the launch-configuration sweeps (sweeps.py) and the memory probe (cpu_memory.py), so that a shape means
the same tensors everywhere. A benchmark loss runs at the registry's defaults (losses.Loss.defaults).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..losses import Loss

IGNORE_INDEX = -100


@dataclass
class Inputs:
    """logits (N, C) in the timed dtype, int64 targets (N,), float32 class weights (C,) and a float32
    upstream gradient per row (N,), all on one device."""
    logits: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    upstream: torch.Tensor


def make_inputs(n: int, c: int, dtype: torch.dtype, device, seed: int = 0, scale: float = 2.0,
                ignore_every: int = 0) -> Inputs:
    """Seeded inputs drawn on the CPU (the same values on every device): logits ~ scale * N(0, 1), uniform
    targets (every `ignore_every`-th row set to IGNORE_INDEX when it is > 0), weights in [0.1, 2.1)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, generator=g) * scale).to(dtype).to(device)
    target = torch.randint(0, c, (n,), generator=g)
    if ignore_every:
        target[::ignore_every] = IGNORE_INDEX
    weight = (torch.rand(c, generator=g) * 2 + 0.1).to(device)
    upstream = torch.randn(n, generator=g).to(device)
    return Inputs(logits, target.to(device), weight, upstream)


def useful_bytes(n: int, c: int, dtype: torch.dtype) -> int:
    """The traffic no forward + backward can avoid, the floor of any kernel: the logits read once and the
    gradient written once (both N x C in `dtype`), the int64 targets and float32 class weights read once."""
    return 2 * n * c * dtype.itemsize + n * torch.int64.itemsize + c * torch.float32.itemsize


@dataclass
class Case:
    """One provider-benchmark input: a registered loss at `hyperparameters` (its settable ones, by name)
    on logits (N, C), targets and class weights."""
    spec: Loss
    logits: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    hyperparameters: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> str:
        return self.spec.name

    def family_hyperparameters(self) -> dict[str, float]:
        """Every hyperparameter of the loss's kernel family by name, the ones the loss pins included: what
        a peer written against the family's formula needs (sigmoid cross entropy is focal at gamma 0)."""
        values = self.spec.kernel_hyperparameters(self.hyperparameters)
        return {h.name: v for h, v in zip(self.spec.family.hyperparameters, values)}

    def with_logits(self, logits: torch.Tensor) -> Case:
        return Case(self.spec, logits, self.target, self.weight, self.hyperparameters)


def make_case(spec: Loss, n: int, c: int, dtype: torch.dtype, device, seed: int = 0) -> Case:
    """The provider benchmark's case: make_inputs with no ignored rows, the loss at its defaults."""
    inputs = make_inputs(n, c, dtype, device, seed)
    return Case(spec, inputs.logits, inputs.target, inputs.weight, spec.defaults())


def loss_and_grad(fn, x: torch.Tensor):
    """(fn(x), d fn(x) / dx): one forward + backward, the unit every provider is checked and timed on."""
    loss = fn(x)
    (grad,) = torch.autograd.grad(loss, x)
    return loss, grad
