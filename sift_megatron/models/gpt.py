"""megatron-core GPTModel with the GPT-3 architecture, built from our config.

GPT-3: learned absolute positions, GELU, pre-LayerNorm, biases everywhere, tied input/output embeddings,
init N(0, 0.02) with output projections scaled by 1/sqrt(2 L). Sparse-IFT families change only the layer
spec (see sift_megatron.ift), never the model class.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sift_megatron import platform
from sift_megatron.config import Config
from sift_megatron.ift.sizes import ModelShape, transformed_shape
from sift_megatron.models.attention import with_core_attention
from sift_megatron.sharding import global_param_names, placement

# Parameters whose names end like this are output projections (GPT-2/3 scaled init).
_SCALED_SLOTS = ("linear_proj", "linear_fc2")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def param_dtype(cfg: Config) -> torch.dtype:
    """dtype of the module's parameters and activations for model.precision (bf16: DeepSpeed keeps fp32
    master weights and optimizer state beside them)."""
    return _DTYPES[cfg.model.precision]


def transformer_config(cfg: Config, shape=None):
    """megatron TransformerConfig for the (possibly Sparse-IFT-transformed) model shape."""
    from megatron.core.transformer import TransformerConfig

    m, p = cfg.model, cfg.parallel
    hidden, heads, ffn = (shape.hidden_size, shape.num_attention_heads, shape.ffn_hidden_size) if shape else (
        m.hidden_size, m.num_attention_heads, m.ffn)
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_hidden_size=ffn,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        sequence_parallel=p.sequence_parallel,
        pipeline_dtype=param_dtype(cfg),
        params_dtype=param_dtype(cfg),
        bf16=cfg.model.precision == "bf16",
        # Layout-invariant init draws each rank's shards itself (init_weights_layout_invariant), so megatron
        # only allocates them, on the platform device, and its init methods do nothing: its CPU path would
        # draw every weight at its full logical shape on every rank.
        use_cpu_initialization=not m.layout_invariant_init,
        # Must stay True even with layout-invariant init: megatron only sets the
        # tensor_model_parallel/partition_dim attributes inside its init path.
        perform_initialization=True,
        **({"init_method": _skip_init, "output_layer_init_method": _skip_init, "embedding_init_method": _skip_init}
           if m.layout_invariant_init else {}),
        init_method_std=m.init_std,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        layernorm_epsilon=m.layernorm_epsilon,
        activation_func=F.gelu if m.activation == "gelu" else F.relu,
        add_bias_linear=True,
        gradient_accumulation_fusion=False,
        # gloo matches batched isend/irecv to the same peer crosswise when PP=2 with VP (silently wrong).
        batch_p2p_comm=not (p.virtual_pipeline and p.pipeline == 2),
        # model.recompute -> Megatron-LM's --recompute-granularity/-method/-num-layers (selective: core attention).
        recompute_granularity=None if m.recompute == "none" else m.recompute,
        recompute_method="uniform" if m.recompute == "full" else None,
        recompute_num_layers=m.recompute_num_layers if m.recompute == "full" else None,
    )


def build_model(cfg: Config, vocab_size: int, shape: ModelShape | None = None) -> list[torch.nn.Module]:
    """One GPTModel per virtual-pipeline chunk of this rank (a single-element list without VP), of the model the
    config describes: its Sparse-IFT family's shape (default transformed_shape(cfg); a converter passes the
    shape a checkpoint was saved with) and layer spec, its core attention."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from sift_megatron.ift.spec import layer_spec

    shape = shape or transformed_shape(cfg)
    tcfg = transformer_config(cfg, shape)
    if cfg.model.precision == "fp64":
        _keep_fp64_cross_entropy()
    spec = with_core_attention(layer_spec(shape), cfg.model.attention)
    vp = cfg.parallel.virtual_pipeline
    chunks = []
    for vp_stage in range(vp or 1):
        stage = vp_stage if vp else None
        model = GPTModel(
            config=tcfg,
            transformer_layer_spec=spec,
            vocab_size=vocab_size,
            max_sequence_length=cfg.model.max_position_embeddings or cfg.model.seq_length,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=cfg.model.tie_embeddings,
            position_embedding_type="learned_absolute",
            vp_stage=stage,
        )
        chunks.append(model)
    if cfg.model.layout_invariant_init:
        for model in chunks:
            init_weights_layout_invariant(model, cfg.train.seed, cfg.model.init_std, cfg.model.num_layers)
    device = platform.current().device  # masks, top-k and DST then run where the model trains
    for model in chunks:
        # megatron builds a few params (position embeddings) in the default dtype
        model.to(device=device, dtype=param_dtype(cfg))
        mark_pipeline_replicas(model)
    return chunks


