"""Block-sparse linear (`sparsity.kernel=block`): the three GEMMs of a linear layer touch only the weight's
nonzero b x b tiles, so their cost scales with the density instead of the dense shape.

The weight stays dense-shaped with exact zeros and the bool mask stays the truth (ZeRO state, checkpoints and DST
are unchanged); only the compute changes:
  forward   Y  = X W^T   reads the nonzero tiles of each output tile-row          (DSD)
  input     dX = dY W    reads the nonzero tiles of each input tile-column        (DDS)
  weight    dW = dY^T X  computed only on the nonzero tiles, zeros elsewhere    (SDD, "sampled")
except on DST capture steps, where RigL grows by the full dense gradient: dW is then one dense GEMM.

`BlockLayout` is built from the local mask shard. Two implementations of the same math: Triton kernels that load
tiles straight from the dense weight at tile offsets (CUDA; also run on CPU under TRITON_INTERPRET=1 in the tests)
and a pure-torch reference that gathers the tiles and uses bmm / index_add (CPU, or no triton).
`block_linear` replaces megatron's linear_with_grad_accumulation_and_async_allreduce with the same sequence-
parallel all-gather / reduce-scatter and TP all-reduce of dX; only the matmuls differ.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from sift_megatron import comm
from sift_megatron.pattern import KERNEL_BLOCKS  # the tile sides the config rule allows
from sift_megatron.sparse.structure import block_mask

__all__ = ["KERNEL_BLOCKS", "BlockLayout", "block_forward", "block_grad_input", "block_grad_weight", "block_linear",
           "have_triton"]


@dataclass(frozen=True)
class BlockLayout:
    """The nonzero tiles of a [R, C] weight: row-major tile list (tile_r, tile_c) with row_ptr into it per output
    tile-row (forward), and per input tile-column the list of its tiles' rows (col_ptr / col_rows, dX)."""

    block: int
    shape: tuple[int, int]
    tile_r: torch.Tensor  # int64 [nnz], sorted by (row, col)
    tile_c: torch.Tensor  # int64 [nnz]
    row_ptr: torch.Tensor  # int32 [R / b + 1]
    col_ptr: torch.Tensor  # int32 [C / b + 1]
    col_rows: torch.Tensor  # int32 [nnz]: tile rows of input tile-column j at col_ptr[j]:col_ptr[j + 1]

    @staticmethod
    def from_mask(mask: torch.Tensor, block: int) -> BlockLayout:
        """Layout of a mask made of whole b x b tiles (ValueError otherwise)."""
        tiles = block_mask(mask, block)
        nz = torch.nonzero(tiles)  # lexicographic: row-major
        r, c = nz[:, 0].contiguous(), nz[:, 1].contiguous()
        nr, nc = tiles.shape
        ptr = lambda idx, n: torch.cat([idx.new_zeros(1), torch.bincount(idx, minlength=n).cumsum(0)])  # noqa: E731
        by_col = torch.argsort(c * nr + r)
        return BlockLayout(block, tuple(mask.shape), r, c, ptr(r, nr).to(torch.int32), ptr(c, nc).to(torch.int32),
                           r[by_col].to(torch.int32))

    @property
    def nnz(self) -> int:
        return self.tile_r.numel()


@functools.cache
def have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


IMPL: str | None = None
"""None: Triton on CUDA tensors when importable, else the torch reference; "triton" / "torch" force one (tests run
the Triton kernels on CPU tensors under TRITON_INTERPRET=1)."""


def _use_triton(t: torch.Tensor, impl: str | None) -> bool:
    impl = impl or IMPL
    if impl is not None:
        return impl == "triton"
    return t.is_cuda and have_triton()


# ----------------------------------------------------------------------------------------------------------
# Reference implementation (torch): gather the nonzero tiles, one bmm per GEMM, fp32 accumulation


