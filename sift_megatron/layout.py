"""Layout rules every module shares, without torch: the transformed slots and how TP splits them, the padded
vocabulary, the exact kept count of a mask, which families support sequence parallelism, and the rules of a layout
on a world size. Config checks, the engine, `sift plan` / `sift flops`, the spec builder, masks and conversion all
ask here."""

from __future__ import annotations

import math

from sift_megatron.config import Config, effective_zero_stage, rampup_for_layout, split_problems
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


def layout_problems(cfg: Config, tp: int, pp: int, vp: int | None, sp: bool, stage: int, world: int,
                    precision: str | None = None) -> list[str]:
    """Why `sift train` would refuse this layout on `world` ranks with ZeRO `stage` (configured) and `precision`
    (default: the config's), one line per broken rule: check_layout raises the first, `sift plan` lists them."""
    out = split_problems(cfg, tp, pp, vp, sp)
    if world % (tp * pp):
        return out + [f"world size {world} is not divisible by parallel.tensor x parallel.pipeline = {tp} x {pp}"]
    t, dp, precision = cfg.train, world // (tp * pp), precision or cfg.model.precision
    accum = t.global_batch_size // (t.micro_batch_size * dp)
    if t.global_batch_size % (t.micro_batch_size * dp):
        out.append(f"train.global_batch_size {t.global_batch_size} is not divisible by micro_batch_size x "
                   f"data-parallel size = {t.micro_batch_size} x {dp}")
    elif vp and accum < pp:
        out.append(f"parallel.virtual_pipeline needs at least parallel.pipeline = {pp} micro-batches per step, "
                   f"got global_batch_size / (micro_batch_size x DP) = {accum}")
    else:
        try:
            rampup_for_layout(cfg, dp)
        except SiftError as e:
            out.append(str(e))
    runs = effective_zero_stage(cfg, dp, stage=stage, pipeline=pp, precision=precision)
    rules = [
        (precision == "fp64" and runs != 0,
         f"model.precision fp64 needs ZeRO stage 0, got {runs} (DeepSpeed's ZeRO optimizers keep fp32 master "
         "weights, rounding the model every step)" + ("; pipeline parallelism needs ZeRO-1, so use "
                                                      "parallel.pipeline=1" if pp > 1 else "; set zero.stage=0")),
        (precision == "bf16" and runs == 0, "model.precision bf16 needs zero.stage 1 or 2 (DeepSpeed's stage 0 "
                                            "cannot accumulate bf16 gradients in fp32)"),
        (pp > 1 and stage != 1, f"zero.stage {stage} with parallel.pipeline {pp}: only ZeRO-1 composes with pipeline "
                                "schedules in DeepSpeed 0.19 (stage 2 fails in step(), stage 0 refuses the schedule's "
                                "backward); use zero.stage=1"),
        (cfg.sparsity.family != "dense" and stage == 3, "sparsity.family with zero.stage 3 is not supported (masks "
         "and the dense-gradient hook need whole weight shards on each rank); use zero.stage 1 or 2"),
        (sp and cfg.sparsity.family not in SP_FAMILIES, f"parallel.sequence_parallel is supported for "
         f"sparsity.family {' and '.join(SP_FAMILIES)}, not {cfg.sparsity.family}"),
        (sp and stage == 3, "zero.stage 3 with parallel.sequence_parallel is not supported; use stage 1 or 2"),
    ]
    return out + [message for broken, message in rules if broken]


def check_layout(cfg: Config, world: int) -> tuple[int, int]:
    """(dp_size, grad-accumulation steps) of the config's layout on `world` ranks, or a one-line error."""
    p, t = cfg.parallel, cfg.train
    problems = layout_problems(cfg, p.tensor, p.pipeline, p.virtual_pipeline, p.sequence_parallel, cfg.zero.stage,
                               world)
    if problems:
        raise SiftError(problems[0])
    dp = world // (p.tensor * p.pipeline)
    return dp, t.global_batch_size // (t.micro_batch_size * dp)
