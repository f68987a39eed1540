"""The "dense" preset: forward + backward with dense (N, C) targets against class-index targets, side by side.

    python -m cbkernels bench --preset dense --device cpu --out DIR

For each registered loss at each shape, every provider is a public loss call (reduction "mean", the kernel
backend native to the device, fused backward) followed by torch.autograd.grad, timed as one step:
  index              class-index targets (N,), weighting="row": today's path, the yardstick;
  dense, row         dense targets, weighting="row" (row weight sum_c t_c w_c: a first sweep of the targets);
  dense, element     dense targets, weighting="element" (each class's term times its weight);
  index, element     class-index targets, weighting="element".
Dense targets: multi-hot rows with 1-3 positives for the sigmoid losses, mixup rows lam onehot(a) + (1 - lam)
onehot(b) for the softmax losses. The timing depends on their values only where a kernel skips classes whose
coefficient is 0 (the CPU softmax focal loss without smoothing: a mixup row computes 2 classes' focal terms).
Two floors, timed in the same rounds: "extra read", one read of the dense targets (torch.sum over them: the
N x C bytes a dense target adds), and "copy", the logits copied into a gradient-sized buffer (the read +
write no forward + backward can avoid).

Reported per loss: the median over interleaved rounds of each provider's ms (spread: interquartile range),
and dense / (index + extra read) per round, whose median is what the dense-target speed target bounds (<= 1.25
on the CPU). Each provider is checked against the float64 reference before it is timed. Every step is timed
by timing.measure_ms (perf_counter on the CPU; CUDA events with the L2 flushed on a GPU, eager).
"""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from .. import _backends, functional, losses
from . import runner
from .cases import IGNORE_INDEX, loss_and_grad, make_inputs
from .timing import measure_ms, summarize

TARGET_RATIO = 1.25
CHECK_RTOL = {torch.float32: 1e-4, torch.bfloat16: 4e-2}


def dense_target(spec: losses.Loss, n: int, c: int, dtype: torch.dtype, device, seed: int = 1) -> torch.Tensor:
    """Multi-hot rows with 1-3 positives (sigmoid family), mixup rows of two classes (softmax families)."""
    g = torch.Generator().manual_seed(seed)
    if spec.family is losses.SIGMOID_FOCAL:
        target = torch.zeros(n, c)
        for k in range(3):
            rows = torch.arange(n)[torch.rand(n, generator=g) < (1.0, 0.6, 0.3)[k]]
            target[rows, torch.randint(0, c, (len(rows),), generator=g)] = 1.0
    else:
        lam = torch.rand(n, 1, generator=g)
        a, b = torch.randint(0, c, (n,), generator=g), torch.randint(0, c, (n,), generator=g)
        target = lam * F.one_hot(a, c) + (1 - lam) * F.one_hot(b, c)
    return target.to(dtype).to(device)


def _providers(spec, backend, target, dense, weight):
    hyper = spec.defaults()

    def step(t, weighting):
        def fn(x):
            return functional.apply_loss(spec, x, t, weight, "mean", IGNORE_INDEX, backend, hyper,
                                         weighting=weighting)
        return fn

    return [("index", step(target, "row"), target, "row"), ("dense, row", step(dense, "row"), dense, "row"),
            ("dense, element", step(dense, "element"), dense, "element"),
            ("index, element", step(target, "element"), target, "element")]


def _check(spec, fn, logits, target, weight, weighting):
    """The provider's loss and gradient against the float64 reference (relative errors within CHECK_RTOL)."""
    x = logits.detach().clone().requires_grad_(True)
    loss, grad = loss_and_grad(fn, x)
    z = logits.detach().double().cpu().requires_grad_(True)
    t = target.cpu().double() if target.dim() == 2 else target.cpu()
    ref_loss, ref_grad = loss_and_grad(lambda v: spec.reference(v, t, weight.double().cpu(), "mean", IGNORE_INDEX,
                                                                weighting=weighting, **spec.defaults()), z)
    loss_err, grad_err = runner.rel_errors(loss.cpu(), grad.cpu(), ref_loss, ref_grad)
    rtol = CHECK_RTOL.get(logits.dtype, 1e-2)
    if not (loss_err <= rtol and grad_err <= rtol):
        raise AssertionError(f"{spec.name}: loss error {loss_err:.2e}, gradient error {grad_err:.2e} > {rtol:g}")


def measure(loss_types, shapes, dtype, device, rounds: int, echo=print) -> list[dict]:
    device = torch.device(device)
    backend = _backends.native_kernel_backends(device)[0]
    rows = []
    for n, c in shapes:
        for name in loss_types:
            spec = losses.loss(name)
            inputs = make_inputs(n, c, dtype, device)
            dense = dense_target(spec, n, c, dtype, device)
            providers = _providers(spec, backend, inputs.target, dense, inputs.weight)
            for _, fn, target, weighting in providers:
                _check(spec, fn, inputs.logits, target, inputs.weight, weighting)
            x = inputs.logits.detach().clone().requires_grad_(True)
            grad_buffer = torch.empty_like(inputs.logits)
            timed = [(label, lambda v, fn=fn: loss_and_grad(fn, v)) for label, fn, _, _ in providers]
            timed += [("extra read", lambda v: dense.sum()), ("copy", lambda v: grad_buffer.copy_(inputs.logits))]
            samples = {label: [] for label, _ in timed}
            for label, run in timed:  # warm-up
                run(x)
            for _ in range(rounds):
                for label, run in timed:
                    samples[label] += measure_ms(lambda run=run: run(x), device, repeats=1, warmup=0)
            ratios = {f"{label} / (index + extra read)": [d / (i + r) for d, i, r in zip(
                samples[label], samples["index"], samples["extra read"])] for label in ("dense, row", "dense, element")}
            row = {"loss": name, "N": n, "C": c, "dtype": str(dtype).replace("torch.", ""), "backend": backend,
                   "rounds": rounds}
            for label, values in samples.items():
                row[f"{label} ms"], row[f"{label} spread"] = summarize(values)
            for label, values in ratios.items():
                row[label] = statistics.median(values)
            rows.append(row)
            echo(table_markdown([row]))
    return rows


def table_markdown(rows: list[dict]) -> str:
    head = ("| loss | N x C | index | dense, row | dense, element | index, element | extra read | copy | "
            "dense row / (index + read) | dense element / (index + read) |\n" + "|---" * 10 + "|\n")
    body = ""
    for r in rows:
        ms = " | ".join(f"{r[f'{k} ms']:.3f} ± {r[f'{k} spread']:.3f}" for k in
                        ("index", "dense, row", "dense, element", "index, element", "extra read", "copy"))
        ratios = " | ".join(f"{r[f'dense, {k} / (index + extra read)']:.2f}x" for k in ("row", "element"))
        body += f"| {r['loss']} | {r['N']} x {r['C']} {r['dtype']} | {ms} | {ratios} |\n"
    return head + body


def verdict_markdown(rows: list[dict]) -> str:
    worst = max(max(r["dense, row / (index + extra read)"], r["dense, element / (index + extra read)"])
                for r in rows)
    return (f"Worst dense / (index + extra read): {worst:.2f}x (target <= {TARGET_RATIO}x): "
            f"{'met' if worst <= TARGET_RATIO else 'NOT met'}.\n")
