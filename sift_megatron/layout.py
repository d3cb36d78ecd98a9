"""Layout rules every module shares, without torch: the transformed slots and how TP splits them, the padded
vocabulary, the exact kept count of a mask, and which families support sequence parallelism. Config checks,
the engine, `sift plan` / `sift flops`, the spec builder, masks and conversion all ask here."""

from __future__ import annotations

import math

from sift_megatron.config import Config, effective_zero_stage
from sift_megatron.errors import SiftError

# megatron slot name -> (sub-module path inside a decoder layer, column-parallel: output split over TP);
# the others are row-parallel (input split over TP).
SLOTS = {
    "linear_qkv": ("self_attention.linear_qkv", True),
    "linear_proj": ("self_attention.linear_proj", False),
    "linear_fc1": ("mlp.linear_fc1", True),
    "linear_fc2": ("mlp.linear_fc2", False),
}
COLUMN_SLOTS = tuple(s for s, (_, column) in SLOTS.items() if column)

# Sequence parallelism keeps the LayerNorms / dropout of these families' layers on sequence shards; the other
# families' sub-modules (branches, U/V factors, doped low-rank) have no sequence-parallel path here.
SP_FAMILIES = ("dense", "wide")


def slot_dims(hidden: int, ffn: int) -> dict[str, tuple[int, int]]:
    """(D_in, D_out) of each transformed linear of one layer."""
    return {"linear_qkv": (hidden, 3 * hidden), "linear_proj": (hidden, hidden), "linear_fc1": (hidden, ffn),
            "linear_fc2": (ffn, hidden)}


def padded_vocab_size(vocab: int, tp: int = 1, multiple: int = 128) -> int:
    """Pad to a multiple of lcm(multiple, TP). Megatron pads to multiple x TP, which makes the model (and the
    loss) depend on the TP degree; lcm gives the same vocabulary at every TP that divides `multiple`."""
    for name, value in (("vocab_size", vocab), ("tensor parallel size", tp), ("multiple", multiple)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SiftError(f"{name} {value!r} must be a positive integer")
    step = math.lcm(multiple, tp)
    return -(-vocab // step) * step


def nnz_for(numel: int, density: float) -> int:
    """Exact kept count: floor(density * numel), guarded against float noise.

    Plain int(density * numel) loses one element whenever the product lands just below an integer,
    e.g. int((1 - 0.9) * 1000) == 99 and int(0.57 * 100) == 56. A product within a relative 1e-12 of
    the next integer is therefore taken as that integer; anything further away is floored as usual.
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    x = density * numel
    return min(numel, math.floor(x + 1e-12 * max(1.0, x)))


def check_layout(cfg: Config, world: int) -> tuple[int, int]:
    """(dp_size, grad-accumulation steps) or a one-line error."""
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    if world % (tp * pp):
        raise SiftError(f"world size {world} is not divisible by parallel.tensor x parallel.pipeline = {tp} x {pp}")
    dp = world // (tp * pp)
    per_step = cfg.train.micro_batch_size * dp
    if cfg.train.global_batch_size % per_step:
        raise SiftError(f"train.global_batch_size {cfg.train.global_batch_size} is not divisible by "
                        f"micro_batch_size x data-parallel size = {cfg.train.micro_batch_size} x {dp}")
    stage = effective_zero_stage(cfg, dp)
    if cfg.model.precision == "fp64" and stage != 0:
        raise SiftError(f"model.precision fp64 needs ZeRO stage 0, got {stage} (DeepSpeed's ZeRO optimizers keep "
                        "fp32 master weights, rounding the model every step)"
                        + ("; pipeline parallelism needs ZeRO-1, so use parallel.pipeline=1" if pp > 1
                           else "; set zero.stage=0"))
    if cfg.model.precision == "bf16" and stage == 0:
        raise SiftError("model.precision bf16 needs zero.stage 1 or 2 (DeepSpeed's stage 0 cannot accumulate "
                        "bf16 gradients in fp32)")
    if pp > 1 and cfg.zero.stage != 1:
        raise SiftError(f"zero.stage {cfg.zero.stage} with parallel.pipeline {pp}: only ZeRO-1 composes with "
                        "pipeline schedules in DeepSpeed 0.19 (stage 2 fails in step(), stage 0 refuses the "
                        "schedule's backward); use zero.stage=1")
    accum = cfg.train.global_batch_size // per_step
    if cfg.parallel.virtual_pipeline and accum < pp:
        raise SiftError(f"parallel.virtual_pipeline needs at least parallel.pipeline = {pp} micro-batches per step, "
                        f"got global_batch_size / (micro_batch_size x DP) = {accum}")
    if cfg.sparsity.family != "dense" and cfg.zero.stage == 3:
        raise SiftError("sparsity.family with zero.stage 3 is not supported (masks and the dense-gradient hook "
                        "need whole weight shards on each rank); use zero.stage 1 or 2")
    if cfg.sparsity.family not in SP_FAMILIES and cfg.parallel.sequence_parallel:
        raise SiftError(f"parallel.sequence_parallel is supported for sparsity.family {' and '.join(SP_FAMILIES)}, "
                        f"not {cfg.sparsity.family}")
    if cfg.zero.stage == 3 and cfg.parallel.sequence_parallel:
        raise SiftError("zero.stage 3 with parallel.sequence_parallel is not supported; use stage 1 or 2")
    return dp, accum
