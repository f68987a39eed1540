"""nn.Module wrapper: the class-balanced weights live in a buffer (follow .to(), saved in state_dict)."""
from __future__ import annotations

import torch

from . import _backends, _checks, functional, losses
from .weights import checked_counts, class_balanced_weights


class ClassBalancedLoss(torch.nn.Module):
    """Class-balanced loss with weights from the effective number of samples of each class.

    samples_per_class: training-set counts (length C). beta in [0, 1] (scalar or per class).
    loss_type: a registered loss (losses.LOSS_TYPES: "softmax", "sigmoid", "focal", "softmax_focal"); each uses
    the hyperparameters it names (gamma: "focal", "softmax_focal"; label_smoothing: "softmax",
    "softmax_focal") and ignores the others. gamma=None: the loss's default (0.5 for "focal", 2.0 for
    "softmax_focal").
    logit_offset, target_margin: (C,) logit adjustments (docs/long-tail.md; target_margin for the softmax losses
    only), held as buffers like the class weights (None: no buffer, no adjustment).
    set_beta(beta) recomputes the class weights during training (deferred re-weighting: beta = 0 gives weights
    of 1, the plain loss, and a later set_beta(0.9999) switches the class-balanced weights on).
    weighting: "row" (default) or "element", as in the functions (cbkernels.functional).
    forward(logits, target, sample_weight=None, normalizer=None): target as class indices (N,) or dense (N, C)
    rows; per-row weights (N,) and the "mean" divisor of this batch, as in the functions.
    """

    def __init__(self, samples_per_class, loss_type="focal", beta=0.999, gamma=None, reduction="mean",
                 ignore_index=-100, backend="auto", label_smoothing=0.0, empty_classes="error", logit_offset=None,
                 target_margin=None, weighting="row"):
        super().__init__()
        self.spec = losses.loss(loss_type)
        _backends.check_name(backend)
        _checks.check_reduction(reduction)
        self.weighting = _checks.check_weighting(weighting)
        self.loss_type = loss_type
        checked = self.spec.checked(gamma=gamma, label_smoothing=label_smoothing)
        self.gamma, self.label_smoothing = checked["gamma"], checked["label_smoothing"]
        self.reduction = reduction
        self.ignore_index = _checks.check_ignore_index(ignore_index)
        self.backend = backend
        self.empty_classes = empty_classes
        # The counts for set_beta: a float64 CPU tensor, not a buffer, which .to(dtype) would round.
        self.samples_per_class = checked_counts(samples_per_class)
        self.register_buffer("class_weight", class_balanced_weights(samples_per_class, beta, empty_classes))
        self.beta = beta
        logit_offset, target_margin = _checks.check_logit_adjustments(
            self.spec.family, logit_offset, target_margin, self.num_classes, self.class_weight.device,
            device_of="class_weight")
        self.register_buffer("logit_offset", logit_offset)
        self.register_buffer("target_margin", target_margin)

    @property
    def num_classes(self) -> int:
        return self.class_weight.shape[0]

    def set_beta(self, beta) -> None:
        """Recomputes the class weights from the stored counts with a new beta, in place (the buffer keeps its
        device; no new module, no optimizer change)."""
        weights = class_balanced_weights(self.samples_per_class, beta, self.empty_classes)
        self.class_weight.copy_(weights)
        self.beta = beta

    def hyperparameters(self) -> dict[str, float]:
        """The values of the loss's settable hyperparameters."""
        return {h.name: getattr(self, h.name) for h in self.spec.hyperparameters}

    def forward(self, logits, target, sample_weight=None, normalizer=None):
        # The buffers straight from _buffers: self.class_weight goes through nn.Module.__getattr__, a Python
        # fallback measured at ~0.8 us, a tenth of a small call's host time.
        buffers = self._buffers
        return functional.apply_loss(self.spec, logits, target, buffers["class_weight"], self.reduction,
                                     self.ignore_index, self.backend, self.hyperparameters(), buffers["logit_offset"],
                                     buffers["target_margin"], sample_weight, normalizer, self.weighting)

    def extra_repr(self) -> str:
        adjusted = [name for name in ("logit_offset", "target_margin") if self._buffers[name] is not None]
        return (f"num_classes={self.num_classes}, loss_type={self.loss_type!r}, beta={self.beta}, "
                f"gamma={self.gamma}, reduction={self.reduction!r}, backend={self.backend!r}"
                + ("" if self.weighting == "row" else f", weighting={self.weighting!r}")
                + "".join(f", {name}=(C,)" for name in adjusted))
