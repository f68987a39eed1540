"""Class-balanced weights from the effective number of samples (Cui et al., CVPR 2019).

E_n = (1 - beta^n) / (1 - beta) is the expected volume covered by n samples of a class whose
"unique prototypes" number N = 1 / (1 - beta) (docs/math.md, section 1). The class weight is 1 / E_n,
normalised so the weights sum to the number of classes (the official code's convention, which keeps
the loss on the scale of the unweighted loss; docs/math.md, section 2). The long-tailed profile and
the prior bias follow the paper's recipe (docs/math.md, sections 11 and 10).
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "effective_number",
    "class_balanced_weights",
    "long_tail_counts",
    "long_tail_indices",
    "init_prior_bias_",
]


def _as_float64(values, name: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be numeric, got {type(values).__name__}") from exc
    return t.detach().cpu()


def checked_counts(samples_per_class) -> torch.Tensor:
    """samples_per_class as a float64 CPU tensor, refused unless a non-empty 1-D sequence of finite counts >= 0."""
    counts = _as_float64(samples_per_class, "samples_per_class")
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(
            f"samples_per_class must be a non-empty 1-D sequence of counts, got shape {tuple(counts.shape)}"
        )
    if torch.isnan(counts).any() or torch.isinf(counts).any():
        raise ValueError("samples_per_class must be finite")
    if (counts < 0).any():
        bad = torch.nonzero(counts < 0).flatten().tolist()
        raise ValueError(f"samples_per_class must be non-negative; negative counts at classes {bad[:20]}")
    return counts


def _check_beta(beta: torch.Tensor) -> None:
    if torch.isnan(beta).any() or (beta < 0).any() or (beta > 1).any():
        raise ValueError(f"beta must lie in [0, 1], got {beta.tolist() if beta.numel() < 10 else beta}")


def effective_number(n, beta) -> torch.Tensor:
    """Effective number of samples E_n = (1 - beta^n) / (1 - beta), as float64.

    Stable form (docs/math.md#effective-number): beta^n = exp(n * log1p(beta - 1)), so
    1 - beta^n = -expm1(n * log1p(beta - 1)) keeps full relative precision where the naive
    1 - beta**n cancels, i.e. where beta^n is close to 1 (n * (1 - beta) small: for beta = 1 - 1e-12,
    n = 10 the naive form keeps about 11 digits). beta == 1 is the limit E_n = n; beta == 0 gives
    E_n = 1 for n >= 1; E_0 = 0. n and beta broadcast against each other.
    """
    n = _as_float64(n, "n")
    beta = _as_float64(beta, "beta")
    if (n < 0).any() or torch.isnan(n).any():
        raise ValueError("n (number of samples) must be non-negative")
    _check_beta(beta)
    n, beta = torch.broadcast_tensors(n, beta)
    one_minus_beta = 1.0 - beta
    # log1p(beta - 1) = log(beta); at beta == 0 it is -inf and n * -inf = -inf (n > 0) -> E = 1,
    # while n == 0 gives 0 * -inf = nan, handled by the n == 0 branch below (E_0 = 0).
    with torch.no_grad():
        log_beta = torch.log1p(-one_minus_beta)
        stable = -torch.expm1(n * log_beta) / one_minus_beta
    out = torch.where(beta == 1.0, n, stable)
    return torch.where(n == 0, torch.zeros_like(out), out)


def class_balanced_weights(samples_per_class, beta=0.999, empty_classes: str = "error") -> torch.Tensor:
    """Per-class weights w_c = (1 - beta) / (1 - beta^{n_c}), normalised to sum to C (float32, shape (C,)).

    samples_per_class: counts over the whole training set (not a batch), length C >= 1.
    beta: a scalar or one value per class, in [0, 1]. beta = 0 gives all-ones weights; beta -> 1
      approaches inverse-frequency weights.
    empty_classes: "error" (a class with 0 samples raises ValueError naming the classes: its weight
      would be infinite in the official code) or "zero" (weight 0; the others are normalised to sum to the
      number of classes that have samples, so their mean weight is 1 and the loss's scale does not depend
      on how many classes are empty). Formulas and the official code's convention: docs/math.md, section 2.
    """
    counts = checked_counts(samples_per_class)
    if empty_classes not in ("error", "zero"):
        raise ValueError(f"empty_classes must be 'error' or 'zero', got {empty_classes!r}")
    beta_t = _as_float64(beta, "beta")
    if beta_t.dim() > 1 or (beta_t.dim() == 1 and beta_t.numel() != counts.numel()):
        raise ValueError(
            f"beta must be a scalar or have one value per class ({counts.numel()}), got shape {tuple(beta_t.shape)}"
        )
    _check_beta(beta_t)

    empty = counts == 0
    if empty.any():
        if empty_classes == "error":
            bad = torch.nonzero(empty).flatten().tolist()
            raise ValueError(
                f"samples_per_class: classes {bad[:20]}{' ...' if len(bad) > 20 else ''} have 0 samples: their class-balanced "
                "weight is infinite; pass empty_classes='zero' to give them weight 0"
            )
        if empty.all():
            raise ValueError("every class has 0 samples: no class-balanced weights exist")

    present_classes = counts.numel() - int(empty.sum())
    inv_effective = torch.where(empty, torch.zeros_like(counts), 1.0 / effective_number(counts.clamp(min=1), beta_t))
    weights = inv_effective / inv_effective.sum() * present_classes
    return weights.to(torch.float32)


def long_tail_counts(num_classes: int, n_max: int, imbalance_factor: float) -> list[int]:
    """The paper's long-tailed profile n_i = n_max * mu^i, i = 0..C-1, with mu = (1/imbalance_factor)^(1/(C-1)).

    n_0 = n_max and n_0 / n_{C-1} = imbalance_factor up to rounding; every class keeps at least 1 sample
    (docs/math.md, section 11).
    """
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes}")
    if int(n_max) != n_max or n_max < 1:
        raise ValueError(f"n_max must be a positive integer, got {n_max}")
    if not imbalance_factor >= 1:
        raise ValueError(f"imbalance_factor must be >= 1, got {imbalance_factor}")
    if num_classes == 1:
        return [int(n_max)]
    mu = (1.0 / imbalance_factor) ** (1.0 / (num_classes - 1))
    return [max(1, int(math.floor(n_max * mu**i + 0.5))) for i in range(num_classes)]


def long_tail_indices(labels, imbalance_factor: float, seed: int = 0, n_max: int | None = None) -> torch.Tensor:
    """Indices that subsample a (roughly balanced) labelled set into the long-tailed profile.

    Class c (in 0..C-1 order, C = max label + 1) keeps long_tail_counts(C, n_max, imbalance_factor)[c]
    samples drawn at random with the given seed; n_max defaults to the size of the smallest class so
    every class can supply its quota. Returns a sorted int64 tensor of indices into labels.
    """
    labels = torch.as_tensor(labels).detach().cpu()
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError("labels must be a non-empty 1-D sequence of class indices")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
    if (labels < 0).any():
        raise ValueError("labels must be non-negative class indices")
    labels = labels.long()
    num_classes = int(labels.max()) + 1
    per_class = torch.bincount(labels, minlength=num_classes)
    if (per_class == 0).any():
        raise ValueError(f"classes {torch.nonzero(per_class == 0).flatten().tolist()} have no samples")
    smallest = int(per_class.min())
    if n_max is None:
        n_max = smallest
    elif n_max > smallest:
        raise ValueError(f"n_max={n_max} exceeds the smallest class size {smallest}")
    quota = long_tail_counts(num_classes, n_max, imbalance_factor)
    generator = torch.Generator().manual_seed(int(seed))
    chosen = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        pick = torch.randperm(members.numel(), generator=generator)[: quota[c]]
        chosen.append(members[pick])
    return torch.sort(torch.cat(chosen)).values


def init_prior_bias_(linear: torch.nn.Linear, prior=None) -> torch.nn.Linear:
    """Set a classifier's bias to b = -log((1 - pi) / pi), in place: sigmoid(b) = pi (the paper's recipe for
    sigmoid losses, docs/math.md, section 10).

    With pi = 1/C (the default) every class starts at probability 1/C instead of 0.5, so the C - 1
    negatives of each sample do not dominate the first steps. prior may be a scalar or one value per
    class in (0, 1). Exclude this bias from weight decay (the paper does).
    """
    if not isinstance(linear, torch.nn.Linear) or linear.bias is None:
        raise ValueError("init_prior_bias_ needs an nn.Linear with a bias")
    num_classes = linear.out_features
    pi = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64) if prior is None else _as_float64(prior, "prior")
    if pi.dim() > 1 or (pi.dim() == 1 and pi.numel() != num_classes):
        raise ValueError(f"prior must be a scalar or have {num_classes} values, got shape {tuple(pi.shape)}")
    if ((pi <= 0) | (pi >= 1) | torch.isnan(pi)).any():
        raise ValueError("prior must lie strictly between 0 and 1")
    bias = -torch.log((1.0 - pi) / pi)
    with torch.no_grad():
        linear.bias.copy_(bias.expand(num_classes).to(linear.bias.dtype))
    return linear
