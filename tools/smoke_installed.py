"""Smoke test of an installed cbkernels (a wheel in a fresh virtual environment), run from outside the
source tree: every public name is called once and compared with the float64 reference, so a package
file or build step missing from the wheel fails here (tools/wheel_check.sh runs it; CI calls that).
"""
import os
import sys
import tempfile

import torch
import torch.distributed as dist

import cbkernels as cb
from cbkernels import distributed as cbd
from cbkernels import losses

SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check(condition, what):
    if not condition:
        raise SystemExit(f"smoke test failed: {what}")
    print(f"ok  {what}")


def main():
    package_dir = os.path.dirname(os.path.abspath(cb.__file__))
    check(not package_dir.startswith(SOURCE_ROOT + os.sep), f"cbkernels imported from the installation ({package_dir})")
    check("cpu" in cb.available_backends("cpu"), "the C++ CPU kernels are in the wheel")

    g = torch.Generator().manual_seed(0)
    counts = cb.long_tail_counts(7, 50, 10.0)
    weights = cb.class_balanced_weights(counts, beta=0.99)
    check(abs(float(weights.sum()) - 7) < 1e-4, "class_balanced_weights sums to C")
    check(float(cb.effective_number(1, 0.9)) == 1.0, "effective_number(1, beta) == 1")
    labels = torch.arange(7).repeat_interleave(60)
    check(len(cb.long_tail_indices(labels, 10.0)) == sum(cb.long_tail_counts(7, 60, 10.0)),
          "long_tail_indices keeps the profile")

    logits = torch.randn(9, 7, generator=g)
    target = torch.randint(0, 7, (9,), generator=g)
    for spec in losses.LOSSES:
        function = getattr(cb, spec.function)
        x = logits.clone().requires_grad_(True)
        loss = function(x, target, weights)
        loss.backward()
        x64 = logits.double().requires_grad_(True)
        expected = spec.reference(x64, target, weights.double())
        expected.backward()
        check(torch.allclose(loss.double(), expected, rtol=1e-5) and torch.allclose(x.grad.double(), x64.grad, atol=1e-6),
              f"{spec.function} matches the float64 reference (loss and gradient)")
        module = cb.ClassBalancedLoss(counts, loss_type=spec.name, beta=0.99)
        check(torch.allclose(module(logits, target), function(logits, target, weights)),
              f"ClassBalancedLoss(loss_type={spec.name!r})")
        hidden, w = torch.randn(9, 5, generator=g), torch.randn(7, 5, generator=g)
        fused = cb.cb_linear_loss(hidden, w, target, weights, loss_type=spec.name)
        check(torch.allclose(fused, function(hidden @ w.T, target, weights), rtol=1e-5),
              f"cb_linear_loss(loss_type={spec.name!r})")
    head = cb.ClassBalancedLinearLoss(5, counts)
    check(head(torch.randn(9, 5, generator=g), target).dim() == 0, "ClassBalancedLinearLoss")
    linear = cb.init_prior_bias_(torch.nn.Linear(5, 7))
    check(torch.allclose(linear.bias, torch.full((7,), -torch.log(torch.tensor(6.0)).item())), "init_prior_bias_")

    with tempfile.TemporaryDirectory() as store:
        dist.init_process_group("gloo", init_method=f"file://{store}/rendezvous", rank=0, world_size=1)
        try:
            for name in cbd.__all__:
                if name.endswith("_parallel"):
                    value = getattr(cbd, name)(logits, target, weights, class_start=0, num_classes=7)
                    single = getattr(cb, name[: -len("_parallel")])(logits, target, weights)
                    check(torch.allclose(value, single, rtol=1e-5), f"distributed.{name} on one rank")
            check(cbd.class_shard_range(7) == (0, 7), "distributed.class_shard_range")
            check(torch.equal(cbd.global_class_counts(labels, 7), torch.full((7,), 60)),
                  "distributed.global_class_counts")
        finally:
            dist.destroy_process_group()
    print("installed-package smoke test passed")


if __name__ == "__main__":
    sys.exit(main())
