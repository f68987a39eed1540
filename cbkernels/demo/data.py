"""The demo's data: scikit-learn's bundled handwritten digits, made long-tailed the paper's way.

load_digits reads a file shipped inside scikit-learn (1,797 real 8x8 images, 10 classes), so the demo
never touches the network. The split, per class:
  test        a balanced held-out set (the paper keeps the test set balanced);
  validation  a small balanced set carved from the training pool, used only to pick beta and gamma;
  pool        the rest, subsampled by long_tail_indices into n_i = n_max * mu^i (n_max = the smallest
              pool class, so every class can fill its quota; class 0 is the head, class 9 the tail).
The test/validation split is fixed (data_seed); each training seed draws its own long-tailed subsample.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..weights import long_tail_counts, long_tail_indices

TEST_PER_CLASS = 50
VAL_PER_CLASS = 20


@dataclass
class Split:
    x: torch.Tensor  # (N, 64) float32, pixel intensities scaled to [0, 1]
    y: torch.Tensor  # (N,) int64


@dataclass
class DigitsSplits:
    pool: Split
    val: Split
    test: Split
    num_classes: int


def load_digit_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (x float32 in [0, 1], y int64); no network access."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are integers 0..16.
    x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    return x, y


def split_digits(x: torch.Tensor, y: torch.Tensor, data_seed: int = 0) -> DigitsSplits:
    """Balanced test and validation sets (TEST_PER_CLASS, VAL_PER_CLASS per class); the rest is the pool."""
    num_classes = int(y.max()) + 1
    generator = torch.Generator().manual_seed(data_seed)
    test, val, pool = [], [], []
    for c in range(num_classes):
        members = torch.nonzero(y == c).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        test.append(members[:TEST_PER_CLASS])
        val.append(members[TEST_PER_CLASS:TEST_PER_CLASS + VAL_PER_CLASS])
        pool.append(members[TEST_PER_CLASS + VAL_PER_CLASS:])

    def take(parts):
        idx = torch.sort(torch.cat(parts)).values
        return Split(x[idx], y[idx])

    return DigitsSplits(take(pool), take(val), take(test), num_classes)


def pool_n_max(splits: DigitsSplits) -> int:
    return int(torch.bincount(splits.pool.y, minlength=splits.num_classes).min())


def long_tailed_train(splits: DigitsSplits, imbalance_factor: float, seed: int) -> Split:
    """The pool subsampled into the paper's long-tailed profile (one draw per seed)."""
    idx = long_tail_indices(splits.pool.y, imbalance_factor, seed=seed, n_max=pool_n_max(splits))
    return Split(splits.pool.x[idx], splits.pool.y[idx])


def train_counts(splits: DigitsSplits, imbalance_factor: float) -> list[int]:
    """Training samples per class for this imbalance factor (the same for every seed)."""
    return long_tail_counts(splits.num_classes, pool_n_max(splits), imbalance_factor)
