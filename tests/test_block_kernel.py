"""sparsity.kernel=block (sparse/block_linear.py): the block-sparse GEMMs equal the masked-dense ones. The torch
reference against masked dense at several block sizes, TP-shard shapes and fused Q/K/V rows; the Triton kernels
on CPU through the interpreter (own process); the layout cache; the config rule. Trainer runs with kernel=block
against kernel=masked (same losses and masks, TP=1/2, sequence parallel, PP=2) are in test_sparse_families.py."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from sift_megatron.config import load_config
from sift_megatron.errors import SiftError
from sift_megatron.sparse import block_linear as BL
from sift_megatron.sparse.layers import _SparseWeightMixin
from sift_megatron.sparse.structure import expand_blocks
from tests.conftest import REPO

TINY = REPO / "configs" / "tiny" / "dense.yaml"
TOL = dict(atol=1e-5, rtol=1e-5)


def _random_mask(rows: int, cols: int, b: int, density: float, g: torch.Generator) -> torch.Tensor:
    return expand_blocks(torch.rand(rows // b, cols // b, generator=g) < density, b)


def _check(mask: torch.Tensor, b: int, n: int, g: torch.Generator) -> None:
    """Reference forward, dX and sampled dW equal the masked-dense products (fp32, tight)."""
    R, C = mask.shape
    w = torch.randn(R, C, generator=g, dtype=torch.float64).float() * mask
    x, dy = torch.randn(n, C, generator=g), torch.randn(n, R, generator=g)
    L = BL.BlockLayout.from_mask(mask, b)
    assert L.nnz == int(mask.sum()) // (b * b)
    torch.testing.assert_close(BL.block_forward(x, w, L, "torch"), x @ w.t(), **TOL)
    torch.testing.assert_close(BL.block_grad_input(dy, w, L, "torch"), dy @ w, **TOL)
    dw = BL.block_grad_weight(dy, x, L, impl="torch")
    torch.testing.assert_close(dw, (dy.t() @ x) * mask, **TOL)
    assert int(torch.count_nonzero(dw[~mask])) == 0


@pytest.mark.parametrize("b", [16, 32, 64])
@pytest.mark.parametrize("density", [0.0, 0.25, 0.5, 1.0])
def test_reference_equals_masked_dense(b, density):
    g = torch.Generator().manual_seed(b + int(100 * density))
    _check(_random_mask(2 * b, 3 * b, b, density, g), b, 7, g)


@pytest.mark.parametrize("tp", [2, 4])
def test_reference_on_tp_shards(tp):
    """Each rank's column-parallel (row slice) and row-parallel (column slice) shard of a logical block mask."""
    b, g = 16, torch.Generator().manual_seed(tp)
    logical = _random_mask(8 * b, 4 * b, b, 0.25, g)
    for rank in range(tp):
        _check(logical.chunk(tp, 0)[rank], b, 5, g)
        _check(logical.chunk(tp, 1)[rank], b, 5, g)


def test_reference_on_fused_qkv_rows():
    """megatron's fused QKV rows [groups x (q, k, v)] with Q, K and V at their own densities: uneven tiles per
    output tile-row, whole empty tile-rows."""
    b, groups, g = 16, 2, torch.Generator().manual_seed(3)
    parts = [_random_mask(b, 4 * b, b, d, g) for _ in range(groups) for d in (0.5, 0.25, 0.0)]
    _check(torch.cat(parts), b, 9, g)


def test_reference_in_bf16_is_masked_dense_within_bf16():
    b, g = 32, torch.Generator().manual_seed(5)
    mask = _random_mask(4 * b, 2 * b, b, 0.5, g)
    w, x, dy = torch.randn(4 * b, 2 * b, generator=g) * mask, torch.randn(11, 2 * b, generator=g), torch.randn(11, 4 * b, generator=g)
    L = BL.BlockLayout.from_mask(mask, b)
    bf = torch.bfloat16
    torch.testing.assert_close(BL.block_forward(x.to(bf), w.to(bf), L, "torch").float(), x @ w.t(), atol=0.1, rtol=0.02)
    torch.testing.assert_close(BL.block_grad_input(dy.to(bf), w.to(bf), L, "torch").float(), dy @ w, atol=0.1, rtol=0.02)
    dw = BL.block_grad_weight(dy.to(bf), x.to(bf), L, impl="torch")
    assert dw.dtype == bf
    torch.testing.assert_close(dw.float(), (dy.t() @ x) * mask, atol=0.1, rtol=0.02)


@pytest.mark.parametrize("capture", [False, True])
def test_function_sampled_dw_and_dense_dw_on_capture_steps(capture):
    """The autograd Function (torch path): output, dX and bias grad of F.linear; dW sampled on the mask, or the
    full dense gradient when the module captures it for RigL."""
    b, n, g = 16, 6, torch.Generator().manual_seed(7)
    mask = _random_mask(3 * b, 2 * b, b, 0.5, g)
    w0, x0, bias0 = torch.randn(3 * b, 2 * b, generator=g) * mask, torch.randn(n, 2, 2 * b, generator=g), torch.randn(3 * b, generator=g)
    dy = torch.randn(n, 2, 3 * b, generator=g)
    L = BL.BlockLayout.from_mask(mask, b)
    x, w, bias = (t.clone().requires_grad_() for t in (x0, w0, bias0))
    out = BL._BlockSparseLinear.apply(x, w, bias, SimpleNamespace(capture_dense_grad=capture), L, False, False, None)
    xr, wr, br = (t.clone().requires_grad_() for t in (x0, w0, bias0))
    ref = torch.nn.functional.linear(xr, wr, br)
    torch.testing.assert_close(out, ref, **TOL)
    out.backward(dy)
    ref.backward(dy)
    torch.testing.assert_close(x.grad, xr.grad, **TOL)
    torch.testing.assert_close(bias.grad, br.grad, **TOL)
    torch.testing.assert_close(w.grad, wr.grad if capture else wr.grad * mask, **TOL)


