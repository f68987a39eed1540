"""Per-class logit adjustments of the long-tail literature, as the (C,) tensors the losses take
(docs/long-tail.md): logit_offset (added to every row's logits) and target_margin (subtracted from each
row's target logit), both applied inside the kernels.

- Logit adjustment (Menon et al., ICLR 2021): logit_offset = tau * log(prior), prior_c = n_c / sum n.
  The loss then trains z + tau log(prior), so at test time argmax z is the balanced-error classifier.
  Balanced Softmax (Ren et al., NeurIPS 2020) is the softmax cross entropy with tau = 1.
- LDAM (Cao et al., NeurIPS 2019): target_margin_c = C_m / n_c^(1/4), with C_m chosen so that the largest
  margin is max_margin, times the logit scale s of the normalised (cosine) classifier, since the margin is
  taken before the logits are scaled: s * (cos - m) = s * cos - s * m.
"""
from __future__ import annotations

import torch

from .weights import checked_counts

__all__ = ["logit_adjustment_offsets", "ldam_margins"]


def _nonzero_counts(samples_per_class, what: str) -> torch.Tensor:
    counts = checked_counts(samples_per_class)
    if (counts == 0).any():
        bad = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"samples_per_class: classes {bad[:20]}{' ...' if len(bad) > 20 else ''} have 0 samples: "
                         f"{what}; give them a pseudo-count (e.g. 1)")
    return counts


def _finite_number(value, name: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 if positive else value >= 0) or value == float("inf"):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")
    return value


def logit_adjustment_offsets(samples_per_class, tau: float = 1.0) -> torch.Tensor:
    """tau * log(n_c / sum_c n_c) as float32 (C,): the logit_offset of logit-adjusted losses (tau = 1:
    Balanced Softmax with loss_type "softmax"). Computed in float64, rounded once."""
    counts = _nonzero_counts(samples_per_class, "their log prior would be -inf")
    tau = _finite_number(tau, "tau", positive=False)
    return (tau * torch.log(counts / counts.sum())).to(torch.float32)


def ldam_margins(samples_per_class, max_margin: float = 0.5, scale: float = 30.0) -> torch.Tensor:
    """scale * max_margin * n_c^(-1/4) / max_c n_c^(-1/4) as float32 (C,): the target_margin of the LDAM loss
    for logits that are `scale` times a cosine (the rarest class gets scale * max_margin). Computed in
    float64, rounded once."""
    counts = _nonzero_counts(samples_per_class, "their margin would be infinite")
    max_margin = _finite_number(max_margin, "max_margin", positive=False)
    scale = _finite_number(scale, "scale", positive=True)
    inverse_fourth_root = counts.pow(-0.25)
    return (scale * max_margin * inverse_fourth_root / inverse_fourth_root.max()).to(torch.float32)