def _tiles_of(w: torch.Tensor, L: BlockLayout) -> torch.Tensor:
    """[nnz, b, b]: tile k is w[r_k b : (r_k + 1) b, c_k b : (c_k + 1) b]."""
    b, (R, C) = L.block, L.shape
    return w.view(R // b, b, C // b, b)[L.tile_r, :, L.tile_c, :]


def _ref_forward(x: torch.Tensor, w: torch.Tensor, L: BlockLayout) -> torch.Tensor:
    b, (R, C), N = L.block, L.shape, x.shape[0]
    xt = x.view(N, C // b, b).index_select(1, L.tile_c).transpose(0, 1)  # [nnz, N, b]
    part = torch.bmm(xt, _tiles_of(w, L).transpose(1, 2))  # [nnz, N, b]: tile k's share of its output tile
    y = torch.zeros(R // b, N, b, dtype=torch.float32, device=x.device).index_add_(0, L.tile_r, part.float())
    return y.permute(1, 0, 2).reshape(N, R).to(x.dtype)


def _ref_grad_input(dy: torch.Tensor, w: torch.Tensor, L: BlockLayout) -> torch.Tensor:
    b, (R, C), N = L.block, L.shape, dy.shape[0]
    dyt = dy.view(N, R // b, b).index_select(1, L.tile_r).transpose(0, 1)  # [nnz, N, b]
    part = torch.bmm(dyt, _tiles_of(w, L))  # [nnz, N, b]
    dx = torch.zeros(C // b, N, b, dtype=torch.float32, device=dy.device).index_add_(0, L.tile_c, part.float())
    return dx.permute(1, 0, 2).reshape(N, C).to(dy.dtype)


def _ref_grad_weight(dy: torch.Tensor, x: torch.Tensor, L: BlockLayout, dtype: torch.dtype) -> torch.Tensor:
    b, (R, C), N = L.block, L.shape, dy.shape[0]
    dyt = dy.view(N, R // b, b).index_select(1, L.tile_r).permute(1, 2, 0)  # [nnz, b, N]
    xt = x.view(N, C // b, b).index_select(1, L.tile_c).transpose(0, 1)  # [nnz, N, b]
    dw = torch.zeros(R // b, C // b, b, b, dtype=dtype, device=dy.device)
    dw[L.tile_r, L.tile_c] = torch.bmm(dyt, xt).to(dtype)
    return dw.permute(0, 2, 1, 3).reshape(R, C)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels: one program per (token block, output tile-row) / (token block, input tile-column) / nonzero
# tile; every tile is loaded from the dense weight at its offset (no gathered copy of the weight).

_KERNELS = None


def _kernels():
    """Compiled lazily: importing triton (and TRITON_INTERPRET's choice) happens on first use."""
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def fwd(x, w, y, row_ptr, tile_c, N, sx, sw, sy, B: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
        m, i = tl.program_id(0), tl.program_id(1)
        rm = m * BM + tl.arange(0, BM)
        rb = tl.arange(0, B)
        acc = tl.zeros((BM, B), dtype=tl.float32)
        for k in range(tl.load(row_ptr + i), tl.load(row_ptr + i + 1)):
            j = tl.load(tile_c + k)
            xs = tl.load(x + rm[:, None] * sx + (j * B + rb)[None, :], mask=rm[:, None] < N, other=0.0)
            wt = tl.load(w + (i * B + rb)[None, :] * sw + (j * B + rb)[:, None])  # W tile (i, j) transposed
            acc += tl.dot(xs, wt, input_precision=PREC)
        tl.store(y + rm[:, None] * sy + (i * B + rb)[None, :], acc.to(y.dtype.element_ty), mask=rm[:, None] < N)

    @triton.jit
    def dgrad(dy, w, dx, col_ptr, col_rows, N, sdy, sw, sdx, B: tl.constexpr, BM: tl.constexpr,
              PREC: tl.constexpr):
        m, j = tl.program_id(0), tl.program_id(1)
        rm = m * BM + tl.arange(0, BM)
        rb = tl.arange(0, B)
        acc = tl.zeros((BM, B), dtype=tl.float32)
        for k in range(tl.load(col_ptr + j), tl.load(col_ptr + j + 1)):
            i = tl.load(col_rows + k)
            g = tl.load(dy + rm[:, None] * sdy + (i * B + rb)[None, :], mask=rm[:, None] < N, other=0.0)
            ws = tl.load(w + (i * B + rb)[:, None] * sw + (j * B + rb)[None, :])  # W tile (i, j)
            acc += tl.dot(g, ws, input_precision=PREC)
        tl.store(dx + rm[:, None] * sdx + (j * B + rb)[None, :], acc.to(dx.dtype.element_ty), mask=rm[:, None] < N)

    @triton.jit
    def wgrad(dy, x, dw, tile_r, tile_c, N, sdy, sx, sdw, B: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
        t = tl.program_id(0)
        i, j = tl.load(tile_r + t), tl.load(tile_c + t)
        rb = tl.arange(0, B)
        acc = tl.zeros((B, B), dtype=tl.float32)
        for n0 in range(0, N, BK):
            rn = n0 + tl.arange(0, BK)
            gt = tl.load(dy + rn[None, :] * sdy + (i * B + rb)[:, None], mask=rn[None, :] < N, other=0.0)  # [B, BK]
            xs = tl.load(x + rn[:, None] * sx + (j * B + rb)[None, :], mask=rn[:, None] < N, other=0.0)  # [BK, B]
            acc += tl.dot(gt, xs, input_precision=PREC)
        tl.store(dw + (i * B + rb)[:, None] * sdw + (j * B + rb)[None, :], acc.to(dw.dtype.element_ty))

    _KERNELS = (fwd, dgrad, wgrad)
    return _KERNELS


def _tile_m() -> int:
    """Tokens per program: 64 on GPUs (untuned); 16 (tl.dot's minimum) under the slow CPU interpreter."""
    return 16 if os.environ.get("TRITON_INTERPRET") == "1" else 64


def _prec(t: torch.Tensor) -> str:
    """fp32 inputs: TF32 where torch's matmuls use it (as the masked-dense path would), else exact IEEE. 16-bit
    inputs: Triton's default (ignored: they go to the tensor cores as they are)."""
    if t.dtype != torch.float32:
        return "tf32"
    return "tf32" if t.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _tri_forward(x, w, L):
    fwd, _, _ = _kernels()
    N, (R, _C), BM = x.shape[0], L.shape, _tile_m()
    y = torch.empty(N, R, dtype=x.dtype, device=x.device)
    fwd[(-(-N // BM), R // L.block)](x, w, y, L.row_ptr, L.tile_c, N, x.stride(0), w.stride(0), y.stride(0),
                                     B=L.block, BM=BM, PREC=_prec(x))
    return y


def _tri_grad_input(dy, w, L):
    _, dgrad, _ = _kernels()
    N, (_R, C), BM = dy.shape[0], L.shape, _tile_m()
    dx = torch.empty(N, C, dtype=dy.dtype, device=dy.device)
    dgrad[(-(-N // BM), C // L.block)](dy, w, dx, L.col_ptr, L.col_rows, N, dy.stride(0), w.stride(0), dx.stride(0),
                                       B=L.block, BM=BM, PREC=_prec(dy))
    return dx


def _tri_grad_weight(dy, x, L, dtype):
    _, _, wgrad = _kernels()
    dw = torch.zeros(L.shape, dtype=dtype, device=dy.device)
    if L.nnz:
        wgrad[(L.nnz,)](dy, x, dw, L.tile_r, L.tile_c, dy.shape[0], dy.stride(0), x.stride(0), dw.stride(0),
                        B=L.block, BK=_tile_m(), PREC=_prec(dy))
    return dw


# ----------------------------------------------------------------------------------------------------------
# The three products on 2-D [tokens, features] inputs; impl None: Triton on CUDA when importable, else torch


def block_forward(x: torch.Tensor, w: torch.Tensor, L: BlockLayout, impl: str | None = None) -> torch.Tensor:
    """x @ w.T reading only w's nonzero tiles."""
    x, w = x.contiguous(), w.contiguous()
    return (_tri_forward if _use_triton(x, impl) else _ref_forward)(x, w, L)


def block_grad_input(dy: torch.Tensor, w: torch.Tensor, L: BlockLayout, impl: str | None = None) -> torch.Tensor:
    """dy @ w reading only w's nonzero tiles."""
    dy, w = dy.contiguous(), w.contiguous()
    return (_tri_grad_input if _use_triton(dy, impl) else _ref_grad_input)(dy, w, L)


def block_grad_weight(dy: torch.Tensor, x: torch.Tensor, L: BlockLayout, dtype: torch.dtype | None = None,
                      impl: str | None = None) -> torch.Tensor:
    """dy.T @ x on the nonzero tiles only, zeros elsewhere (dense-shaped)."""
    dy, x = dy.contiguous(), x.contiguous()
    return (_tri_grad_weight if _use_triton(dy, impl) else _ref_grad_weight)(dy, x, L, dtype or dy.dtype)


# ----------------------------------------------------------------------------------------------------------
# megatron's seam


def _gather_sequence(t: torch.Tensor, group) -> torch.Tensor:
    """The sequence-parallel all-gather into megatron's reused "mpu" buffer, as megatron's linear does."""
    from megatron.core.parallel_state import get_global_memory_buffer

    size = [t.shape[0] * comm.world_size(group), *t.shape[1:]]
    return comm.gather_dim0(t, group, out=get_global_memory_buffer().get_tensor(size, t.dtype, "mpu"))


class _BlockSparseLinear(torch.autograd.Function):
    """megatron's LinearWithGradAccumulationAndAsyncCommunication with block-sparse GEMMs. Like it, the local
    (not the all-gathered) input is saved under sequence parallelism and gathered again for dW."""

    @staticmethod
    def forward(ctx, input, weight, bias, module, layout, allreduce_dgrad, sequence_parallel, tp_group):
        ctx.save_for_backward(input, weight)
        ctx.module, ctx.layout, ctx.use_bias = module, layout, bias is not None
        ctx.allreduce_dgrad, ctx.sequence_parallel, ctx.tp_group = allreduce_dgrad, sequence_parallel, tp_group
        total = _gather_sequence(input, tp_group) if sequence_parallel else input
        out = block_forward(total.reshape(-1, total.shape[-1]), weight, layout)
        out = out.view(*total.shape[:-1], weight.shape[0])
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        L, group = ctx.layout, ctx.tp_group
        total = _gather_sequence(input, group) if ctx.sequence_parallel else input
        dy = grad_output.reshape(-1, grad_output.shape[-1])
        grad_input = block_grad_input(dy, weight, L).view(total.shape)
        if ctx.allreduce_dgrad:
            comm.all_reduce(grad_input, group=group)
        if ctx.sequence_parallel:
            grad_input = comm.reduce_scatter_dim0(grad_input, group)
        x = total.reshape(-1, total.shape[-1])
        if ctx.module.capture_dense_grad:  # RigL grows by the dense gradient (sparse/layers.py _capture_grad)
            grad_weight = dy.t().matmul(x)
        else:
            grad_weight = block_grad_weight(dy, x, L, weight.dtype)
        grad_bias = dy.sum(0) if ctx.use_bias else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def block_linear(module, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                 grad_output_buffer=None, wgrad_deferral_limit=None, async_grad_allreduce=None, tp_group=None):
    """linear_with_grad_accumulation_and_async_allreduce's signature (after `module`), block-sparse GEMMs."""
    from megatron.core.utils import get_tensor_model_parallel_group_if_none

    from sift_megatron.errors import SiftError

    if gradient_accumulation_fusion:
        raise SiftError("sparsity.kernel=block does not support megatron's gradient_accumulation_fusion (it writes "
                        "dense wgrads into main_grad); set it off or use sparsity.kernel=masked")
    if grad_output_buffer is not None:
        raise SiftError("sparsity.kernel=block does not support deferred wgrad compute (defer_embedding_wgrad_"
                        "compute); use sparsity.kernel=masked")
    tp_group = get_tensor_model_parallel_group_if_none(tp_group)
    return _BlockSparseLinear.apply(input, weight, bias, module, module.block_layout(), allreduce_dgrad,
                                    sequence_parallel, tp_group)
