"""On one CUDA GPU (skipped elsewhere): sparsity.kernel=block's compiled Triton kernels equal the masked-dense
cuBLAS products (bf16 within bf16 rounding, fp32 without TF32 tightly) at every allowed block size, and a bf16
`sift train` with kernel=block follows the kernel=masked run. Run: python -m pytest -q tests/gpu"""

from __future__ import annotations

import json

import pytest
import torch

from sift_megatron.pattern import KERNEL_BLOCKS
from tests.conftest import REPO, run_sift

TINY = str(REPO / "configs" / "tiny" / "dense.yaml")
QUIET = ["logging.progress=false", "logging.tensorboard=false"]
pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b", KERNEL_BLOCKS)
def test_triton_kernels_equal_masked_dense(b, dtype, monkeypatch):
    from sift_megatron.sparse import block_linear as BL
    from sift_megatron.sparse.structure import expand_blocks

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    g = torch.Generator(device="cuda").manual_seed(b)
    R, C, N = 6 * b, 4 * b, 1000  # 1000 tokens: a partial token block
    tiles = torch.rand(R // b, C // b, generator=g, device="cuda") < 0.4
    tiles[1] = False  # an empty output tile-row
    mask = expand_blocks(tiles, b)
    w = (torch.randn(R, C, generator=g, device="cuda") * mask).to(dtype)
    x, dy = (torch.randn(N, n, generator=g, device="cuda").to(dtype) for n in (C, R))
    L = BL.BlockLayout.from_mask(mask, b)
    # the masked-dense products of the same (rounded) inputs in fp32; a bf16 result is off by its own rounding
    xf, wf, dyf = x.float(), w.float(), dy.float()
    tol = dict(rtol=1.6e-2, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    out = BL.block_forward(x, w, L, "triton")
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), xf @ wf.t(), **tol)
    torch.testing.assert_close(BL.block_grad_input(dy, w, L, "triton").float(), dyf @ wf, **tol)
    dw = BL.block_grad_weight(dy, x, L, impl="triton")
    torch.testing.assert_close(dw.float(), (dyf.t() @ xf) * mask, **tol)
    assert int(torch.count_nonzero(dw[~mask])) == 0


def test_bf16_training_with_block_kernel_follows_masked(tmp_path):
    """Sparse Wide s=0.75, 16 x 16 blocks, block RigL (updates at steps 2 and 4), bf16: the same losses within
    bf16 noise, masked weights exactly 0, the same number of tiles per tensor."""
    from safetensors.torch import load_file

    runs = {}
    for kernel in ("masked", "block"):
        out = tmp_path / kernel
        run_sift(["train", TINY, "sparsity.family=wide", "sparsity.s=0.75", "sparsity.pattern=block",
                  "sparsity.block=16", f"sparsity.kernel={kernel}", "dst.algorithm=rigl", "dst.interval=2",
                  "dst.end=100", "train.steps=6", "model.precision=bf16", f"train.out_dir={out}", *QUIET])
        runs[kernel] = ([json.loads(x)["loss"] for x in open(out / "metrics.jsonl") if '"loss"' in x],
                        load_file(out / "sparse_masks.safetensors"))
    (lm, masked), (lb, block) = runs["masked"], runs["block"]
    assert len(lb) == 6 and lb == pytest.approx(lm, abs=3e-2)
    assert sorted(masked) == sorted(block)
    for k, m in block.items():
        if k.endswith(".mask"):
            assert int(m.sum()) == int(masked[k].sum()), k
            assert torch.count_nonzero(block[k[:-4] + "weight"][~m.bool()]) == 0, k
