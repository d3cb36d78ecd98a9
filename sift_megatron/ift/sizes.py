"""Sizes of the Sparse-IFT families (spec sections 1 and 8): width, branch count, inner dimensions.

Every transformed linear keeps FLOPs(psi(s)) ~= D_in x D_out under unstructured sparsity, where a sparse
matmul costs (1 - s) of its dense cost.

sparsity.align > 1 (GPU-friendly widths): the paper's widths (e.g. GPT-3 Small Sparse Wide s=0.5: hidden 1092,
head dim 91) are not multiples of 8, which sends cuBLAS to slow kernels. Aligned widths are the admissible
multiples nearest to the paper's targets, and s is re-solved for them (`_iso_sparsity`) so the four transformed
linears of a layer stay exactly iso-FLOP together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sift_megatron.config import Config, SparsityConfig, choices, one_of
from sift_megatron.errors import SiftError
from sift_megatron.layout import SLOTS, slot_dims

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
    # Sparse Wide: 1 - (d/d')^2; with sparsity.align > 1 (every family but parallel) the s re-solved for the
    # aligned widths, which is then the sparsity used
    exact_iso_sparsity: float | None = None

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(D_in, D_out) of each transformed linear of one layer."""
        return slot_dims(self.hidden_size, self.ffn_hidden_size)


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


def _round_nearest(x: float, multiple: int) -> int:
    """The multiple of `multiple` nearest to x, ties up (the float guard makes an exact tie a tie)."""
    return int(math.floor(x / multiple + 0.5 + 1e-9)) * multiple


