"""What only the Triton backend promises, beyond the shared property tests.

The loss/gradient comparisons with the float64 reference (every loss, dtype, reduction, layout, strategy,
under a forced small tile and the static table) run for this backend with every other in
test_matches_reference.py, test_backend_edges.py, test_numerics.py, test_properties.py, test_compile.py and
test_determinism.py (the `backend` fixture of conftest.py; here the kernels run on CPU tensors under
TRITON_INTERPRET=1, set by conftest.py before triton is imported). Here: scale.py's row scaling, the
launch-configuration table and its override, tile-specific paths (a NaN after a row's maximum in a later
tile, the single-read and two-pass softmax on confident rows), the op contract called directly (no
gradient without with_grad, out-of-range targets give NaN rows, N = 0, argument errors, schemas, opcheck),
the clear error without the interpreter, the sm_90 compile and the sweep's dry run. Tests marked gpu repeat
the device-only checks at real sizes on a CUDA device (`make gpu-check`).
"""
import os
import subprocess
import sys

import pytest
import torch

from cases import DTYPES, FAMILY_PARAMS, assert_matches_reference, family_hyperparameters, loss_cases, make_inputs
from cbkernels import _ops, losses

pytestmark = pytest.mark.triton

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not INTERPRETED:
    pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (conftest.py sets it without a GPU)",
                allow_module_level=True)
triton_ops = pytest.importorskip("cbkernels.triton.ops", reason="triton is not importable")
from cbkernels.triton import configs  # noqa: E402  (after the importorskip)

SMALL = configs.LaunchConfig(block=16, rows=2, num_warps=1)  # C = 33 -> 3 tiles, last one partial
FAMILIES = FAMILY_PARAMS
SOFTMAX_CE = losses.family("softmax_ce")


@pytest.fixture(params=["small_tiles", "table"])
def tiles(request):
    """Tiles forced small (multi-tile loops, two-pass softmax) and the static table (one tile per row at
    these C: the single-read softmax path)."""
    if request.param == "table":
        yield None
    else:
        with configs.override(SMALL):
            yield SMALL


def _op(family, kind):
    return family.op(torch.ops.cbkernels_triton, kind)


