"""Rows split into column chunks (cbkernels/triton/split.py, softmax_split.py; the rule: grid.split_geometry).

Every split kernel against the float64 reference on fresh random inputs (loss and gradient, through the raw
ops and through the public functions' reductions and backward strategies), with every input the split path
takes: class weights, ignored rows, label smoothing, sample weights, logit offsets and target margins,
element weights, dense targets (the sigmoid family without class weights); edge shapes (one row, C not a
multiple of the chunk, a short last chunk, a last chunk with no body column). Each such test asserts that the
split launches ran (`split_runs`), so that none passes on the unsplit kernels. Then the rule at the audited
GPU's numbers, the inputs that keep the unsplit kernels, NaN rows, the audit model of a split launch, and an
sm_90 compile of the split kernels.

Under the interpreter the device has grid.INTERPRETER_SMS = 2 SMs: one row splits there, and the softmax's
gradient launches of a few long rows (the L2 rule). For several short rows the tests give the device more
SMs (`device`: the launcher reads them from grid.sm_count) and a small tile (16 columns, 4 a chunk at least).
"""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import cbkernels as cb
from cases import assert_grad_close, assert_loss_close, assert_matches_reference, make_inputs
from cbkernels import losses
from cbkernels.losses import loss as registered_loss

pytestmark = pytest.mark.triton

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETED:
    pytest.skip("the split path's CPU tests run under TRITON_INTERPRET=1 (conftest.py sets it without a GPU)",
                allow_module_level=True)
ops = pytest.importorskip("cbkernels.triton.ops", reason="triton is not importable")
from cbkernels.triton import configs, grid, kernels  # noqa: E402  (after the importorskip)

IGNORE = -100
TILE = configs.LaunchConfig(block=16, rows=1, num_warps=1, num_stages=2, programs_per_sm=2)
SMS = 8  # the test device: fewer rows than 8 split
H200_SMS, H200_L2 = 132, 50 * 2**20


@pytest.fixture
def split_runs(monkeypatch):
    """The split op calls made in the test (ops.split_launches is wrapped): [(family kernel, launches)]."""
    calls = []
    real = ops.split_launches

    def recording(kinds, *args):
        out = real(kinds, *args)
        calls.append((kinds, out))
        return out

    monkeypatch.setattr(ops, "split_launches", recording)
    return calls


@pytest.fixture
def device(monkeypatch):
    """A device of SMS SMs and the small tile: every launch of fewer than SMS rows of >= 128 columns splits."""
    monkeypatch.setattr(grid, "sm_count", lambda _device: SMS)
    with configs.override(TILE):
        yield


def _op(family, which):
    return family.op(torch.ops.cbkernels_triton, which)


