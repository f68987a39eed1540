"""Train one loss configuration on every seed at once, through the library's fused kernels.

The seeds' models are independent MLPs (64 -> hidden -> 10) stacked into one set of batched weights
(bmm), so a few hundred full-batch steps of all seeds together cost one small matmul chain per step:
the demo fits its time budget on two CPU cores. All seeds share the per-class counts (the long-tail
profile is deterministic; only the drawn samples differ), so their logits are concatenated and the loss
runs as ONE kernel call with the same class weights. reduction="sum" divided by the per-seed batch size
gives each model exactly the gradient of its own mean loss.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .. import functional, losses
from ..modules import ClassBalancedLoss
from ..weights import init_prior_bias_
from .data import Split

BETAS = (0.9, 0.99, 0.999, 0.9999)  # the paper's search space
# The hyperparameters the demo searches, by name (the paper's focal gammas). A loss's other settable
# hyperparameters stay at the registry's defaults (label smoothing: off).
GRID = {"gamma": (0.5, 1.0, 2.0)}


@dataclass(frozen=True)
class LossConfig:
    loss: str                    # a registered loss (losses.LOSS_TYPES)
    hyperparameters: tuple[tuple[str, float], ...] = ()  # (name, value) of the searched ones, in the loss's order
    beta: float | None = None    # None: plain loss (class_weight None); else class-balanced with this beta

    @property
    def spec(self) -> losses.Loss:
        return losses.loss(self.loss)

    @property
    def balanced(self) -> bool:
        return self.beta is not None

    def label(self) -> str:
        parts = [f"{name}={value:g}" for name, value in self.hyperparameters]
        if self.balanced:
            parts.append(f"beta={self.beta:g}")
        return ", ".join(parts) or "-"


def _settings(spec: losses.Loss) -> list[tuple[tuple[str, float], ...]]:
    """The grid of the loss's searched hyperparameters: every combination of GRID's values."""
    searched = [h.name for h in spec.hyperparameters if h.name in GRID]
    return [tuple(zip(searched, values)) for values in itertools.product(*(GRID[name] for name in searched))]


def search_space() -> list[LossConfig]:
    """Every configuration the demo trains: each registered loss over GRID, plain, then class-balanced over
    the paper's betas."""
    configs = [LossConfig(spec.name, hyper) for spec in losses.LOSSES for hyper in _settings(spec)]
    configs += [LossConfig(spec.name, hyper, beta) for spec in losses.LOSSES for hyper in _settings(spec)
                for beta in BETAS]
    return configs


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 300
    hidden: int = 128
    lr: float = 1e-2
    weight_decay: float = 1e-2
    backend: str = "auto"


class MLPEnsemble(torch.nn.Module):
    """K independent two-layer MLPs evaluated together: input (K, N, F) -> logits (K, N, C)."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, seeds, prior_bias: bool):
        super().__init__()
        firsts, heads = [], []
        for seed in seeds:
            # Each member is initialised exactly as a freshly seeded nn.Linear pair would be.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                first = torch.nn.Linear(in_features, hidden)
                head = torch.nn.Linear(hidden, num_classes)
            if prior_bias:
                init_prior_bias_(head)  # the paper's recipe for sigmoid-based losses: every p_c starts at 1/C
            firsts.append(first)
            heads.append(head)
        self.w1 = torch.nn.Parameter(torch.stack([m.weight.detach().t() for m in firsts]))
        self.b1 = torch.nn.Parameter(torch.stack([m.bias.detach().unsqueeze(0) for m in firsts]))
        self.w2 = torch.nn.Parameter(torch.stack([m.weight.detach().t() for m in heads]))
        self.head_bias = torch.nn.Parameter(torch.stack([m.bias.detach().unsqueeze(0) for m in heads]))

    def forward(self, x):
        h = torch.relu(torch.baddbmm(self.b1, x, self.w1))
        return torch.baddbmm(self.head_bias, h, self.w2)


def make_loss(config: LossConfig, counts, backend: str):
    """The loss as sum over rows (see the module docstring); plain losses pass class_weight=None."""
    hyper = dict(config.hyperparameters)
    if config.balanced:
        return ClassBalancedLoss(counts, loss_type=config.loss, beta=config.beta, reduction="sum", backend=backend,
                                 **hyper)
    spec = config.spec
    return lambda z, y: functional.apply_loss(spec, z, y, None, "sum", -100, backend, hyper)


def per_class_recall(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, N, C) logits, (N,) labels -> (K, C) recall of each class for each model (argmax prediction)."""
    correct = (logits.argmax(dim=2) == y).float()
    totals = torch.bincount(y, minlength=num_classes).float()
    hits = torch.zeros(logits.shape[0], num_classes, device=logits.device).index_add_(1, y, correct)
    return hits / totals


def train_and_evaluate(config: LossConfig, trains: list[Split], seeds, counts, evals: dict[str, Split],
                       num_classes: int, settings: TrainSettings, device) -> dict[str, torch.Tensor]:
    """Trains one model per seed (trains[k] drawn with seeds[k]); returns {split name: (K, C) recall}, on the CPU."""
    x = torch.stack([t.x for t in trains]).to(device)
    y = torch.cat([t.y for t in trains]).to(device)
    rows_per_model = x.shape[1]
    # The paper's prior bias (every p_c starts at 1/C) is for the one-vs-all sigmoid losses, the focal family.
    model = MLPEnsemble(x.shape[2], settings.hidden, num_classes, seeds,
                        prior_bias=config.spec.family is losses.SIGMOID_FOCAL).to(device)
    loss_fn = make_loss(config, counts, settings.backend)
    if isinstance(loss_fn, torch.nn.Module):
        loss_fn = loss_fn.to(device)
    # Decoupled weight decay (AdamW) on everything but the classifier bias, which the paper keeps at its
    # prior unless the data move it. Adam's steps do not depend on the loss's scale, so the focal loss needs
    # no larger learning rate here (the paper, under SGD, gave it 2-4x the softmax rate for its smaller scale).
    optimizer = torch.optim.AdamW([
        {"params": [model.w1, model.b1, model.w2], "weight_decay": settings.weight_decay},
        {"params": [model.head_bias], "weight_decay": 0.0},
    ], lr=settings.lr, fused=torch.device(device).type in ("cpu", "cuda"))
    for _ in range(settings.steps):
        optimizer.zero_grad(set_to_none=True)
        logits = model(x).reshape(-1, num_classes)
        (loss_fn(logits, y) / rows_per_model).backward()
        optimizer.step()
    with torch.no_grad():
        out = {}
        for name, split in evals.items():
            xs = split.x.to(device).expand(len(seeds), -1, -1)
            out[name] = per_class_recall(model(xs), split.y.to(device), num_classes).cpu()
    return out
