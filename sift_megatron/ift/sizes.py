"""Sizes of the Sparse-IFT families (spec sections 1 and 8): width, branch count, inner dimensions.

Every transformed linear keeps FLOPs(psi(s)) ~= D_in x D_out under unstructured sparsity, where a sparse
matmul costs (1 - s) of its dense cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sift_megatron.config import Config
from sift_megatron.errors import SiftError

FAMILIES = ("dense", "wide", "parallel", "factorized", "doped")
# The transformed linears of a GPT layer (megatron names): fused QKV, attention output, MLP fc1, fc2.
LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass(frozen=True)
class ModelShape:
    """The model that is actually built: widths after the family transform, and the sparsity to use."""

    family: str
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    sparsity: float  # sparsity of every sparse tensor (exact-iso for Sparse Wide when asked)
    nominal_sparsity: float
    branches: int = 1  # Sparse Parallel
    branch_activation: str = "none"  # Sparse Parallel: sigma on the QKV / proj / fc2 branches (fc1: the model's)
    inner: dict = field(default_factory=dict)  # linear name -> d_sf (factorized) or rank d_sd (doped)
    exact_iso_sparsity: float | None = None  # Sparse Wide: 1 - (d/d')^2

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(D_in, D_out) of each transformed linear of one layer."""
        h, f = self.hidden_size, self.ffn_hidden_size
        return {"linear_qkv": (h, 3 * h), "linear_proj": (h, h), "linear_fc1": (h, f), "linear_fc2": (f, h)}


def parallel_branches(s: float) -> int:
    """round(1/(1-s)): round, not floor, so s=0.9 gives 10 despite float error."""
    return max(1, round(1.0 / (1.0 - s)))


def factorized_dim(d_in: int, d_out: int, s: float) -> int:
    """d_sf = D_in D_out / ((D_in + D_out)(1 - s)), rounded up."""
    return max(1, math.ceil(d_in * d_out / ((d_in + d_out) * (1.0 - s)) - 1e-9))


def doped_rank(d_in: int, d_out: int, s: float) -> int:
    """d_sd = s D_in D_out / (D_in + D_out), rounded down (the dense low-rank part must not exceed s)."""
    return max(1, math.floor(s * d_in * d_out / (d_in + d_out) + 1e-9))


def _round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple - 1e-9)) * multiple


def wide_width(hidden: int, heads: int, s: float, policy: str, tp: int) -> tuple[int, int]:
    """(d', heads') for Sparse Wide, target d' = d sqrt(1/(1-s)).

    keep_heads: d' = the next multiple of `heads` (Cerebras GPT-3 Small: 768 -> 1092 at s=0.5, 1536 at 0.75).
    megatron only needs heads % TP == 0 (already true of the dense model), not d' % (heads x TP), so d' does
    not depend on TP: the same model (and checkpoint) at TP=1, 2, 4, 8.
    keep_head_dim: more heads of the same size; the head count is rounded up to a multiple of TP, so here
    the width can depend on TP (e.g. 768 at s=0.5: 17 heads = 1088 at TP=1, 18 = 1152 at TP=2).
    """
    target = hidden * math.sqrt(1.0 / (1.0 - s))
    if policy == "keep_heads":
        return _round_up(target, heads), heads
    head_dim = hidden // heads
    new_heads = _round_up(target / head_dim, tp)
    return new_heads * head_dim, new_heads


def _tp_quantum(tp: int) -> int:
    """Widths are rounded to a multiple of 8 (of TP if TP does not divide 8): the model is then the same
    at TP=1, 2, 4, 8 and every TP-split dimension divides evenly."""
    return 8 if 8 % tp == 0 else tp


def transformed_shape(cfg: Config) -> ModelShape:
    """The model `cfg` builds. Raises a one-line SiftError for a family, s or TP it cannot size, also for
    a Config that did not pass `config.validate` (the planner tries layouts the config does not name)."""
    m, sp, tp = cfg.model, cfg.sparsity, cfg.parallel.tensor
    s, fam = sp.s, sp.family
    if fam not in FAMILIES:
        raise SiftError(f"sparsity.family must be one of {', '.join(FAMILIES)}, got {fam!r}")
    if not (isinstance(s, int | float) and 0.0 <= s < 1.0):
        raise SiftError(f"sparsity.s must be in [0, 1), got {s}")
    if tp < 1:
        raise SiftError(f"parallel.tensor must be >= 1, got {tp}")
    h, heads, ffn = m.hidden_size, m.num_attention_heads, m.ffn
    if h % heads or heads % tp or ffn % tp:
        raise SiftError(f"sizes hidden {h} / heads {heads} / ffn {ffn} cannot be split over parallel.tensor {tp} "
                        "(need hidden % heads == 0, heads % TP == 0, ffn % TP == 0)")
    if fam == "dense" or s == 0.0 and fam == "wide":
        return ModelShape(fam, h, heads, ffn, s if fam != "dense" else 0.0, s)
    q = _tp_quantum(tp)
    if fam == "wide":
        d, new_heads = wide_width(h, heads, s, sp.head_policy, tp)
        new_ffn = _round_up(d * ffn / h, q)
        if d % new_heads or new_heads % tp or new_ffn % tp:
            raise SiftError(f"Sparse Wide width {d} ({new_heads} heads, ffn {new_ffn}) cannot be split over "
                            f"parallel.tensor {tp}")
        exact = 1.0 - (h / d) ** 2
        return ModelShape(fam, d, new_heads, new_ffn, exact if sp.exact_iso else s, s, exact_iso_sparsity=exact)
    shape = ModelShape(fam, h, heads, ffn, s, s)
    dims = shape.linear_dims()
    if fam == "parallel":
        return ModelShape(fam, h, heads, ffn, s, s, branches=parallel_branches(s),
                          branch_activation=sp.parallel_branch_activation)
    fn = factorized_dim if fam == "factorized" else doped_rank
    # Inner dims are split over TP by the megatron layers that carry them: factorized rounds up (never
    # below iso), doped rounds down (the dense part never exceeds its budget).
    inner = {name: _round_up(fn(din, dout, s), q) if fam == "factorized" else max(q, fn(din, dout, s) // q * q)
             for name, (din, dout) in dims.items()}
    return ModelShape(fam, h, heads, ffn, s, s, inner=inner)
