"""The audit's gates (issue targets): what must hold for every shipped kernel variant.

Per kernel launch (every GPU record):
- no-local-memory: no local memory (no spills, no stack arrays);
- ctas-per-sm>=2: at least two CTAs resident per SM (a CTA's barriers and tails overlap another's work);
- 16-byte-accesses (float32): the N x C loads and stores are 16-byte vectors (a split store fails).
Per loss, forward + backward, on the H200 at (N, C) = PCT_COPY_SHAPE (the issue's targets are stated there
only; other shapes are audited with the per-kernel gates): predicted % of copy bandwidth of at least
PCT_COPY_TARGETS[loss, dtype], for the target kinds of PCT_COPY_GATED_TARGETS. A dense target's loss is held to
the same % of copy (of its own floor: logits and targets read, gradient written) but a shortfall is reported
as a missed target, not a failed gate: its kernels do not meet the targets yet (docs/roofline.md, "Dense
targets"), and a gate that always fails would stop the audit guarding everything else.
"""
from __future__ import annotations

MIN_CTAS_PER_SM = 2
VECTOR_BYTES = 16
PCT_COPY_GPU = "H200"
PCT_COPY_SHAPE = (8192, 8142)
# softmax_focal at its defaults (gamma 2, no label smoothing) is the softmax's one pass with two per-row
# scalars changed: the softmax's targets.
PCT_COPY_TARGETS = {
    ("softmax", "float32"): 90.0, ("sigmoid", "float32"): 90.0, ("focal", "float32"): 90.0,
    ("softmax_focal", "float32"): 90.0,
    ("softmax", "bfloat16"): 90.0, ("sigmoid", "bfloat16"): 80.0, ("focal", "bfloat16"): 70.0,
    ("softmax_focal", "bfloat16"): 90.0,
}
PCT_COPY_GATED_TARGETS = ("index",)


def kernel_failures(metrics, dtype: str) -> list[str]:
    failed = []
    if metrics.local_bytes:
        failed.append(f"no-local-memory ({metrics.local_bytes} B/thread)")
    if metrics.ctas_per_sm < MIN_CTAS_PER_SM:
        failed.append(f"ctas-per-sm>={MIN_CTAS_PER_SM} ({metrics.ctas_per_sm})")
    if dtype == "float32":
        for what, width in (("loads", metrics.load_width), ("stores", metrics.store_width)):
            if width is not None and width < VECTOR_BYTES:
                failed.append(f"16-byte-accesses ({what} {width} B)")
    return failed


def loss_failures(loss: str, dtype: str, gpu: str, shape: tuple[int, int], pct_copy: float) -> list[str]:
    target = PCT_COPY_TARGETS.get((loss, dtype))
    if gpu != PCT_COPY_GPU or tuple(shape) != PCT_COPY_SHAPE or target is None or pct_copy >= target:
        return []
    return [f"pct-copy>={target:g}% on {gpu} ({pct_copy:.1f}%)"]
