"""cbkernels: fused-kernel class-balanced losses (Cui et al., CVPR 2019) for PyTorch."""
from ._backends import available_backends
from .adjustments import ldam_margins, logit_adjustment_offsets
from .functional import *  # noqa: F403  (the public function of every registered loss: functional.__all__)
from .functional import __all__ as _LOSS_FUNCTIONS
from .linear import ClassBalancedLinearLoss, cb_linear_loss
from .modules import ClassBalancedLoss
from .weights import (class_balanced_weights, effective_number, init_prior_bias_, long_tail_counts,
                      long_tail_indices)

__version__ = "0.1.0"
__all__ = [
    *_LOSS_FUNCTIONS, "ClassBalancedLoss",
    "effective_number", "class_balanced_weights", "long_tail_counts", "long_tail_indices", "init_prior_bias_",
    "logit_adjustment_offsets", "ldam_margins", "available_backends", "cb_linear_loss", "ClassBalancedLinearLoss",
]
# Class-parallel losses need a process group: `from cbkernels import distributed` (docs/distributed.md).
