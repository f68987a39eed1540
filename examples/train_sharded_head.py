"""Train a class-sharded linear head with a class-parallel CB loss on CPU (gloo), and time its steps.

    .venv/bin/torchrun --standalone --nproc-per-node 2 examples/train_sharded_head.py --steps 10

Every rank holds the weight rows of a contiguous class range (uneven when C % world != 0) and computes
only its (N, C_local) slice of the logits; the features and targets of a batch are the same on every rank
(in a real model they come from a backbone replicated or data-parallel across these ranks). The class
weights come from the whole (synthetic, long-tailed) training set, whose labels are split across the ranks
and counted with global_class_counts.

What crosses the ranks per step is counted from the tensors handed to torch.distributed.all_reduce
(payload bytes per rank; a ring all-reduce puts about 2 (P-1)/P times that on each link). Only the head
is trained here: with a trainable backbone, d(loss)/d(features) is also summed over the ranks, one more
(N, hidden) all-reduce per step, still independent of C.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch
import torch.distributed as dist

from cbkernels import class_balanced_weights, long_tail_counts
from cbkernels import distributed as cbd

LOSSES = {"softmax": cbd.cb_softmax_cross_entropy_parallel, "focal": cbd.cb_focal_loss_parallel,
          "sigmoid": cbd.cb_sigmoid_cross_entropy_parallel}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--classes", type=int, default=8142 * 3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--loss", choices=sorted(LOSSES), default="focal")
    p.add_argument("--gamma", type=float, default=0.5)
    p.add_argument("--beta", type=float, default=0.999)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / ranks)")
    return p.parse_args()


def shard_sizes(num_classes: int, world: int) -> list[int]:
    """Contiguous, as even as possible: the first C % world ranks get one class more."""
    return [num_classes // world + (r < num_classes % world) for r in range(world)]


@contextlib.contextmanager
def count_all_reduce(record: list):
    """Appends (bytes, seconds) for every dist.all_reduce inside the block: numel * element_size of the
    tensor, and the wall time of the call (on CPU/gloo it returns when the reduction is done, so the time
    includes waiting for the slowest rank to arrive).

    cbkernels.distributed looks dist.all_reduce up at call time, so wrapping the module attribute sees
    exactly the tensors the losses communicate.
    """
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        start = time.perf_counter()
        result = original(tensor, *args, **kwargs)
        record.append((tensor.numel() * tensor.element_size(), time.perf_counter() - start))
        return result

    dist.all_reduce = counting
    try:
        yield record
    finally:
        dist.all_reduce = original


def synthetic_data(args, generator):
    """A long-tailed label set (the paper's profile, imbalance 100) and features = class prototype + noise."""
    counts = torch.tensor(long_tail_counts(args.classes, 40, 100.0))
    labels = torch.repeat_interleave(torch.arange(args.classes), counts)
    prototypes = torch.randn(args.classes, args.hidden, generator=generator)
    return labels, prototypes


def batch(labels, prototypes, size, generator):
    target = labels[torch.randint(0, labels.numel(), (size,), generator=generator)]
    features = prototypes[target] + 0.5 * torch.randn(size, prototypes.shape[1], generator=generator)
    return features, target


def main():
    args = parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)

    generator = torch.Generator().manual_seed(0)  # same data on every rank
    labels, prototypes = synthetic_data(args, generator)
    # Each rank counts its own part of the training set; one all_reduce gives the whole-dataset counts.
    counts = cbd.global_class_counts(labels[rank::world], args.classes)
    weight = class_balanced_weights(counts, args.beta)

    sizes = shard_sizes(args.classes, world)
    class_start, num_classes = cbd.class_shard_range(sizes[rank])  # once, at setup: no per-step host read
    head = torch.nn.Linear(args.hidden, sizes[rank])
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(1 + rank))
        # The paper's prior bias -log((1 - pi) / pi), pi = 1 / C, for the sigmoid losses (global C, not C_local).
        head.bias.fill_(-torch.log(torch.tensor(num_classes - 1.0)).item() if args.loss != "softmax" else 0.0)
    # The bias is excluded from weight decay, as in the paper.
    optimizer = torch.optim.SGD([{"params": [head.weight], "weight_decay": 1e-4},
                                 {"params": [head.bias], "weight_decay": 0.0}], lr=args.lr, momentum=0.9)
    loss_fn = LOSSES[args.loss]
    extra = {"gamma": args.gamma} if args.loss == "focal" else {}

    times, losses, step_bytes, comm_times = [], [], [], []
    for step in range(args.warmup + args.steps):
        features, target = batch(labels, prototypes, args.batch, generator)
        record = []
        dist.barrier()  # start every rank's step together, so the time includes waiting for the slowest
        start = time.perf_counter()
        with count_all_reduce(record):
            loss = loss_fn(head(features), target, weight, class_start=class_start, num_classes=num_classes,
                           **extra)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)
            losses.append(loss.item())
            step_bytes.append(sum(b for b, _ in record))
            comm_times.append(sum(t for _, t in record))

    # The slowest rank's median step time is the step time of the group.
    median = torch.tensor(statistics.median(times), dtype=torch.float64)
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    if rank == 0:
        dense = args.batch * num_classes * 4
        print(f"ranks={world} threads/rank={threads} N={args.batch} C={num_classes} hidden={args.hidden} "
              f"loss={args.loss} shards={sizes}")
        print(f"loss: first {losses[0]:.4f} last {losses[-1]:.4f}")
        print(f"step time: median {median.item() * 1e3:.1f} ms (slowest rank); rank 0 min "
              f"{min(times) * 1e3:.1f} max {max(times) * 1e3:.1f} ms over {len(times)} steps")
        print(f"time inside all_reduce (rank 0, includes waiting for other ranks): median "
              f"{statistics.median(comm_times) * 1e3:.2f} ms per step")
        print(f"all-reduce payload per rank per step: {step_bytes[0]} bytes "
              f"({step_bytes[0] / args.batch:.0f} bytes per row) vs {dense} bytes to gather the (N, C) fp32 logits")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
