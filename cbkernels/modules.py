"""nn.Module wrapper: the class-balanced weights live in a buffer (follow .to(), saved in state_dict)."""
from __future__ import annotations

import torch

from . import _backends, _checks, functional
from .weights import class_balanced_weights

LOSS_TYPES = ("softmax", "sigmoid", "focal")


class ClassBalancedLoss(torch.nn.Module):
    """Class-balanced loss with weights from the effective number of samples of each class.

    samples_per_class: training-set counts (length C). beta in [0, 1] (scalar or per class).
    loss_type: "softmax", "sigmoid" or "focal" (gamma used by "focal" only; label_smoothing by "softmax" only).
    """

    def __init__(self, samples_per_class, loss_type="focal", beta=0.999, gamma=0.5, reduction="mean",
                 ignore_index=-100, backend="auto", label_smoothing=0.0, empty_classes="error"):
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if backend not in _backends.BACKENDS:
            raise ValueError(f"backend must be one of {_backends.BACKENDS}, got {backend!r}")
        _checks.check_reduction(reduction)
        self.loss_type = loss_type
        self.beta = beta
        self.gamma = _checks.check_gamma(gamma)
        self.reduction = reduction
        self.ignore_index = _checks.check_ignore_index(ignore_index)
        self.backend = backend
        self.label_smoothing = _checks.check_label_smoothing(label_smoothing)
        self.register_buffer("class_weight", class_balanced_weights(samples_per_class, beta, empty_classes))

    @property
    def num_classes(self) -> int:
        return self.class_weight.shape[0]

    def forward(self, logits, target):
        if self.loss_type == "softmax":
            return functional.cb_softmax_cross_entropy(logits, target, self.class_weight, self.reduction,
                                                       self.ignore_index, self.label_smoothing, self.backend)
        gamma = self.gamma if self.loss_type == "focal" else 0.0
        return functional.cb_focal_loss(logits, target, self.class_weight, gamma, self.reduction,
                                        self.ignore_index, self.backend)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, loss_type={self.loss_type!r}, beta={self.beta}, "
                f"gamma={self.gamma}, reduction={self.reduction!r}, backend={self.backend!r}")
