"""Layout rules every module shares, without torch: the transformed slots and how TP splits them, the padded
vocabulary, the exact kept count of a mask, and which families support sequence parallelism. Config checks,
the engine, `sift plan` / `sift flops`, the spec builder, masks and conversion all ask here."""

from __future__ import annotations

import math

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


def padded_vocab_size(vocab: int, tp: int, multiple: int) -> int:
    """Pad to a multiple of lcm(multiple, TP). Megatron pads to multiple x TP, which makes the model (and the
    loss) depend on the TP degree; lcm gives the same vocabulary at every TP that divides `multiple`."""
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
