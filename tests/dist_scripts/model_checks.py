"""Run as one process: checks of the built megatron model that need a process group but no second rank.

Sparse Parallel computes sum_j sigma(W_j z + b_j) in each slot (spec 1.2):

1. branches=1 with a full mask (s=0, linear branches) is the dense model exactly: same weights -> bit-identical
   logits, and every slot's output equals the dense slot's.
2. k=2 branches: fc1 gives sum_j GELU(W_j x + b_j) with no outer GELU (the MLP output is fc2 of that sum),
   QKV / proj / fc2 are sums of linear branches; with sparsity.parallel_branch_activation=gelu they are sums of
   GELU(W_j x + b_j) and fc1 is unchanged.
3. ERK scores Q, K and V of the fused QKV weight as three tensors: each block of the initial mask holds exactly
   nnz_for(numel, density) with the density layer_densities gives the separate Q, K, V shapes. With
   sparsity.pattern=block (16 x 16 tiles) each holds exactly nnz_for(tiles, density) whole tiles instead, and a
   block that does not fit a shard (48) is a one-line error naming the tensor, its shapes and the TP degree.
Prints MODEL_CHECKS_OK at the end.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from sift_megatron import platform
from sift_megatron.config import load_config

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "dense.yaml"
SLOTS = {"self_attention.linear_qkv": "attn", "self_attention.linear_proj": "proj", "mlp.linear_fc1": "fc1",
         "mlp.linear_fc2": "fc2"}


def build(*overrides: str):
    from megatron.core import tensor_parallel

    from sift_megatron.ift.sizes import transformed_shape
    from sift_megatron.models.gpt import build_model

    cfg = load_config(TINY, ["model.precision=fp64", *overrides])
    shape = transformed_shape(cfg)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    (model,) = build_model(cfg, 256)
    return model.eval(), shape


def slot_outputs(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output (bias included) of every transformed slot of layer 0 on the same input."""
    layer = model.decoder.layers[0]
    out = {}
    for path in SLOTS:
        part, slot = path.split(".")
        mod = getattr(getattr(layer, part), slot)
        inp = x if slot != "linear_fc2" and slot != "linear_proj" else x.repeat(1, 1, mod_in(mod) // x.shape[-1])
        y, b = mod(inp)
        out[path] = y if b is None else y + b
    return out


def mod_in(mod) -> int:
    return mod.branches[0].weight.shape[1] if hasattr(mod, "branches") else mod.weight.shape[1]


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


@torch.no_grad()
def main() -> None:
    platform.init_distributed()
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(1, 1)
    tokens = torch.randint(0, 256, (2, 64))
    pos = torch.arange(64).expand(2, 64)

    # 1. one full-mask branch == the dense layer, in every slot and end to end
    dense, _ = build()
    par, shape = build("sparsity.family=parallel", "sparsity.s=0.0")
    check(shape.branches == 1 and shape.branch_activation == "none", f"s=0: {shape}")
    pp = dict(par.named_parameters())
    for name, p in dense.named_parameters():
        key = name
        for slot in SLOTS:
            if f".{slot}.weight" in name or f".{slot}.bias" in name:
                key = name.replace(f".{slot}.", f".{slot}.branches.0.")
        pp[key].copy_(p)
    check(all(bool(m.all()) for n, m in par.named_buffers() if n.endswith(".mask")), "s=0 masks are full")
    x = torch.randn(64, 2, 64, dtype=torch.float64)
    a, b = slot_outputs(dense, x), slot_outputs(par, x)
    a["mlp.linear_fc1"] = dense.config.activation_func(a["mlp.linear_fc1"])  # the dense layer is GELU(W x + b)
    for k in SLOTS:
        check(torch.equal(a[k], b[k]), f"branches=1 slot {k} differs from dense: {(a[k] - b[k]).abs().max()}")
    la = dense(tokens, pos, None)
    lb = par(tokens, pos, None)
    check(torch.equal(la, lb), f"branches=1 logits differ from dense: {(la - lb).abs().max()}")

    # 2. k=2: fc1 = sum_j GELU(W_j x + b_j) with no outer GELU; the other slots per parallel_branch_activation
    for act in ("none", "gelu"):
        model, shape = build("sparsity.family=parallel", "sparsity.s=0.5", f"sparsity.parallel_branch_activation={act}")
        check(shape.branches == 2, f"s=0.5 gives {shape.branches} branches")
        layer = model.decoder.layers[0]
        sigma = (lambda t: t) if act == "none" else F.gelu
        for path, y in slot_outputs(model, x).items():
            part, slot = path.split(".")
            mod = getattr(getattr(layer, part), slot)
            f = F.gelu if slot == "linear_fc1" else sigma
            inp = x if slot in ("linear_qkv", "linear_fc1") else x.repeat(1, 1, mod_in(mod) // x.shape[-1])
            want = sum(f(F.linear(inp, br.weight, br.bias)) for br in mod.branches)
            check(torch.allclose(y, want, rtol=0, atol=1e-12), f"{act}: slot {slot} is not sum_j sigma(W_j x + b_j)")
        mlp = layer.mlp
        h = sum(F.gelu(F.linear(x, br.weight, br.bias)) for br in mlp.linear_fc1.branches)
        want = sum(sigma(F.linear(h, br.weight, br.bias)) for br in mlp.linear_fc2.branches)
        got, bias = mlp(x)
        check(bias is None and torch.allclose(got, want, rtol=0, atol=1e-12),
              f"{act}: MLP is not fc2(sum_j GELU(W_j x + b_j)) (an outer GELU?)")
    check_erk_qkv()
    check_erk_qkv(block=16)
    check_block_error()
    torch.distributed.destroy_process_group()
    print("MODEL_CHECKS_OK")


def check_erk_qkv(block: int = 1) -> None:
    from sift_megatron.sparse.layers import init_model_masks, sparse_modules
    from sift_megatron.sparse.masks import layer_densities, nnz_for

    model, shape = build("sparsity.family=wide", "sparsity.s=0.75", "sparsity.distribution=erk")
    init_model_masks([model], 1234, shape.sparsity, "erk", pattern="block" if block > 1 else "unstructured",
                     block=block)

    def count(mask: torch.Tensor, density: float) -> bool:
        if block == 1:
            return int(mask.sum()) == nnz_for(mask.numel(), density)
        R, C = mask.shape
        tiles = mask.reshape(R // block, block, C // block, block).permute(0, 2, 1, 3).reshape(R // block, C // block, -1)
        return (torch.equal(tiles.any(-1), tiles.all(-1))
                and int(tiles.any(-1).sum()) == nnz_for(mask.numel() // block**2, density))

    h, heads = shape.hidden_size, shape.num_attention_heads
    hn = h // heads
    mods = dict(sparse_modules(model))
    shapes = {}
    for name, m in mods.items():
        if name.endswith("linear_qkv.weight"):
            shapes.update({f"{name}:{p}": (h, h) for p in "qkv"})
        else:
            shapes[name] = tuple(m.weight.shape)
    dens = layer_densities(shapes, shape.sparsity, "erk")
    total = sum(nnz_for(h0 * h1, dens[n]) for n, (h0, h1) in shapes.items())
    check(abs(total / sum(a * b for a, b in shapes.values()) - (1 - shape.sparsity)) < 1e-3, "ERK budget")
    for name, m in mods.items():
        if not name.endswith("linear_qkv.weight"):
            check(count(m.mask, dens[name]), f"ERK nnz of {name} (block {block})")
            continue
        per_head = m.mask.view(heads, 3, hn, -1)
        for i, p in enumerate("qkv"):
            part = per_head[:, i].reshape(heads * hn, -1)
            check(count(part, dens[f"{name}:{p}"]), f"ERK nnz of {name}:{p} (block {block})")


def check_block_error() -> None:
    from sift_megatron.errors import SiftError
    from sift_megatron.sparse.layers import init_model_masks

    model, shape = build("sparsity.family=wide", "sparsity.s=0.75")
    try:
        init_model_masks([model], 1234, shape.sparsity, pattern="block", block=48)
    except SiftError as e:
        msg = str(e)
        check("\n" not in msg and msg.startswith("sparsity.block=48 does not fit decoder.layers.0.") and
              "logical shape (" in msg and "at parallel.tensor=1" in msg, f"block error message: {msg}")
    else:
        check(False, "block 48 on 128-wide tensors was accepted")


if __name__ == "__main__":
    sys.exit(main())
