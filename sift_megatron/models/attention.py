"""Core attention, chosen by `model.attention` and swapped into any layer spec (every Sparse-IFT family gets it).

Why: megatron's local DotProductAttention materialises the [b, heads, s, s] scores, copies them to fp32, fills
a materialised causal mask and runs softmax forward/backward unfused: ~70 % of a GPT-3 125M step on an H200.
torch's scaled_dot_product_attention picks flash / cuDNN / memory-efficient kernels (`is_causal`, no mask, no
fp32 copy of the scores) and on CPU computes the same function. Transformer Engine's attention is used when
asked for (or by `auto`) and importable; it is never a dependency.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import torch
import torch.nn.functional as F

from sift_megatron.config import ModelConfig, choices, one_of
from sift_megatron.errors import SiftError


def _dot_product_attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return DotProductAttention


def _te_attention():
    try:
        from megatron.core.extensions.transformer_engine import TEDotProductAttention
    except (ImportError, ModuleNotFoundError, AssertionError) as e:
        raise SiftError(f"model.attention te needs transformer_engine, which cannot be imported here ({e}); "
                        "use model.attention=sdpa") from None
    return TEDotProductAttention


@functools.cache
def sdpa_attention_class():
    """The class, built once on first use (it subclasses megatron's, imported only then)."""
    from megatron.core.transformer.enums import AttnMaskType

    base = _dot_product_attention()

    class SDPAttention(base):
        """megatron's DotProductAttention (same constructor, sizes and dropout settings) computed by
        F.scaled_dot_product_attention. Inputs [s, b, heads, d]; output [s, b, heads x d] like megatron's."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            if self.softmax_offset is not None or self.scale_mask_softmax.window_size is not None:
                raise SiftError("model.attention sdpa supports vanilla softmax without a sliding window; "
                                "use model.attention=unfused")
            # megatron divides the scale by layer_number for query-key layer scaling and multiplies it back
            # inside its fp32 softmax: the function computed is the unscaled one.
            coeff = self.layer_number if self.config.apply_query_key_layer_scaling else 1
            self.sdpa_scale = self.softmax_scale * coeff

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            if packed_seq_params is not None or attention_bias is not None:
                raise SiftError("model.attention sdpa takes neither packed sequences nor an attention bias")
            causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
            groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
            if groups > 1:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            # megatron's masks are True where attention is NOT allowed; SDPA's boolean masks the opposite.
            mask = None if causal or attention_mask is None else ~attention_mask
            p = self.attention_dropout.p if self.training else 0.0
            # Dropout draws from megatron's per-TP-rank stream, as the unfused path does without SP.
            rng = (self._rng_fork() if p > 0 and not self.config.sequence_parallel else contextlib.nullcontext())
            with rng:
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                     is_causal=causal and q.size(2) > 1, scale=self.sdpa_scale)
            b, _, s, _ = ctx.shape
            return ctx.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)

        @staticmethod
        def _rng_fork():
            from megatron.core import tensor_parallel

            return tensor_parallel.get_cuda_rng_tracker().fork()

    return SDPAttention


def resolve(choice: str) -> str:
    """`auto`: Transformer Engine on a GPU where it imports, else SDPA."""
    one_of("model.attention", choice, choices(ModelConfig, "attention"))
    if choice != "auto":
        return choice
    try:
        _te_attention()
    except SiftError:
        return "sdpa"
    return "te" if torch.cuda.is_available() else "sdpa"


def with_core_attention(spec, choice: str):
    """A copy of a megatron GPT layer spec whose core attention is `choice` (sdpa | unfused | te | auto)."""
    kind = resolve(choice)
    spec = copy.deepcopy(spec)
    attn = spec.submodules.self_attention.submodules
    attn.core_attention = {"sdpa": sdpa_attention_class, "unfused": _dot_product_attention,
                           "te": _te_attention}[kind]()
    return spec