_hyper = family_hyperparameters


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_rows_unless_one(dtype):
    """The fused backward's scaling on CUDA tensors (cbkernels/triton/scale.py), called directly: every
    row whose upstream gradient is not exactly 1 (NaN included) is multiplied in fp32 and rounded once,
    as torch.mul does; rows at 1 keep their values. C spans two tiles, the second one partial."""
    from cbkernels.triton import scale
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(5, scale.TILE + 37, generator=g).to(dtype).to(DEVICE)
    grad_loss = torch.tensor([1.0, 2.5, 1.0, float("nan"), -1e-3], device=DEVICE)
    product = grad.float() * grad_loss[:, None]
    expected = product.to(dtype)
    if INTERPRETED and dtype == torch.bfloat16:
        # The interpreter (numpy has no bf16) converts fp32 to bf16 by truncation; a GPU rounds to nearest.
        expected = (product.view(torch.int32) & -65536).view(torch.float32).to(dtype)
    assert scale.scale_rows_unless_one_(grad, grad_loss) is grad
    torch.testing.assert_close(grad, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(grad[3]).all()


def test_scale_rows_skips_whole_chunks_at_one():
    """Two chunks of rows (scale.CHUNK each, the second partial): a chunk all at 1 is left as it is, a
    chunk with one row not at 1 scales exactly that row; rows of 7 columns (head, body and tail)."""
    from cbkernels.triton import scale
    n = scale.CHUNK + 3
    grad = torch.randn(n, 7, device=DEVICE)
    grad_loss = torch.ones(n, device=DEVICE)
    grad_loss[n - 2] = -3.0
    expected = grad.clone()
    expected[n - 2] *= -3.0
    scale.scale_rows_unless_one_(grad, grad_loss)
    assert torch.equal(grad, expected)


@pytest.mark.parametrize("spec,hyper", loss_cases(where=lambda spec, _: spec.family is SOFTMAX_CE))
def test_softmax_confident_true_class_gradient_survives(spec, hyper, tiles):
    """p_y within fp32's epsilon of 1: the true-class gradient -(1 - p_y) ~ -32 e^-30 must not round to 0
    (it is formed from the sum over the other classes, not as p_y - 1), in fp32 and after bf16 rounding,
    on the single-read (table) and the two-pass (small tiles) softmax."""
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.zeros(3, 33, dtype=dtype, device=DEVICE)
        logits[0, 0] = logits[1, 32] = logits[2, 17] = 30.0
        target = torch.tensor([0, 32, 17], device=DEVICE)
        weight = torch.linspace(0.5, 2.0, 33, device=DEVICE)
        assert_matches_reference("triton", spec, hyper, logits, target, weight, reduction="none")
        _, grad = _op(SOFTMAX_CE, "forward")(logits, target, weight, *spec.kernel_hyperparameters(hyper), -100, True)
        if not any(spec.kernel_hyperparameters(hyper)):  # without smoothing the true class's gradient is < 0
            assert (grad[[0, 1, 2], [0, 32, 17]] < 0).all()


# One row per tile: the per-row branches (ignored rows, the tile holding the target column) that the GPU
# table's rows take; held (one tile holds the row) and streamed (the pipelined loop over 16-column tiles,
# the target in a head, body or tail position), several rows per program (the persistent loop).
PER_ROW_CONFIGS = [
    pytest.param(configs.LaunchConfig(block=64, rows=1, num_warps=1, num_stages=2, programs_per_sm=1), id="held"),
    pytest.param(configs.LaunchConfig(block=16, rows=1, num_warps=1, num_stages=3, programs_per_sm=1), id="streamed"),
]


@pytest.mark.parametrize("config", PER_ROW_CONFIGS)
@pytest.mark.parametrize("spec,hyper", loss_cases())
def test_one_row_per_tile_matches_reference(spec, hyper, config, monkeypatch):
    monkeypatch.setenv("CBKERNELS_BACKWARD", "recompute" if spec.family is SOFTMAX_CE else "fused")
    for dtype in (torch.float32, torch.bfloat16):
        logits, target, weight = make_inputs(6, 37, dtype, DEVICE, ignore_frac=0.3)
        target[0], target[1] = 0, 36  # the first and last columns (a head and a tail at row offsets 0 and 37)
        with configs.override(config):
            for reduction in ("none", "mean"):
                assert_matches_reference("triton", spec, hyper, logits, target, weight, reduction=reduction)


@pytest.mark.parametrize("family", FAMILIES)
def test_row_slice_of_a_wider_tensor(family):
    """A column slice of a wider tensor (row stride != C): same results as its contiguous copy."""
    wide = torch.randn(4, 40, device=DEVICE) * 3
    logits = wide[:, 3:36]
    target = torch.tensor([0, 32, 5, 17], device=DEVICE)
    assert logits.stride() == (40, 1)
    op = _op(family, "forward")
    loss_rows, grad = op(logits, target, None, *_hyper(family), -100, True)
    ref_loss, ref_grad = op(logits.contiguous(), target, None, *_hyper(family), -100, True)
    assert torch.equal(loss_rows, ref_loss) and torch.equal(grad, ref_grad)


# ---------------------------------------------------------------- the op contract directly


@pytest.mark.parametrize("family", FAMILIES)
def test_nan_logits_give_nan_rows_and_ignored_rows_stay_zero(family):
    """NaN in a row -> NaN loss, NaN gradient where the NaN sits (softmax: the whole row, every entry
    depends on it); other rows unaffected; an ignored row gives 0 whatever its logits hold.
    Row 1's NaN sits in a later tile than its max (a max-reduction that drops NaN must not hide it)."""
    logits, target, weight = make_inputs(5, 33, torch.float32, DEVICE, ignore_frac=0.0)
    target[3] = -100
    logits[1, 20] = float("nan")
    logits[1, 2] = 50.0
    logits[3, 4] = float("nan")
    logits[3, 5] = float("inf")
    params = _hyper(family)
    for config in (SMALL, configs.LaunchConfig(block=64, rows=1, num_warps=1)):  # multi-tile and one-tile
        with configs.override(config):
            rows, grad = _op(family, "forward")(logits, target, weight, *params, -100, True)
            back = _op(family, "backward")(logits, target, weight, torch.ones(5, device=DEVICE), *params, -100)
        for g in (grad, back):
            assert torch.isnan(g[1, 20])
            if family is SOFTMAX_CE:
                assert torch.isnan(g[1]).all(), "softmax: every gradient entry of the NaN row is NaN"
            assert (g[3] == 0).all(), "ignored row with NaN/inf logits: gradient exactly 0"
            assert torch.isfinite(g[[0, 2, 4]]).all()
        assert torch.isnan(rows[1]) and rows[3] == 0 and torch.isfinite(rows[[0, 2, 4]]).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_out_of_range_target_gives_nan_row_without_reading_out_of_bounds(family):
    """A target outside [0, C) that is not ignore_index: that row's loss and gradient are NaN
    (GPU convention of the op contract; the interpreter would raise on an out-of-bounds read)."""
    logits, target, weight = make_inputs(4, 33, torch.float32, DEVICE, ignore_frac=0.0)
    target[1] = 33
    target[2] = -7
    with configs.override(SMALL):
        rows, grad = _op(family, "forward")(logits, target, weight, *_hyper(family), -100, True)
    assert torch.isnan(rows[1:3]).all() and torch.isnan(grad[1:3]).all()
    assert torch.isfinite(rows[[0, 3]]).all() and torch.isfinite(grad[[0, 3]]).all()


def test_bad_op_arguments_name_the_argument():
    logits, target, weight = make_inputs(3, 7, torch.float32, DEVICE)
    fwd = torch.ops.cbkernels_triton.sigmoid_focal_forward
    bwd = torch.ops.cbkernels_triton.softmax_ce_backward
    with pytest.raises(ValueError, match="logits must be a 2-D"):
        fwd(logits.double(), target, weight, 0.0, -100, True)
    with pytest.raises(ValueError, match="target must be"):
        fwd(logits, target[:2], weight, 0.0, -100, True)
    with pytest.raises(ValueError, match="class_weight must be"):
        fwd(logits, target, weight.double(), 0.0, -100, True)
    with pytest.raises(ValueError, match="grad_loss must be"):
        bwd(logits, target, weight, torch.ones(3, dtype=torch.float64, device=DEVICE), 0.0, -100)


def test_schemas_match_the_op_contract():
    # triton_op infers the schema from the annotations, and an `int` annotation becomes SymInt (so a
    # dynamic ignore_index traces); otherwise the schemas are the C++ ones of csrc/cbkernels.cpp.
    adjust = (", Tensor? logit_offset=None, Tensor? target_margin=None, Tensor? sample_weight=None, "
              "Tensor? element_weight=None")
    expected = {
        "sigmoid_focal_forward": "(Tensor logits, Tensor target, Tensor? class_weight, float gamma, "
                                 f"SymInt ignore_index, bool with_grad{adjust}) -> (Tensor, Tensor)",
        "sigmoid_focal_backward": "(Tensor logits, Tensor target, Tensor? class_weight, Tensor grad_loss, "
                                  f"float gamma, SymInt ignore_index{adjust}) -> Tensor",
        "softmax_ce_forward": "(Tensor logits, Tensor target, Tensor? class_weight, float label_smoothing, "
                              f"SymInt ignore_index, bool with_grad{adjust}) -> (Tensor, Tensor)",
        "softmax_ce_backward": "(Tensor logits, Tensor target, Tensor? class_weight, Tensor grad_loss, "
                               f"float label_smoothing, SymInt ignore_index{adjust}) -> Tensor",
        "softmax_focal_forward": "(Tensor logits, Tensor target, Tensor? class_weight, float gamma, "
                                 f"float label_smoothing, SymInt ignore_index, bool with_grad{adjust}) -> (Tensor, Tensor)",
    }
    for name, signature in expected.items():
        schema = str(getattr(torch.ops.cbkernels_triton, name).default._schema)
        assert schema == f"cbkernels_triton::{name}{signature}", schema
        if _ops.extension_loaded():  # the C++ extension's schema, but for its ignore_index (int)
            cpp = str(getattr(torch.ops.cbkernels, name).default._schema)
            assert cpp == f"cbkernels::{name}{signature}".replace("SymInt ignore_index", "int ignore_index"), cpp


def _op_cases(n, c, dtype):
    logits, target, weight = make_inputs(n, c, dtype, DEVICE)
    grad_loss = torch.randn(n, device=DEVICE)
    cases = []
    for family in losses.FAMILIES:
        for values in family_values(family):
            cases += [
                (_op(family, "forward"), (logits, target, weight, *values, -100, True)),
                (_op(family, "forward"), (logits.clone().requires_grad_(), target, None, *values, -100, False)),
                (_op(family, "backward"), (logits, target, weight, grad_loss, *values, -100)),
                # the optional inputs: logit_offset, target_margin, sample_weight
                (_op(family, "backward"), (logits, target, weight, grad_loss, *values, -100, None, None,
                                           grad_loss.abs())),
            ]
    return cases


def family_values(family):
    """Two settings of the family's hyperparameters: each at its largest and at its smallest test value."""
    return [tuple(max(h.test_values) for h in family.hyperparameters),
            tuple(min(h.test_values) for h in family.hyperparameters)]


def test_opcheck():
    """Schema, fake kernel, autograd registration and AOT dispatch of the four ops."""
    for op, args in _op_cases(3, 7, torch.float32):
        torch.library.opcheck(op, args)


def test_backend_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = ("import torch, cbkernels, sys\n"
            "import cbkernels.triton\n"
            "assert 'triton' not in sys.modules, 'cbkernels.triton must not import triton'\n"
            "try:\n"
            "    cbkernels.cb_focal_loss(torch.randn(2, 3), torch.tensor([0, 1]), backend='triton')\n"
            "except RuntimeError as exc:\n"
            "    assert 'TRITON_INTERPRET=1' in str(exc), exc\n"
            "    print('clear error')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "clear error" in result.stdout, result.stderr


_SM90_COMPILE = """
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from cbkernels.triton import kernels as K
ALIGNED = [["tt.divisibility", 16]]
def build(fn, dt, extra, consts, warps, stages, aligned=(0, 2, 8, 9)):
    # (a dense target: extra names target_ptr as *<dt>, which keeps its place, and aligned adds its index 1)
    sig = {"logits_ptr": "*" + dt, "target_ptr": "*i64", "weight_ptr": "*fp32", "grad_loss_ptr": "*fp32",
           "loss_ptr": "*fp32", "grad_ptr": "*" + dt, "N": "i32", "C": "i32", **extra, "ignore_index": "i32"}
    sig.update({k: "constexpr" for k in consts})
    attrs = {(i,): ALIGNED for i in aligned}  # what a launch with 16-byte aligned tensors specialises
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
common = {"HAS_WEIGHT": True, "WRITE_LOSS": True, "WRITE_GRAD": True, "SCALE_GRAD": False, "ROWS": 1,
          "grad_loss_ptr": None, "offset_ptr": None, "margin_ptr": None, "sample_weight_ptr": None,
          "element_weight_ptr": None, "HAS_OFFSET": False, "HAS_MARGIN": False, "HAS_SAMPLE_WEIGHT": False,
          "HAS_ELEMENT_WEIGHT": False, "DENSE_TARGET": False}
kernels = {
    "sigmoid_focal bf16": build(K.sigmoid_focal_kernel, "bf16", {"gamma": "fp32"},
                                {**common, "GAMMA_MODE": 1, "BLOCK": 2048, "VEC": 8, "STAGES": 3}, 8, 3),
    "softmax_ce streaming fp32": build(K.softmax_ce_kernel, "fp32", {"eps": "fp32"},
                                      {**common, "HAS_SMOOTHING": True, "BLOCK": 1024, "VEC": 4, "HELD": False,
                                       "STAGES": 3}, 4, 3),
    "softmax_ce held fp32": build(K.softmax_ce_kernel, "fp32", {"eps": "fp32"},
                                 {**common, "HAS_SMOOTHING": False, "BLOCK": 2048, "VEC": 4, "HELD": True,
                                  "STAGES": 2}, 4, 2),
    "softmax_ce dense streaming fp32": build(K.softmax_ce_kernel, "fp32", {"target_ptr": "*fp32", "eps": "fp32"},
                                            {**common, "DENSE_TARGET": True, "HAS_SMOOTHING": True, "BLOCK": 1024,
                                             "VEC": 4, "HELD": False, "STAGES": 3}, 4, 3, aligned=(0, 1, 2, 8, 9)),
    "sigmoid_focal dense bf16": build(K.sigmoid_focal_kernel, "bf16", {"target_ptr": "*bf16", "gamma": "fp32"},
                                      {**common, "DENSE_TARGET": True, "GAMMA_MODE": 1, "BLOCK": 2048, "VEC": 8,
                                       "STAGES": 3}, 8, 3, aligned=(0, 1, 2, 8, 9)),
}
from cbkernels.triton import scale as S
scale_src = ASTSource(fn=S.scale_rows_unless_one_kernel, constexprs={"CHUNK": S.CHUNK, "TILE": S.TILE, "VEC": 8},
                      signature={"grad_ptr": "*bf16", "grad_loss_ptr": "*fp32", "N": "i32", "C": "i32",
                                 "CHUNK": "constexpr", "TILE": "constexpr", "VEC": "constexpr"},
                      attrs={(0,): ALIGNED, (1,): ALIGNED})
kernels["scale bf16"] = triton.compile(scale_src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
for name, compiled in kernels.items():
    text = compiled.asm["ptx"]
    assert re.search(r"st\\.global[.\\w:]*\\.v4\\.b32", text), name + ": body stores are not 16-byte vectors"
    assert ".local" not in text, name + ": local memory (spills or a stack array)"
    if name.startswith("scale"):
        assert re.search(r"ld\\.global[.\\w:]*\\.v4\\.b32", text), name + ": body loads are not 16-byte vectors"
    else:  # the pipelined loop: the body's loads are 16-byte asynchronous copies
        assert re.search(r"cp\\.async\\.cg\\.shared\\.global[^;]*, 0x10,", text), name + ": no 16-byte cp.async"
print("sm_90 ok")
"""


def test_kernels_compile_for_sm90_with_vector_access():
    """The real compiler (not the interpreter) accepts the kernels, for sm_90 without a GPU (Triton ships
    ptxas): no local memory, the aligned body of a row moves in 16-byte accesses (asynchronous copies in
    the pipelined loops), the bandwidth design."""
    pytest.importorskip("triton.backends.nvidia", reason="this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "sm_90 ok" in result.stdout, result.stdout + result.stderr[-3000:]


def test_config_table_and_override():
    for family in configs.FAMILIES:
        for dtype in DTYPES:
            for c in (1, 33, 8142, 262147):
                assert isinstance(configs.pick(family, c, dtype), configs.LaunchConfig)
    before = configs.pick("softmax_ce", 8142, torch.float32)
    with configs.override(SMALL, "softmax_ce"):
        assert configs.pick("softmax_ce", 8142, torch.float32) == SMALL
        assert configs.pick("sigmoid_focal", 8142, torch.float32) != SMALL
    assert configs.pick("softmax_ce", 8142, torch.float32) == before
    with pytest.raises(ValueError, match="block must be a power of two"):
        configs.LaunchConfig(block=24, rows=1, num_warps=4)
    with pytest.raises(ValueError, match="family must be one of"):
        with configs.override(SMALL, "hinge"):
            pass


def test_persistent_grid_keeps_reread_rows_within_half_of_l2():
    """grid.program_cap at the H200's numbers (132 SMs, 50 MiB of L2): the streamed softmax (fp32, 3
    programs per SM) at C = 32768 keeps 200 rows of 128 KiB in flight, half of L2 (the CUDA launcher's
    stream_grid cuts its grid to the same 200); rows too long for one program per SM to fit, shorter rows
    and kernels that read once keep programs_per_sm x SMs."""
    from cbkernels.triton import grid
    l2 = 50 * 2**20
    assert grid.program_cap(3, 132, l2, 32768 * 4) == 200
    assert grid.program_cap(3, 132, l2, 65536 * 4) == 396
    assert grid.program_cap(3, 132, l2, 16384 * 4) == 396
    assert grid.program_cap(3, 132, l2) == 396


@pytest.mark.parametrize("spec,hyper", loss_cases(full=False, where=lambda spec, _: spec.family is SOFTMAX_CE))
def test_streamed_softmax_grid_is_cut_to_l2_and_matches_reference(spec, hyper, monkeypatch):
    """The table's streamed softmax (C > 8192) re-reads its rows for the gradient: its plan carries their
    bytes, held rows and the sigmoid family none; under the interpreter's L2 stand-in (grid.py) a launch
    that writes the gradient is cut to the rows that fit half of it, and its results match the reference."""
    c, n = 8200, 5
    logits, target, weight = make_inputs(n, c, torch.float32, DEVICE)
    hyper_values = tuple(spec.kernel_hyperparameters(hyper))
    plan = triton_ops._plan(SOFTMAX_CE, c, logits, hyper_values)
    assert plan.reread_bytes == c * 4
    assert triton_ops._plan(SOFTMAX_CE, 8142, logits[:, :8142], hyper_values).reread_bytes == 0
    focal = losses.family("sigmoid_focal")
    assert triton_ops._plan(focal, c, logits, tuple(_hyper(focal))).reread_bytes == 0
    if DEVICE == "cpu":
        from cbkernels.triton import grid
        fit = grid.INTERPRETER_L2_BYTES // 2 // (c * 4)
        full = plan.programs_per_sm * grid.INTERPRETER_SMS
        assert grid.INTERPRETER_SMS <= fit < min(n, full)  # the stand-in makes the cap bind
        assert triton_ops.programs(plan, logits.device, n, True) == fit
        assert triton_ops.programs(plan, logits.device, n, False) == min(n, full)
    monkeypatch.setenv("CBKERNELS_BACKWARD", "fused")
    assert_matches_reference("triton", spec, hyper, logits, target, weight, reduction="mean")

def test_streamed_softmax_focal_with_smoothing_caps_its_loss_only_grid():
    """The softmax focal loss with label smoothing re-reads a streamed row for its sums even when it writes no
    gradient (softmax_focal.py): its loss-only launches are cut to L2 as well; without smoothing, or held, they
    are not."""
    from cbkernels.triton import grid
    family = losses.family("softmax_focal")
    c, n = 8200, 5
    logits = torch.zeros(n, c, device=DEVICE)
    smoothed = triton_ops._plan(family, c, logits, (2.0, 0.1))
    assert smoothed.loss_rereads and smoothed.reread_bytes == c * 4
    assert triton_ops.held_bytes(smoothed, False) == triton_ops.held_bytes(smoothed, True) == c * 4
    plain = triton_ops._plan(family, c, logits, (2.0, 0.0))
    assert not plain.loss_rereads and triton_ops.held_bytes(plain, False) == 0
    held = triton_ops._plan(family, 8142, logits[:, :8142], (2.0, 0.1))
    assert not held.loss_rereads and triton_ops.held_bytes(held, False) == 0
    if DEVICE == "cpu":  # under the interpreter's L2 stand-in the cap binds (see the test above)
        fit = grid.INTERPRETER_L2_BYTES // 2 // (c * 4)
        assert triton_ops.programs(smoothed, logits.device, n, False) == fit


def test_sweep_dry_run(tmp_path):
    """bench/sweep_triton.py's code paths on tiny shapes under the interpreter."""
    if DEVICE != "cpu":
        pytest.skip("the dry run is the CPU stand-in for the GPU sweep")
    out = tmp_path / "sweep.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, os.path.join(root, "bench", "sweep_triton.py"), "--dry-run",
                             "--out", str(out), "--budget-s", "60"], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    import json
    report = json.loads(out.read_text())
    assert report["shapes"] and all(entry["best"] is not None for entry in report["shapes"])
    assert "TABLE" in result.stdout  # the paste-ready configs.py rows


# ---------------------------------------------------------------- GPU only (make gpu-check)

@pytest.mark.gpu
@pytest.mark.parametrize("spec,hyper", loss_cases(full=False))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("strategy", ["fused", "recompute"])
def test_gpu_unit_upstream_at_inaturalist_size(spec, hyper, dtype, reduction, strategy, monkeypatch):
    # loss.backward() on the device: scale.py's kernel skips every row (grad_loss == 1 throughout)
    monkeypatch.setenv("CBKERNELS_BACKWARD", strategy)
    logits, target, weight = make_inputs(1024, 8142, dtype, DEVICE)
    assert_matches_reference("triton", spec, hyper, logits, target, weight, reduction=reduction, unit_upstream=True)


@pytest.mark.gpu
@pytest.mark.parametrize("spec,hyper", loss_cases(where=lambda _, hyper: bool(hyper)))
def test_gpu_hyperparameters_at_inaturalist_size(spec, hyper):
    # each specialised focal modulator (GAMMA_MODE) and the smoothing path at a real row width, in bf16
    logits, target, weight = make_inputs(256, 8142, torch.bfloat16, DEVICE, scale=8.0)
    assert_matches_reference("triton", spec, hyper, logits, target, weight, reduction="none")


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_nan_row_at_70000_classes(family):
    logits, target, weight = make_inputs(8, 70000, torch.float32, DEVICE, ignore_frac=0.0)
    logits[2, 69999] = float("nan")
    rows, grad = _op(family, "forward")(logits, target, weight, *_hyper(family), -100, True)
    assert torch.isnan(rows[2])
    if family is SOFTMAX_CE:  # every probability of the row depends on its NaN entry
        assert torch.isnan(grad[2]).all()
    else:  # the sigmoid family's C binary terms are independent: only the NaN entry's gradient is NaN
        assert torch.isnan(grad[2]).nonzero().flatten().tolist() == [69999]
    assert torch.isfinite(rows[[0, 1, 3]]).all() and torch.isfinite(grad[[0, 1, 3]]).all()


@pytest.mark.gpu
def test_gpu_opcheck():
    for op, args in _op_cases(64, 1000, torch.bfloat16):
        torch.library.opcheck(op, args)