def aligned_wide_width(hidden: int, heads: int, s: float, policy: str, tp: int, quantum: int,
                       head_quantum: int) -> tuple[int, int]:
    """(d', heads') for Sparse Wide with sparsity.align: d' a multiple of `quantum` (lcm(align, TP quantum)),
    the head dim a multiple of `head_quantum` (min(align, 8)); the admissible width nearest to the paper's
    target d sqrt(1/(1-s)), ties up, never below the dense width.

    keep_heads: the head dim is chosen (GPT-3 Small, align 64: 1152 = 12 x 96 at s=0.5, 1536 = 12 x 128 at
    0.75); as without align, d' does not depend on TP. keep_head_dim: the dense head dim must already be a
    multiple of `head_quantum`; the head count is a multiple of TP as without align (so d' may depend on TP).
    """
    target = hidden * math.sqrt(1.0 / (1.0 - s))
    if policy == "keep_heads":
        unit = heads * math.lcm(head_quantum, quantum // math.gcd(quantum, heads))
        return max(_round_nearest(target, unit), _round_up(hidden, unit)), heads
    head_dim = hidden // heads
    if head_dim % head_quantum:
        raise SiftError(f"sparsity.head_policy keep_head_dim keeps the head dim {head_dim}, not a multiple of "
                        f"{head_quantum} as sparsity.align needs: use head_policy keep_heads or a smaller align")
    step = math.lcm(tp, quantum // math.gcd(quantum, head_dim))
    new_heads = max(_round_nearest(target / head_dim, step), _round_up(heads, step))
    return new_heads * head_dim, new_heads


def _iso_sparsity(budget: int, work: int, what: str) -> float:
    """The one s' with (1 - s') x `work` = `budget`: `work` sums D_in x D_out over a layer's sparse matrices,
    `budget` is what the dense layer costs minus any dense part (doped's low rank), so the transformed layer
    is then exactly iso-FLOP. One-line error outside [0, 1)."""
    s = (work - budget) / work
    if not 0.0 <= s < 1.0:
        raise SiftError(f"{what}: re-solved sparsity {s:.4f} is outside [0, 1); use a smaller sparsity.align")
    return s


def _tp_quantum(tp: int) -> int:
    """Widths are rounded to a multiple of 8 (of TP if TP does not divide 8): the model is then the same
    at TP=1, 2, 4, 8 and every TP-split dimension divides evenly."""
    return 8 if 8 % tp == 0 else tp


def transformed_shape(cfg: Config) -> ModelShape:
    """The model `cfg` builds. Raises a one-line SiftError for a family, s or TP it cannot size, also for
    a Config that did not pass `config.validate` (the planner tries layouts the config does not name)."""
    m, sp, tp = cfg.model, cfg.sparsity, cfg.parallel.tensor
    s, fam = sp.s, sp.family
    one_of("sparsity.family", fam, choices(SparsityConfig, "family"))
    if not (isinstance(s, int | float) and 0.0 <= s < 1.0):
        raise SiftError(f"sparsity.s must be in [0, 1), got {s}")
    if tp < 1:
        raise SiftError(f"parallel.tensor must be >= 1, got {tp}")
    h, heads, ffn = m.hidden_size, m.num_attention_heads, m.ffn
    type(sp).check_align(sp.align)
    if h % heads or heads % tp or ffn % tp:
        raise SiftError(f"sizes hidden {h} / heads {heads} / ffn {ffn} cannot be split over parallel.tensor {tp} "
                        "(need hidden % heads == 0, heads % TP == 0, ffn % TP == 0)")
    if fam == "dense" or s == 0.0 and fam == "wide":
        return ModelShape(fam, h, heads, ffn, s if fam != "dense" else 0.0, s)
    q = _tp_quantum(tp)
    if sp.align != 1 and fam != "parallel":  # Sparse Parallel's branches keep the dense widths
        return _aligned_shape(cfg, math.lcm(sp.align, q))
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


def _aligned_shape(cfg: Config, quantum: int) -> ModelShape:
    """transformed_shape with sparsity.align > 1: widths are multiples of `quantum` = lcm(align, TP quantum),
    the nearest to the paper's targets (ties up), and one s' per model makes each layer's four transformed
    linears iso-FLOP together: Sparse Wide 1 - sum(D_in D_out) / sum(D_in' D_out') (= 1 - (d/d')^2 when ffn
    scales with hidden), factorized 1 - sum(D_in D_out) / sum(d_sf (D_in + D_out)), doped
    sum(d_sd (D_in + D_out)) / sum(D_in D_out)."""
    m, sp, tp = cfg.model, cfg.sparsity, cfg.parallel.tensor
    s, fam, align = sp.s, sp.family, sp.align
    h, heads, ffn = m.hidden_size, m.num_attention_heads, m.ffn
    dense_dims = ModelShape(fam, h, heads, ffn, s, s).linear_dims()
    dense_work = sum(din * dout for din, dout in dense_dims.values())
    what = f"sparsity.align {align} with family {fam} s={s}"
    if fam == "wide":
        d, new_heads = aligned_wide_width(h, heads, s, sp.head_policy, tp, quantum, min(align, 8))
        new_ffn = max(_round_nearest(d * ffn / h, quantum), _round_up(ffn, quantum))
        work = sum(din * dout for din, dout in ModelShape(fam, d, new_heads, new_ffn, s, s).linear_dims().values())
        exact = _iso_sparsity(dense_work, work, what)
        return ModelShape(fam, d, new_heads, new_ffn, exact, s, exact_iso_sparsity=exact)
    if fam == "factorized":  # paper target d_sf = D_in D_out / ((D_in + D_out)(1 - s))
        inner = {name: max(quantum, _round_nearest(din * dout / ((din + dout) * (1.0 - s)), quantum))
                 for name, (din, dout) in dense_dims.items()}
        work = sum(inner[name] * (din + dout) for name, (din, dout) in dense_dims.items())
        exact = _iso_sparsity(dense_work, work, what)
    else:  # doped, paper target d_sd = s D_in D_out / (D_in + D_out)
        inner = {name: max(quantum, _round_nearest(s * din * dout / (din + dout), quantum))
                 for name, (din, dout) in dense_dims.items()}
        low_rank = sum(inner[name] * (din + dout) for name, (din, dout) in dense_dims.items())
        exact = _iso_sparsity(dense_work - low_rank, dense_work, what)  # (1 - s') D + low_rank = D
    return ModelShape(fam, h, heads, ffn, exact, s, inner=inner, exact_iso_sparsity=exact)


def expected_shapes(cfg, shape, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """Every parameter `build_model(cfg, padded_vocab, shape)` has, at TP=1, by global name."""
    m = cfg.model
    h, f = shape.hidden_size, shape.ffn_hidden_size
    dims = slot_dims(h, f)
    out: dict[str, tuple[int, ...]] = {
        "embedding.word_embeddings.weight": (padded_vocab, h),
        "embedding.position_embeddings.weight": (m.max_position_embeddings or m.seq_length, h),
        "decoder.final_layernorm.weight": (h,),
        "decoder.final_layernorm.bias": (h,),
    }
    if not m.tie_embeddings:
        out["output_layer.weight"] = (padded_vocab, h)
    for i in range(m.num_layers):
        for norm in ("input_layernorm", "pre_mlp_layernorm"):
            out[f"decoder.layers.{i}.{norm}.weight"] = (h,)
            out[f"decoder.layers.{i}.{norm}.bias"] = (h,)
        for slot, (din, dout) in dims.items():
            p = f"decoder.layers.{i}.{SLOTS[slot][0]}"
            column = SLOTS[slot][1]
            if shape.family in ("dense", "wide"):
                out |= {f"{p}.weight": (dout, din), f"{p}.bias": (dout,)}
            elif shape.family == "parallel":
                for j in range(shape.branches):
                    out |= {f"{p}.branches.{j}.weight": (dout, din), f"{p}.branches.{j}.bias": (dout,)}
            elif shape.family == "factorized":
                r = shape.inner[slot]
                out |= {f"{p}.u.weight": (r, din), f"{p}.norm.weight": (r,), f"{p}.norm.bias": (r,),
                        f"{p}.v.weight": (dout, r), (f"{p}.v.bias" if column else f"{p}.bias"): (dout,)}
            elif shape.family == "doped":
                r = shape.inner[slot]
                out |= {f"{p}.sparse.weight": (dout, din), f"{p}.sparse.bias": (dout,),
                        f"{p}.u.weight": (r, din), f"{p}.v.weight": (dout, r)}
    return out