def _inputs(n, c, dtype, generator, *, margin=False, dense=False, family=None):
    """Logits, class-index targets (rows 1 and n - 2 ignored when n > 3; the first and last class present),
    class weights and the optional inputs, fresh from `generator`."""
    logits = (torch.randn(n, c, generator=generator, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, c, (n,), generator=generator)
    target[0] = c - 1
    if n > 1:
        target[-1] = 0
    if n > 3:
        target[1] = target[n - 2] = IGNORE
    if dense:
        target = torch.rand(n, c, generator=generator, dtype=torch.float64).to(dtype)
    optional = dict(
        class_weight=torch.rand(c, generator=generator) + 0.1,
        logit_offset=torch.randn(c, generator=generator),
        target_margin=torch.rand(c, generator=generator) * 2 if margin else None,
        sample_weight=torch.rand(n, generator=generator) + 0.5,
        element_weight=torch.rand(c, generator=generator) + 0.5,
    )
    return logits, target, optional


def _reference(spec, hyper, logits, target, optional, grad_loss):
    """(rows, d rows . grad_loss / d logits) of the float64 reference (losses.Loss.reference_rows)."""
    z = logits.double().requires_grad_(True)
    dense = target.dim() == 2
    rows = spec.reference_rows(z, target.double() if dense else target, _double(optional["class_weight"]), IGNORE,
                               hyper, _double(optional["logit_offset"]), _double(optional["target_margin"]),
                               _double(optional["sample_weight"]), _double(optional["element_weight"]))
    (grad,) = torch.autograd.grad(rows, z, grad_loss.double())
    return rows.detach(), grad


def _double(t):
    return None if t is None else t.double()


def _check_ops(spec, hyper, logits, target, optional, split_runs, what):
    """The three op calls a loss makes (forward with and without the gradient, backward with a random
    upstream gradient) against the reference, each on the split path."""
    family = spec.family
    n = logits.shape[0]
    args = (optional["class_weight"], *hyper, IGNORE)
    extra = (optional["logit_offset"], optional["target_margin"], optional["sample_weight"],
             optional["element_weight"])
    grad_loss = torch.randn(n, dtype=torch.float64).float()
    ref_rows, ref_grad = _reference(spec, hyper, logits, target, optional, torch.ones(n))
    _, ref_scaled = _reference(spec, hyper, logits, target, optional, grad_loss)
    before = len(split_runs)
    rows, grad = _op(family, "forward")(logits, target, *args, True, *extra)
    rows_only, _ = _op(family, "forward")(logits, target, *args, False, *extra)
    scaled = _op(family, "backward")(logits, target, optional["class_weight"], grad_loss, *hyper, IGNORE, *extra)
    assert len(split_runs) == before + 3, f"{what}: the split path was not taken"
    assert_loss_close(rows, ref_rows, f"{what} loss")
    assert torch.equal(rows_only, rows), f"{what}: the loss-only launches give other rows"
    assert_grad_close(grad, ref_grad, logits.dtype, f"{what} grad")
    assert_grad_close(scaled, ref_scaled, logits.dtype, f"{what} scaled grad")
    if target.dim() == 1:
        ignored = target == IGNORE
        assert (rows[ignored] == 0).all() and (grad[ignored] == 0).all() and (scaled[ignored] == 0).all()


# Each loss at its defaults, the cross entropy with label smoothing (the split's third statistic) and other
# gamma cases; in fp32, and the defaults in bfloat16 (float16 for two of them).
CASES = (("softmax", (0.0,)), ("sigmoid", (0.0,)), ("focal", (0.5,)), ("softmax_focal", (2.0, 0.0)),
         ("softmax", (0.1,)), ("focal", (3.7,)), ("softmax_focal", (0.5, 0.0)))
SPLIT_CASES = [pytest.param(registered_loss(name), hyper, id=f"{name}-{'-'.join(map(str, hyper))}")
               for name, hyper in CASES]
DTYPE_CASES = ([pytest.param(registered_loss(name), hyper, torch.float32, id=f"{name}-{hyper}-fp32")
                for name, hyper in CASES]
               + [pytest.param(registered_loss(name), hyper, torch.bfloat16, id=f"{name}-{hyper}-bf16")
                  for name, hyper in CASES[:4]]
               + [pytest.param(registered_loss(name), hyper, torch.float16, id=f"{name}-{hyper}-fp16")
                  for name, hyper in CASES[:3:2]])


@pytest.mark.parametrize("spec,hyper,dtype", DTYPE_CASES)
def test_split_ops_match_the_reference(spec, hyper, dtype, device, split_runs, generator):
    """Five rows (two ignored) of 200 columns: 3 chunks (80, 80, 40 columns: C is no multiple of the chunk),
    with every optional input the split takes (element weights: not with the softmax's smoothing, which
    keeps the unsplit per-class path)."""
    softmax = spec.family.name != "sigmoid_focal"
    logits, target, optional = _inputs(5, 200, dtype, generator, margin=softmax)
    if softmax and hyper[-1] > 0:
        optional["element_weight"] = None
    _check_ops(spec, hyper, logits, target, optional, split_runs, f"{spec.name} {hyper} {dtype}")
    (kinds, launches), = split_runs[:1]
    assert {launch.per_row for launch in launches if launch.kernel is kinds.kernel} == {3}


@pytest.mark.parametrize("spec,hyper", SPLIT_CASES[:1] + SPLIT_CASES[3:4] + SPLIT_CASES[5:6])
def test_edge_shapes(spec, hyper, split_runs, device, generator):
    """C = 321: 4 chunks of 80 columns and a last one of 1, the row's tail, which chunk 0's edge tile holds (a
    chunk with no body column), on one row and on three rows."""
    for n in (1, 3):
        logits, target, optional = _inputs(n, 321, torch.float32, generator, margin=spec.family.name != "sigmoid_focal")
        _check_ops(spec, hyper, logits, target, optional, split_runs, f"{spec.name} N={n}")
        assert split_runs[-1][1][0].per_row == 5  # the first launch's units: 5 chunks a row


def test_sigmoid_family_dense_targets_without_class_weights(device, split_runs, generator):
    """A dense target splits when there are no class weights (its row weight is then the sample weight)."""
    spec = registered_loss("focal")
    for dtype in (torch.float32, torch.bfloat16):
        logits, target, optional = _inputs(3, 150, dtype, generator, dense=True)
        optional["class_weight"] = None
        _check_ops(spec, (0.5,), logits, target, optional, split_runs, f"focal dense {dtype}")


# Every reduction and both strategies for the smoothed cross entropy; two pairs for the others.
PUBLIC_CASES = [pytest.param(registered_loss(name), hyper, reduction, strategy, id=f"{name}-{reduction}-{strategy}")
                for name, hyper, pairs in (
                    ("softmax", {"label_smoothing": 0.1}, [("none", "fused"), ("mean", "recompute"),
                                                           ("sum", "fused"), ("sum", "recompute")]),
                    ("focal", {}, [("mean", "fused"), ("none", "recompute")]),
                    ("softmax_focal", {}, [("sum", "fused"), ("mean", "recompute")]))
                for reduction, strategy in pairs]


@pytest.mark.parametrize("spec,hyper,reduction,strategy", PUBLIC_CASES)
def test_public_functions_on_the_split_path(spec, hyper, reduction, strategy, device, split_runs, monkeypatch):
    """Reductions and backward strategies (the fused backward's in-place scaling, the recompute backward's
    scaled gradient) through the public function, on 6 rows of 150 columns (some ignored), and the sample
    weights and normalizer of the public API."""
    monkeypatch.setenv("CBKERNELS_BACKWARD", strategy)
    logits, target, weight = make_inputs(6, 150, torch.float32, "cpu", ignore_frac=0.3)
    assert_matches_reference("triton", spec, hyper, logits, target, weight, reduction=reduction)
    assert split_runs, "the split path was not taken"
    sample_weight = torch.rand(6) + 0.5
    fn = getattr(cb, spec.function)
    x = logits.clone().requires_grad_(True)
    out = fn(x, target, weight, reduction=reduction, backend="triton", sample_weight=sample_weight, **hyper)
    z = logits.double().requires_grad_(True)
    ref = spec.reference(z, target, weight.double(), reduction, IGNORE, sample_weight=sample_weight.double(), **hyper)
    upstream = torch.randn(ref.shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, x, upstream.float())
    (ref_grad,) = torch.autograd.grad(ref, z, upstream)
    assert_loss_close(out, ref.detach(), f"{spec.name} sample weights loss")
    assert_grad_close(grad, ref_grad, torch.float32, f"{spec.name} sample weights grad")


def test_softmax_rows_in_l2_batches(device, split_runs, monkeypatch, generator):
    """An L2 of 3 200-column fp32 rows: the gradient's launches take the rows in balanced batches of 1 row
    (half of it holds 1), statistics then gradient each; a loss-only call reads no row twice: one batch."""
    monkeypatch.setattr(grid, "l2_bytes", lambda _device: 3 * 200 * 4)
    spec = registered_loss("softmax")
    logits, target, optional = _inputs(4, 200, torch.float32, generator, margin=True)
    optional["element_weight"] = None  # with smoothing: the per-class path, not split
    _check_ops(spec, (0.1,), logits, target, optional, split_runs, "softmax in batches")
    (kinds, with_grad), (_, loss_only), (_, backward) = split_runs
    for launches in (with_grad, backward):
        assert [(launch.row0, launch.rows) for launch in launches] == [(r, 1) for r in range(4) for _ in (0, 1)]
        assert [launch.kernel for launch in launches] == [kinds.stats, kinds.kernel] * 4
    assert [(launch.row0, launch.rows, launch.per_row) for launch in loss_only] == [(0, 4, 3), (0, 4, 1)]


def test_interpreter_device_splits_one_row_and_long_softmax_rows(split_runs):
    """With the interpreter's own device (2 SMs, a 256 KiB L2) and its table: one row splits, two do not; the
    softmax's gradient launches of 3 rows of 16400 fp32 columns (two of them overflow half of that L2) split
    into batches of one row, 2 chunks each (9 tiles of 2048), and match the reference."""
    spec = registered_loss("softmax")
    logits, target, weight = make_inputs(3, 16400, torch.float32, "cpu", ignore_frac=0.0)
    entry = kernels.FAMILY_KERNELS["softmax_ce"]
    plan = ops._plan(spec.family, 16400, logits, (0.0,))
    l2 = grid.l2_bytes(logits.device)
    rows_split = ops.split_of(plan, entry, 3, 16400, 4, True, True, False, grid.INTERPRETER_SMS, l2)
    assert rows_split == grid.Split(chunks=2, chunk_cols=5 * 2048, batch_rows=1)
    assert ops.split_of(plan, entry, 3, 16400, 4, False, True, False, grid.INTERPRETER_SMS, l2) is None
    assert ops.split_of(plan, entry, 1, 16400, 4, False, True, False, grid.INTERPRETER_SMS, l2) is not None
    focal = losses.family("sigmoid_focal")
    focal_plan = ops._plan(focal, 16400, logits, (0.5,))
    assert ops.split_of(focal_plan, kernels.FAMILY_KERNELS["sigmoid_focal"], 2, 16400, 4, True, True, False,
                        grid.INTERPRETER_SMS, l2) is None
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CBKERNELS_BACKWARD", "fused")
        assert_matches_reference("triton", spec, {}, logits, target, weight, reduction="sum")
    assert split_runs and len(split_runs[0][1]) == 6


@pytest.mark.parametrize("family", losses.FAMILIES, ids=lambda f: f.name)
def test_nan_in_a_later_chunk(family, device, split_runs):
    """NaN in the last chunk of row 0: the softmax's whole row is NaN (every probability depends on it, through
    the combined statistics), the sigmoid family's row loss and that one gradient entry; other rows stay
    finite; an ignored row with NaN and inf is exactly 0."""
    logits, target, weight = make_inputs(4, 200, torch.float32, "cpu", ignore_frac=0.0)
    target[2] = IGNORE
    logits[0, 190] = float("nan")
    logits[2, 5], logits[2, 150] = float("nan"), float("inf")
    hyper = tuple(max(h.test_values) if h.name == "gamma" else 0.0 for h in family.hyperparameters)
    rows, grad = _op(family, "forward")(logits, target, weight, *hyper, IGNORE, True)
    assert split_runs
    assert torch.isnan(rows[0]) and torch.isfinite(rows[[1, 3]]).all() and rows[2] == 0
    if family.name == "sigmoid_focal":
        assert torch.isnan(grad[0]).nonzero().flatten().tolist() == [190]
    else:
        assert torch.isnan(grad[0]).all()
    assert torch.isfinite(grad[[1, 3]]).all() and (grad[2] == 0).all()


def test_inputs_that_keep_the_unsplit_kernels(device, split_runs, generator):
    """What the split kernels do not compute takes the family kernel: the sigmoid family's dense target with
    class weights, the softmax's per-class path (a dense target; element weights with smoothing), the softmax
    focal loss with smoothing; several rows per tile (short rows)."""
    logits, target, optional = _inputs(3, 150, torch.float32, generator)
    dense = torch.rand(3, 150, generator=generator)
    weight, element = optional["class_weight"], optional["element_weight"]
    for family, hyper, tgt, ew in ((losses.family("sigmoid_focal"), (0.5,), dense, None),
                                   (losses.family("softmax_ce"), (0.0,), dense / dense.sum(1, keepdim=True), None),
                                   (losses.family("softmax_ce"), (0.1,), target, element),
                                   (losses.family("softmax_focal"), (2.0, 0.1), target, None)):
        _op(family, "forward")(logits, tgt, weight, *hyper, IGNORE, True, None, None, None, ew)
    with configs.override(configs.LaunchConfig(block=16, rows=2, num_warps=1)):
        _op(losses.family("softmax_ce"), "forward")(logits, target, weight, 0.0, IGNORE, True)
    assert not split_runs


def test_split_rule_at_the_h200():
    """grid.split_geometry at the H200's 132 SMs and 50 MiB of L2 on the class sweep (N x C = 2^24), with the
    table's tiles: the sigmoid family splits below 132 rows, one chunk a program (N x chunks <= 5 x 132); the
    softmax's gradient launches also at 256 rows of 65536 fp32 columns (one program per SM would hold 33 MiB
    between its reads), in batches of at most 25 MiB; nothing at the benchmark's (8192, 8142) nor at 1024 rows.
    The chunks tile the row: a multiple of the tile each, the last one short but not empty of columns."""
    def geometry(n, c, block, per_sm, reread=0):
        return grid.split_geometry(n, c, block, per_sm, H200_SMS, H200_L2, reread)

    assert geometry(8192, 8142, 2048, 5) is None and geometry(1024, 16384, 2048, 3, 16384 * 4) is None
    assert geometry(256, 65536, 2048, 5) is None  # sigmoid: every SM has its rows
    assert geometry(256, 65536, 2048, 4, 65536 * 2) is None  # bf16 softmax: one program per SM fits half of L2
    for n, c, block, per_sm, elem in ((128, 131072, 2048, 5, 0), (64, 262144, 4096, 5, 0), (256, 65536, 2048, 3, 4),
                                      (128, 131072, 2048, 3, 4), (64, 262144, 2048, 4, 2), (1, 16384, 2048, 5, 0)):
        s = geometry(n, c, block, per_sm, c * elem)
        assert s is not None and s.chunk_cols % block == 0 and s.chunks >= 2
        assert (s.chunks - 1) * s.chunk_cols < c <= s.chunks * s.chunk_cols
        assert s.batch_rows * s.chunks <= per_sm * H200_SMS
        assert s.batch_rows * c * elem <= H200_L2 // grid.REREAD_L2_DIVISOR
    assert geometry(256, 65536, 2048, 3, 65536 * 4).batch_rows == 86  # 3 batches of 21.5 MiB
    assert geometry(64, 4096, 2048, 5) is None  # 2 tiles: shorter than two chunks of grid.MIN_CHUNK_TILES


def test_audit_model_of_split_launches():
    """The audit's records of a split loss (triton_variants): the softmax at 64 x 262144 fp32 runs 3 batches of
    statistics then gradient (its re-read from L2), each launch after the op's first paying the launch
    boundary; a split launch's threads share a row with the other chunks' (a row is `chunks` row groups)."""
    from cbkernels.audit import metrics, roofline, triton_variants
    from cbkernels.audit.launches import Launch

    records = triton_variants.launches("softmax", "float32", 64, 262144)
    names = [r.kernel.split("[")[0] for r in records]
    assert names == ["softmax_split_stats_kernel", "softmax_split_finish_kernel"] * 3 + ["scale_rows_unless_one_kernel"]
    assert [r.follows_launch for r in records] == [False] + [True] * 5 + [False]
    assert sum(r.batch_rows for r in records[:-1:2]) == 64
    assert all(r.reread_bytes_per_elem == 4 for r in records[1:-1:2])
    sigmoid = triton_variants.launches("sigmoid", "float32", 64, 262144)
    assert [r.kernel.split("[")[0] for r in sigmoid] == ["sigmoid_focal_split_kernel", "sum_parts_kernel",
                                                         "scale_rows_unless_one_kernel"]
    chunks = sigmoid[0].threads_per_row // sigmoid[0].threads_per_cta
    assert metrics.rows_per_thread(sigmoid[0], 64) == -(-64 * chunks // sigmoid[0].ctas) == 1
    load = roofline.KernelLoad(elements=1 << 20, nc_bytes=8 << 20, instr_per_elem=1.0, mufu_per_elem=0.1, ctas=528,
                               ctas_per_sm=4, threads_per_cta=128, load_bytes_in_flight_per_thread=256.0,
                               pipelined=True, dependent_round_trips=2, thread_instructions=100.0)
    alone = roofline.predict(roofline.H200, load)
    after = roofline.predict(roofline.H200, dataclasses.replace(load, follows_launch=True))
    gap, trip = roofline.LAUNCH_GAP_US * 1e-3, roofline.H200.latency_us * 1e-3
    assert after.ms == pytest.approx(alone.ms + gap + trip) and after.boundary_ms == pytest.approx(gap + trip)
    assert isinstance(records[0], Launch)


_SM90_SPLIT = """
from cbkernels.audit import gates, triton_variants
from cbkernels.audit.__init__ import kernel_metrics
from cbkernels.audit.compile_triton import compile_kernel
seen = set()
for loss, dtype, n, c in (("focal", "bfloat16", 64, 262144), ("softmax", "float32", 64, 262144)):
    for launch in triton_variants.launches(loss, dtype, n, c):
        name = launch.kernel.split("[")[0]
        if name in seen or "split" not in name and name != "sum_parts_kernel":
            continue
        seen.add(name)
        metrics = kernel_metrics(launch, compile_kernel(launch.code, 90), n, c, dtype, 90)
        assert not gates.kernel_failures(metrics, "float32"), (name, gates.kernel_failures(metrics, "float32"))
        if name != "sum_parts_kernel":
            assert metrics.pipelined, name + ": the chunk's tile loop is not pipelined"
print(sorted(seen))
"""


def test_split_kernels_compile_for_sm90():
    """The real compiler on the split kernels for sm_90 (a subprocess without the interpreter), through the
    audit's compile and gates: no local memory, at least 2 CTAs per SM, 16-byte N x C loads and stores (bf16
    too), the chunk's tile loop pipelined (cp.async)."""
    pytest.importorskip("triton.backends.nvidia", reason="this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", _SM90_SPLIT], env=env, capture_output=True, text=True, timeout=300,
                            cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.split("\n")[-2] == str(sorted(["sigmoid_focal_split_kernel", "sum_parts_kernel",
                                                        "softmax_split_stats_kernel",
                                                        "softmax_split_finish_kernel"]))
