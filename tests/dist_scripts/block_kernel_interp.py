"""Run in its own process: the Triton block-sparse kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1
must be set before triton is imported), against the torch reference and the masked-dense matmuls in fp32:
forward, input grad, sampled weight grad, and through the autograd Function the sampled dW on ordinary steps and
the dense dW on DST capture steps. Tiny shapes (the interpreter runs every program in numpy). fp32 only: triton
3.7.1's interpreter gets tl.dot on bf16 operands wrong (2.8e10 off on a 16 x 16 product; fp16 is right), so bf16
is tests/gpu/test_block_kernel.py's. Prints BLOCK_INTERP_OK."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402

from sift_megatron.sparse import block_linear as BL  # noqa: E402
from sift_megatron.sparse.structure import expand_blocks  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)


def case(b: int, R: int, C: int, N: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tiles = torch.rand(R // b, C // b, generator=g) < 0.5
    tiles[0] = False  # an output tile-row with no tile (its Y block must be 0, not garbage)
    tiles[:, -1] = False  # an input tile-column with none (its dX block must be 0)
    tiles[-1, 0] = True
    mask = expand_blocks(tiles, b)
    w = torch.randn(R, C, generator=g) * mask
    x, dy = torch.randn(N, C, generator=g), torch.randn(N, R, generator=g)
    L = BL.BlockLayout.from_mask(mask, b)
    for impl in ("triton", "torch"):
        torch.testing.assert_close(BL.block_forward(x, w, L, impl), x @ w.t(), **TOL)
        torch.testing.assert_close(BL.block_grad_input(dy, w, L, impl), dy @ w, **TOL)
        torch.testing.assert_close(BL.block_grad_weight(dy, x, L, impl=impl), (dy.t() @ x) * mask, **TOL)
    torch.testing.assert_close(BL.block_forward(x, w, L, "triton"), BL.block_forward(x, w, L, "torch"), **TOL)
    # the autograd Function, Triton forced: sampled dW, then the dense dW RigL captures
    BL.IMPL = "triton"
    try:
        for capture in (False, True):
            module = SimpleNamespace(capture_dense_grad=capture)
            xa, wa = x.view(N, 1, C).clone().requires_grad_(), w.clone().requires_grad_()
            bias = torch.randn(R, generator=g).requires_grad_()
            out = BL._BlockSparseLinear.apply(xa, wa, bias, module, L, False, False, None)
            xr, wr, br = xa.detach().clone().requires_grad_(), w.clone().requires_grad_(), bias.detach().clone()
            br.requires_grad_()
            ref = torch.nn.functional.linear(xr, wr, br)
            torch.testing.assert_close(out, ref, **TOL)
            out.backward(dy.view(N, 1, R))
            ref.backward(dy.view(N, 1, R))
            torch.testing.assert_close(xa.grad, xr.grad, **TOL)
            torch.testing.assert_close(bias.grad, br.grad, **TOL)
            torch.testing.assert_close(wa.grad, wr.grad if capture else wr.grad * mask, **TOL)
            assert capture or int(torch.count_nonzero(wa.grad[~mask])) == 0
    finally:
        BL.IMPL = None


if __name__ == "__main__":
    case(16, 48, 64, 37, 0)  # a partial token block (37 = 2 x 16 + 5)
    case(32, 64, 96, 20, 1)
    print("BLOCK_INTERP_OK", flush=True)