def test_layout_cache_follows_in_place_mask_changes():
    """Built once per mask state; a DST update or checkpoint load (in-place copy) rebuilds it; a mask that is not
    made of whole tiles is a ValueError."""
    b, g = 16, torch.Generator().manual_seed(9)
    m = SimpleNamespace(mask=_random_mask(2 * b, 2 * b, b, 0.5, g), kernel_block=b)
    first = _SparseWeightMixin.block_layout(m)
    assert _SparseWeightMixin.block_layout(m) is first
    m.mask.copy_(expand_blocks(torch.tensor([[True, False], [True, True]]), b))
    second = _SparseWeightMixin.block_layout(m)
    assert second is not first and second.tile_r.tolist() == [0, 1, 1] and second.tile_c.tolist() == [0, 0, 1]
    assert second.col_ptr.tolist() == [0, 2, 3] and second.col_rows.tolist() == [0, 1, 1]
    m.mask[0, 0] = False
    with pytest.raises(ValueError, match="whole 16x16 blocks"):
        _SparseWeightMixin.block_layout(m)


@pytest.mark.slow
def test_triton_kernels_in_the_interpreter():
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "dist_scripts" / "block_kernel_interp.py")],
                          capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "BLOCK_INTERP_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


SPARSE = ["sparsity.family=wide", "sparsity.s=0.75"]


@pytest.mark.parametrize("overrides, msg", [
    (["sparsity.pattern=block", "sparsity.block=8"], "sparsity.kernel=block needs sparsity.pattern=block with "
                                                     "sparsity.block in 16, 32, 64, 128, got sparsity.pattern=block, "
                                                     "sparsity.block=8"),
    ([], "got sparsity.pattern=unstructured"),
    (["sparsity.pattern=2:4", "sparsity.s=0.5"], "got sparsity.pattern=2:4"),
    (["sparsity.family=dense", "sparsity.pattern=block", "sparsity.block=16"], "needs a sparse family"),
])
def test_config_rule(overrides, msg):
    with pytest.raises(SiftError) as e:
        load_config(TINY, [*SPARSE, "sparsity.kernel=block", *overrides])
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_config_accepts_kernel_choices():
    cfg = load_config(TINY, [*SPARSE, "sparsity.kernel=block", "sparsity.pattern=block", "sparsity.block=64"])
    assert cfg.sparsity.kernel == "block"
    assert load_config(TINY, SPARSE).sparsity.kernel == "masked"
    with pytest.raises(SiftError, match="sparsity.kernel"):
        load_config(TINY, [*SPARSE, "sparsity.kernel=dense"])


def test_executed_flops_follow_the_kernel():
    """Throughput's executed FLOPs: masked dense runs every masked zero, kernel=block only the nonzero tiles, which
    for block masks are the useful FLOPs."""
    from sift_megatron.ift.flops import executed_flops_per_token, model_flops_per_token

    block = [*SPARSE, "sparsity.pattern=block", "sparsity.block=16"]
    masked, kernel = load_config(TINY, block), load_config(TINY, [*block, "sparsity.kernel=block"])
    assert executed_flops_per_token(kernel) == model_flops_per_token(kernel) == model_flops_per_token(masked)
    assert executed_flops_per_token(masked) > 1.5 * executed_flops_per_token(kernel)


@pytest.mark.parametrize("kwargs, msg", [({"gradient_accumulation_fusion": True}, "gradient_accumulation_fusion"),
                                         ({"grad_output_buffer": []}, "deferred wgrad compute")])
def test_megatron_options_it_cannot_honour_are_one_line_errors(kwargs, msg):
    args = dict(gradient_accumulation_fusion=False, allreduce_dgrad=False, sequence_parallel=False) | kwargs
    with pytest.raises(SiftError, match=msg) as e:
        BL.block_linear(SimpleNamespace(), torch.zeros(2, 16), torch.zeros(16, 16), None, **args)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_resume_with_kernel_block_uses_the_loaded_masks(tmp_path):
    """A kernel=masked run's step-3 checkpoint (masks moved by the block-RigL update at step 2), resumed with
    kernel=block: the tile layout is built from the init masks at start-up, then rebuilt from the loaded ones (the
    in-place load bumps the mask's version), so steps 4-5 (another update at 4) give the masked run's losses and
    final masks. Two single-process `sift train` runs."""
    from safetensors.torch import load_file

    from tests.conftest import run_sift
    from tests.test_checkpoint import _by_step

    common = ["train", str(TINY), *SPARSE, "sparsity.pattern=block", "sparsity.block=16", "dst.algorithm=rigl",
              "dst.interval=2", "dst.end=100", "train.steps=5", "train.save_interval=3", "logging.progress=false",
              "logging.tensorboard=false"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_sift([*common, f"train.out_dir={full}"])
    run_sift([*common, "sparsity.kernel=block", f"train.out_dir={resumed}",
              f"train.resume={full / 'checkpoints' / 'step_000003'}"])
    a, b = _by_step(full), _by_step(resumed)
    assert a[2]["dst/initial_still_active"] < 1.0  # the step-2 update moved tiles before the checkpoint
    assert [b[s]["loss"] for s in (4, 5)] == pytest.approx([a[s]["loss"] for s in (4, 5)], abs=1e-5, rel=0)
    ma, mb = load_file(full / "sparse_masks.safetensors"), load_file(resumed / "sparse_masks.safetensors")
    assert all(torch.equal(ma[k], mb[k]) for k in ma if k.endswith(".mask"))
