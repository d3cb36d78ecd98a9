"""Sparse Parallel and Sparse Factorized GPTs as a transformers architecture ("sift_gpt").

A Sparse-IFT model is GPT-2/3 with each of the four linears of a block (fused QKV, attention output, MLP fc1,
fc2) replaced by a small module, so the architecture here is GPT2LMHeadModel with those four modules
swapped: attention, caching, generation and masking are GPT-2's, unchanged.

* parallel:   y = sum_j act(W_j x + b_j)                 (`<slot>.branches.{j}` nn.Linear); act is the model's
              activation in fc1 (whose MLP then applies none) and `branch_activation` elsewhere ("none": y is
              the sum of linear branches)
* factorized: y = V act(LayerNorm(U x)) + b              (`<slot>.u` no bias, `<slot>.norm`, `<slot>.v`)

Sparse weights are stored dense with exact zeros (sparsity_stats.json beside the weights tells how sparse).
This file imports only torch and transformers, so `sift convert` copies it into the export directory and
`trust_remote_code=True` loads the model without sift_megatron installed; importing it registers the
classes with AutoConfig and AutoModelForCausalLM.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.activations import ACT2FN
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Attention

FAMILIES = ("parallel", "factorized")
SLOTS = ("qkv", "proj", "fc1", "fc2")  # c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj


@strict
class SiftGPTConfig(GPT2Config):
    """GPT2Config plus the Sparse-IFT family: `branches` (parallel) or `inner` width per slot (factorized)."""

    model_type = "sift_gpt"

    family: str = "parallel"
    branches: int = 1
    branch_activation: str = "none"  # parallel: activation of the QKV / proj / fc2 branches (fc1: the model's)
    inner: dict | None = None
    sparsity: float = 0.0


class SiftParallelLinear(nn.Module):
    """sum_j act(W_j x + b_j): Sparse Parallel's k branches (each W_j sparse in training)."""

    def __init__(self, d_in: int, d_out: int, branches: int, activation: str) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(d_in, d_out) for _ in range(branches))
        self.act = nn.Identity() if activation == "none" else ACT2FN[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.branches[0](x))
        for b in self.branches[1:]:
            out = out + self.act(b(x))
        return out


class SiftFactorizedLinear(nn.Module):
    """V act(LayerNorm(U x)) + b: Sparse Factorized's low-rank pair (U, V sparse in training)."""

    def __init__(self, d_in: int, d_out: int, inner: int, activation: str, eps: float) -> None:
        super().__init__()
        self.u = nn.Linear(d_in, inner, bias=False)
        self.norm = nn.LayerNorm(inner, eps=eps)
        self.v = nn.Linear(inner, d_out)
        self.act = ACT2FN[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(self.act(self.norm(self.u(x))))


def make_slot(config: SiftGPTConfig, slot: str, d_in: int, d_out: int) -> nn.Module:
    if config.family == "parallel":
        act = config.activation_function if slot == "fc1" else config.branch_activation
        return SiftParallelLinear(d_in, d_out, config.branches, act)
    if config.family == "factorized":
        return SiftFactorizedLinear(d_in, d_out, int(config.inner[slot]), config.activation_function,
                                    config.layer_norm_epsilon)
    raise ValueError(f"sift_gpt family must be one of {FAMILIES}, got {config.family!r}")


class SiftGPTForCausalLM(GPT2LMHeadModel):
    """GPT2LMHeadModel whose block linears are Sparse-IFT modules (nn.Linear layout: weight [out, in])."""

    config_class = SiftGPTConfig
    config: SiftGPTConfig

    def __init__(self, config: SiftGPTConfig) -> None:
        super().__init__(config)
        h = config.n_embd
        f = config.n_inner or 4 * h
        for block in self.transformer.h:
            block.attn.c_attn = make_slot(config, "qkv", h, 3 * h)
            block.attn.c_proj = make_slot(config, "proj", h, h)
            block.mlp.c_fc = make_slot(config, "fc1", h, f)
            block.mlp.c_proj = make_slot(config, "fc2", f, h)
            if config.family == "parallel":  # fc1's branches applied the activation already
                block.mlp.act = nn.Identity()
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2's rule re-initialises `c_proj.weight` of attention/MLP modules, which here are Sift modules
        # without a `.weight`; their own Linear/LayerNorm children are initialised by the generic rules.
        if isinstance(module, (GPT2Attention, GPT2MLP)):
            return
        super()._init_weights(module)


AutoConfig.register("sift_gpt", SiftGPTConfig, exist_ok=True)
AutoModelForCausalLM.register(SiftGPTConfig, SiftGPTForCausalLM, exist_ok=True)