def _keep_fp64_cross_entropy() -> None:
    """megatron's vocab-parallel cross entropy casts logits to fp32; its softmax sum is then split differently
    at each TP degree, and that fp32 rounding alone flips RigL near-ties between layouts. Keep fp64 logits in
    fp64 (fp32/bf16 logits are still computed in fp32, as before)."""
    from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy

    def calculate_logits_max(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits if logits.dtype == torch.float64 else logits.float()
        return logits, torch.max(logits, dim=-1)[0]

    VocabParallelCrossEntropy.calculate_logits_max = staticmethod(calculate_logits_max)


def _skip_init(tensor: torch.Tensor) -> None:
    """megatron init method for layout-invariant init, which overwrites every parameter afterwards."""


# Elements drawn per batch: bounds init's temporaries (~50 bytes an element: 3 MB of host memory, 800 MB on a
# GPU, where small batches would cost kernel launches) whatever the shard size. The values do not depend on it.
INIT_CHUNK = {"cpu": 1 << 16, "cuda": 1 << 24}


def init_rule(name: str, std: float, num_layers: int) -> float | str:
    """GPT-3 init by parameter role: "zero" (biases), "one" (norm weights) or the std of N(0, std);
    sparse families name their sub-weights so these rules apply."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return "zero"
    if "norm" in name and leaf == "weight":
        return "one"
    # Output projections (and every sub-weight of a Sparse-IFT module in their slot) get GPT-2/3's scaled std.
    if any(f".{slot}." in f".{name}" for slot in _SCALED_SLOTS):
        return std / (2.0 * num_layers) ** 0.5
    return std


def normal_from_index(seed: int, name: str, index: torch.Tensor, std: float) -> torch.Tensor:
    """float64 N(0, std), one value per global flat index of the logical tensor `name`: Box-Muller on two
    counter-based uniform streams (splitmix64 of the index, sparse/masks.hash_scores) keyed by (seed, name),
    so any shard draws exactly its own elements and every layout gets the same logical tensor. The streams
    are domain-separated from the mask scores, which hash the same names with the same default seed."""
    from sift_megatron.sparse.masks import derive_seed, hash_scores, uniform_from_keys

    u1 = uniform_from_keys(hash_scores(derive_seed(seed, "init", 1), name, index))
    u2 = uniform_from_keys(hash_scores(derive_seed(seed, "init", 2), name, index))
    return torch.sqrt(-2.0 * torch.log1p(-u1)).mul_(torch.cos(u2.mul_(2.0 * math.pi))).mul_(std)


@torch.no_grad()
def init_weights_layout_invariant(model: torch.nn.Module, seed: int, std: float, num_layers: int) -> None:
    """Draw every parameter shard from counter-based streams keyed by (seed, global name, global element
    index): TP=1/2/4 and any PP/VP start from bit-identical logical weights, while each rank computes only
    its own shard, INIT_CHUNK elements at a time, on the platform device (the GPU when there is one)."""
    from sift_megatron.sparse.masks import global_index

    device = platform.current().device
    for name, p in global_param_names(model):
        rule = init_rule(name, std, num_layers)
        if rule in ("zero", "one"):
            p.data.fill_(0.0 if rule == "zero" else 1.0)
            continue
        shape, offsets = placement(p)
        local = p.data.view(p.shape[0], -1)  # rows x the rest (a 1-D tensor: rows of one)
        rest = [torch.arange(o, o + n, device=device) for o, n in zip(offsets[1:], p.shape[1:])]
        rows = max(1, INIT_CHUNK.get(device.type, INIT_CHUNK["cpu"]) // max(1, local.shape[1]))
        for a in range(0, p.shape[0], rows):
            b = min(a + rows, p.shape[0])
            idx = global_index(shape, [torch.arange(offsets[0] + a, offsets[0] + b, device=device), *rest])
            local[a:b].copy_(normal_from_index(seed, name, idx, rule).view(b - a, -1))


def mark_pipeline_replicas(model: torch.nn.Module) -> None:
    """A tied output layer on the last stage is a replica of the first stage's embedding: tell DeepSpeed not
    to count it twice in the global grad norm (it skips params with `ds_pipe_replicated`)."""
    if getattr(model, "share_embeddings_and_output_weights", False) and not model.pre_process and model.post_process:
        model.output_layer.weight.ds_pipe_replicated = True


def shared_embedding_params(chunks: list[torch.nn.Module]) -> list[torch.nn.Parameter]:
    """Params whose grads must be summed over megatron's embedding group (tied weights across stages)."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return []
    out = []
    for m in chunks:
        if getattr(m, "share_embeddings_and_output_weights", False) and (m.pre_process or m.post_process):
            out.append(m.shared_embedding_or_output_weight())
    return out
