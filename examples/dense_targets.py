"""Dense targets with the class-balanced losses: a multi-label task and mixup, on small synthetic long-tailed data.

    .venv/bin/python examples/dense_targets.py            # about half a minute on 2 CPU cores

1. Multi-label: every sample carries 1-3 labels drawn from a long-tailed label distribution; its features are
   the sum of its labels' prototypes plus noise. A linear head is trained with the focal loss on the multi-hot
   targets, plainly and class-balanced (weights from the label counts; row weight sum_c t_c w_c, the official
   code's convention; normalizer = number of positive labels, the official code's divisor), and scored by the
   macro-averaged average precision on a balanced test set.
2. Mixup: single-label long-tailed data; every batch is mixed with a shuffled copy of itself and the softmax
   cross entropy takes the mixed probability rows lam * onehot(a) + (1 - lam) * onehot(b) directly. Scored by
   the balanced (mean per-class) test accuracy.

The numbers it prints are one seed of a toy problem: an illustration of the API, not evidence about
the method (the demo, `make demo`, is the measured comparison).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import cbkernels as cb


def long_tail_probabilities(num_classes, imbalance, generator):
    counts = torch.tensor(cb.long_tail_counts(num_classes, 1000, imbalance), dtype=torch.float64)
    return counts[torch.randperm(num_classes, generator=generator)] / counts.sum()


def multi_label_data(prototypes, label_probabilities, n, generator, noise=1.5):
    """(features, multi-hot targets (n, C))."""
    num_classes = prototypes.shape[0]
    num_labels = torch.randint(1, 4, (n,), generator=generator)
    targets = torch.zeros(n, num_classes)
    for i in range(n):
        labels = torch.multinomial(label_probabilities, int(num_labels[i]), replacement=False, generator=generator)
        targets[i, labels] = 1.0
    features = targets @ prototypes + noise * torch.randn(n, prototypes.shape[1], generator=generator)
    return features, targets


def single_label_data(prototypes, label_probabilities, n, generator, noise=2.0):
    labels = torch.multinomial(label_probabilities, n, replacement=True, generator=generator)
    features = prototypes[labels] + noise * torch.randn(n, prototypes.shape[1], generator=generator)
    return features, labels


def macro_average_precision(scores, targets):
    """Mean over classes with a positive of the average precision (precision at each positive, ranked by score)."""
    precisions = []
    for c in range(targets.shape[1]):
        order = torch.argsort(scores[:, c], descending=True)
        hits = targets[order, c]
        if hits.sum() == 0:
            continue
        precision_at = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
        precisions.append(float((precision_at * hits).sum() / hits.sum()))
    return sum(precisions) / len(precisions)


def balanced_accuracy(logits, labels, num_classes):
    correct = (logits.argmax(dim=1) == labels).float()
    per_class = [float(correct[labels == c].mean()) for c in range(num_classes) if (labels == c).any()]
    return sum(per_class) / len(per_class)


def train(features, targets, loss_fn, num_classes, steps, batch, generator, mixup=False):
    head = torch.nn.Linear(features.shape[1], num_classes)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.2, momentum=0.9)
    for _ in range(steps):
        index = torch.randint(0, features.shape[0], (batch,), generator=generator)
        x, t = features[index], targets[index]
        if mixup:  # mix each sample with another of the batch: x and the one-hot rows alike
            lam = float(torch.distributions.Beta(0.4, 0.4).sample())
            partner = torch.randperm(batch, generator=generator)
            x = lam * x + (1 - lam) * x[partner]
            t = lam * F.one_hot(t, num_classes).float() + (1 - lam) * F.one_hot(t[partner], num_classes).float()
        loss = loss_fn(head(x), t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=40)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(args.seed)
    num_classes, dim = args.classes, 32
    prototypes = torch.randn(num_classes, dim, generator=generator) * 1.2
    probabilities = long_tail_probabilities(num_classes, 100, generator)
    uniform = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)

    features, targets = multi_label_data(prototypes, probabilities, 4000, generator)
    test_features, test_targets = multi_label_data(prototypes, uniform, 2000, generator)
    weights = cb.class_balanced_weights(targets.sum(dim=0), beta=0.999, empty_classes="zero")
    print(f"multi-label: {num_classes} classes, {int(targets.sum())} training labels, "
          f"{int(targets.sum(0).max())} to {int(targets.sum(0).min())} per class")
    for name, class_weight in (("focal, plain", None), ("focal, class-balanced", weights)):
        head = train(features, targets, lambda z, t, w=class_weight: cb.cb_focal_loss(
            z, t, w, gamma=0.5, normalizer=t.sum()), num_classes, args.steps, 128, generator)
        with torch.no_grad():
            score = macro_average_precision(head(test_features), test_targets)
        print(f"  {name:<24} macro average precision on a balanced test set: {score:.3f}")

    features, labels = single_label_data(prototypes, probabilities, 4000, generator)
    test_features, test_labels = single_label_data(prototypes, uniform, 2000, generator)
    counts = torch.bincount(labels, minlength=num_classes)
    weights = cb.class_balanced_weights(counts, beta=0.999, empty_classes="zero")
    print(f"mixup: {int(counts.max())} to {int(counts.min())} training samples per class")
    for name, class_weight in (("softmax, plain", None), ("softmax, class-balanced", weights)):
        head = train(features, labels, lambda z, t, w=class_weight: cb.cb_softmax_cross_entropy(z, t, w),
                     num_classes, args.steps, 128, generator, mixup=True)
        with torch.no_grad():
            score = balanced_accuracy(head(test_features), test_labels, num_classes)
        print(f"  {name:<24} balanced test accuracy: {score:.3f}")


if __name__ == "__main__":
    main()
