"""Forward FLOPs per token and parameter counts of the dense baseline and the Sparse-IFT model of a config.

Why: Sparse-IFT's claim is iso-FLOP *transformed layers* (spec section 1); the attention matmuls and the
LM head grow with the widened hidden size of Sparse Wide, so both ratios are reported. Pure arithmetic on
the config (no torch), so `sift flops`, `sift plan` and the quickstart table are instant.

Conventions (they reproduce the spec's GPT-3 Small figures at n=1024, V=50257: linear 169.9M, attention
37.8M, LM head 77.2M, total 284.8M; Sparse Wide 335.2M / 399.8M):
* A multiply-add is 2 FLOPs. A linear D_in -> D_out costs 2 D_in D_out per token; a sparse one costs
  2 nnz, nnz = floor((1-s) numel) per tensor (the masks' exact count; per Q, K and V block of a fused QKV).
  Every weight of a linear is used once per token, so a non-uniform distribution (ERK/ER, same total nnz)
  has the same FLOPs as uniform.
* Attention per layer and token: QK^T 2 n h and softmax(.)V 2 n h (h = heads x head dim, n = sequence),
  the full n x n square as computed by megatron's unfused attention, not halved for the causal mask.
* LM head: 2 h V per token on the logical vocabulary V (the padding rows up to the padded vocabulary add
  Vp/V - 1, 0.09 % for GPT-2's 50257 -> 50304; reported as `padded_vocab_size`).
* Totals are matmul FLOPs. Embedding lookups cost nothing; norms, biases, activations, residual adds and
  softmax are listed separately as `elementwise` (rough constants below) and not included in `total`.
* `total` counts a sparse matmul at its nonzeros (the useful FLOPs Sparse-IFT is iso-FLOP in); `executed`
  counts what a masked dense GEMM runs: D_in x D_out whatever s (GPT-3 Small at n=2048, paper widths:
  Sparse Wide s=0.5 executes 1.74x the dense model's FLOPs, s=0.75 3.05x).
* `sparsity.pattern` (sparse/pattern.py): block masks keep nnz_for(tiles, 1-s) whole b x b tiles per tensor (per
  Q, K, V block), N:M masks exactly N/M of the elements; `total` counts those nonzeros. `kernel` counts what a
  kernel for the pattern executes: a block-sparse GEMM the nonzero tiles (tiles x b^2 x 2 per token), 2:4 sparse
  tensor cores half the dense GEMM; unstructured and other N:M masks run as masked dense GEMMs (= `executed`).
* With sparsity.align > 1 the report also holds the paper's widths (`shape.paper`, `paper`) beside the
  aligned ones the model is built with.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from sift_megatron.config import Config
from sift_megatron.errors import SiftError
from sift_megatron.ift.sizes import LINEARS, ModelShape, transformed_shape
from sift_megatron.layout import COLUMN_SLOTS, nnz_for, padded_vocab_size  # noqa: F401 - re-exported
from sift_megatron.pattern import Pattern, parse_pattern

UNSTRUCTURED = Pattern("unstructured")

GPT2_VOCAB = 50257  # GPT-2 BPE, the GPT-3 paper's tokenizer: assumed when the config names no vocabulary
# Rough elementwise costs (FLOPs per element): only for the `elementwise` line, never in totals.
LAYERNORM_FLOPS = 5  # mean, variance, normalise, scale, shift
ACTIVATION_FLOPS = 8  # GELU (tanh form)
SOFTMAX_FLOPS = 5  # scale, mask, max-subtract, exp, normalise (per score)


def resolve_vocab(cfg: Config, vocab_size: int | None = None) -> tuple[int, str]:
    """(vocabulary, where it came from) the way training picks it, without loading the tokenizer: explicit
    argument, model.vocab_size, the tokenizer's metadata, data.mock_vocab_size, else GPT-2's 50257."""
    if vocab_size:
        return int(vocab_size), "argument"
    if cfg.model.vocab_size:
        return cfg.model.vocab_size, "model.vocab_size"
    if cfg.data.tokenizer and not cfg.data.mock:
        meta = Path(cfg.data.tokenizer) / "sift_tokenizer.json"
        if meta.is_file():
            try:
                return int(json.loads(meta.read_text())["vocab_size"]), f"tokenizer {cfg.data.tokenizer}"
            except (ValueError, KeyError, TypeError):
                pass
    if cfg.data.mock:
        return cfg.data.mock_vocab_size, "data.mock_vocab_size"
    return GPT2_VOCAB, "assumed (GPT-2 BPE; set model.vocab_size or build data.tokenizer)"


def baseline_config(cfg: Config) -> Config:
    """The dense baseline of a config: same model section, family dense."""
    return dataclasses.replace(cfg, sparsity=dataclasses.replace(cfg.sparsity, family="dense", s=0.0))


# ----------------------------------------------------------------------------------------------------------
# One transformed linear


@dataclasses.dataclass(frozen=True)
class SlotCost:
    """What one transformed linear slot of one layer holds and computes (logical, TP=1 sizes).

    `*_split` parameters are sharded over TP, `*_replicated` are whole on every TP rank."""

    name: str
    d_in: int
    d_out: int
    flops: int  # forward matmul FLOPs per token
    kernel_flops: int  # ... that a kernel for the mask's pattern executes (masked dense for unstructured)
    sparse_numel: int  # stored elements of the sparse tensors (dense storage incl. masked zeros)
    sparse_nnz: int  # their nonzeros
    dense_weights: int  # dense matrices: the dense model's weight, doped's low-rank U and V
    params_split: int  # weights + column-parallel biases
    params_replicated: int  # row-parallel biases, factorized mid LayerNorm
    bias_params: int
    norm_params: int
    elementwise: int  # approximate elementwise FLOPs per token (biases, family activations/norms, sums)
    extra_act_split: int  # extra activation elements per token the family stores (split over TP)
    extra_act_replicated: int  # ... whole on every TP rank


def slot_cost(shape: ModelShape, name: str, pattern: Pattern = UNSTRUCTURED) -> SlotCost:
    d_in, d_out = shape.linear_dims()[name]
    fam, density = shape.family, 1.0 - shape.sparsity
    column = name in COLUMN_SLOTS
    numel = d_in * d_out
    sparse, dense_w, split_bias, repl_bias, norms = [], 0, 0, 0, 0
    elementwise, act_split, act_repl = 0, 0, 0
    if fam == "dense":
        dense_w = numel
        split_bias, repl_bias = (d_out, 0) if column else (0, d_out)
    elif fam == "wide":
        sparse = [(d_out, d_in)]
        split_bias, repl_bias = (d_out, 0) if column else (0, d_out)
    elif fam == "parallel":
        k = shape.branches
        sparse = [(d_out, d_in)] * k
        split_bias, repl_bias = (k * d_out, 0) if column else (0, k * d_out)
        elementwise += (k - 1) * d_out
        if name == "linear_fc1" or shape.branch_activation != "none":
            # fc1's k branch activations replace the MLP's one (counted in _model_flops, minus it there)
            elementwise += k * d_out * ACTIVATION_FLOPS
            # each branch keeps its pre-activation output for sigma's backward; row branches are all-reduced
            # (whole on every rank) before their sigma
            if column:
                act_split += k * d_out
            else:
                act_repl += k * d_out
    elif fam == "factorized":
        d = shape.inner[name]
        sparse = [(d, d_in), (d_out, d)]  # U, V
        norms = 2 * d
        split_bias, repl_bias = (d_out, 0) if column else (0, d_out)
        elementwise += d * (LAYERNORM_FLOPS + ACTIVATION_FLOPS)
        act_repl += 3 * d  # U output, LayerNorm output, sigma output: gathered, whole on every rank
    elif fam == "doped":
        r = shape.inner[name]
        sparse = [(d_out, d_in)]
        dense_w = r * (d_in + d_out)
        split_bias, repl_bias = (d_out, 0) if column else (0, d_out)
        elementwise += d_out  # sparse + low-rank sum
        act_repl += r  # U output (gathered)
    else:  # transformed_shape already rejects it
        raise SiftError(f"unknown sparsity.family {fam!r}")
    # The fused QKV's output tensors (all but factorized's U) keep exact nnz per Q, K and V block (three equal
    # blocks: no grouped-query attention here), as the masks do (sparse.layers.budget_parts).
    qkv_out = [name == "linear_qkv" and not (fam == "factorized" and i == 0) for i in range(len(sparse))]
    nnz = sum(3 * _nnz((r // 3, c), density, pattern, name) if q else _nnz((r, c), density, pattern, name)
              for (r, c), q in zip(sparse, qkv_out))
    numels = sum(r * c for r, c in sparse)
    # A block-sparse kernel runs the nonzero tiles only; 2:4 sparse tensor cores run half the dense GEMM (= nnz);
    # anything else is a masked dense GEMM.
    skips = pattern.kind == "block" or (pattern.n, pattern.m) == (2, 4)
    elementwise += split_bias + repl_bias
    return SlotCost(name, d_in, d_out, flops=2 * (nnz + dense_w), kernel_flops=2 * ((nnz if skips else numels) + dense_w),
                    sparse_numel=numels, sparse_nnz=nnz,
                    dense_weights=dense_w, params_split=numels + dense_w + split_bias,
                    params_replicated=repl_bias + norms, bias_params=split_bias + repl_bias, norm_params=norms,
                    elementwise=elementwise, extra_act_split=act_split, extra_act_replicated=act_repl)


def sparse_tensors(shape: ModelShape, name: str) -> list[tuple[int, int, int, bool]]:
    """(rows, cols, TP-split dim, fused QKV output) of each sparse [out, in] tensor of one slot, as ift/layers.py
    builds them: column-parallel split dim 0 (qkv, fc1 and every factorized V), row-parallel dim 1."""
    d_in, d_out = shape.linear_dims()[name]
    split, qkv = (0 if name in COLUMN_SLOTS else 1), name == "linear_qkv"
    if shape.family in ("wide", "doped"):
        return [(d_out, d_in, split, qkv)]
    if shape.family == "parallel":
        return [(d_out, d_in, split, qkv)] * shape.branches
    if shape.family == "factorized":
        d = shape.inner[name]
        return [(d, d_in, split, False), (d_out, d, 0, qkv)]
    return []


def check_pattern_fits(cfg: Config) -> None:
    """One-line error unless every sparse tensor's TP shard holds whole tiles / N:M groups at parallel.tensor
    (what the mask init checks on the built model, here before anything is built or written)."""
    if not parse_pattern(cfg.sparsity.pattern, cfg.sparsity.block).structured or cfg.sparsity.family == "dense":
        return
    shape = transformed_shape(cfg)
    pat = mask_pattern(cfg, shape)
    tp, head_dim = cfg.parallel.tensor, shape.hidden_size // shape.num_attention_heads
    for name in LINEARS:
        for rows, cols, split, qkv in sparse_tensors(shape, name):
            local = [rows, cols]
            local[split] //= tp
            uneven = tp * local[split] != (rows, cols)[split]
            if pat.kind == "block":
                bad = uneven or any(x % pat.block for x in (*local, *([head_dim] if qkv else [])))
                what = (f"sparsity.block={pat.block}", "each shard's dims" + (" and the head dim" if qkv else "")
                        + " must be multiples of the block")
            else:
                bad = uneven or local[1] % pat.m != 0
                what = (f"sparsity.pattern={pat.n}:{pat.m}", f"each shard's input dim must be a multiple of {pat.m}")
            if bad:
                raise SiftError(f"{what[0]} does not fit the {shape.family} {name} sparse tensor: logical shape "
                                f"({rows}, {cols}), local shard ({local[0]}, {local[1]}) at parallel.tensor={tp}"
                                + (f", head dim {head_dim}" if qkv and pat.kind == "block" else "") + f" ({what[1]})")


def _nnz(shape: tuple[int, int], density: float, pattern: Pattern, slot: str) -> int:
    """Nonzeros of one sparse [out, in] tensor (one Q / K / V block of a fused QKV), as its mask keeps them:
    unstructured nnz_for(elements), block nnz_for(tiles) whole tiles, N:M exactly N/M of the elements."""
    rows, cols = shape
    if pattern.kind == "block":
        b = pattern.block
        if rows % b or cols % b:
            raise SiftError(f"sparsity.block={b} does not divide the {slot} sparse tensor of shape ({rows}, {cols}) "
                            "(each of Q, K, V for linear_qkv): every dim must be a multiple of the block")
        return nnz_for(rows * cols // (b * b), density) * b * b
    if pattern.kind == "nm":
        if cols % pattern.m:
            raise SiftError(f"sparsity.pattern={pattern.n}:{pattern.m} needs the input dim of every sparse tensor to be a "
                            f"multiple of {pattern.m}; {slot} has shape ({rows}, {cols})")
        return rows * cols // pattern.m * pattern.n
    return nnz_for(rows * cols, density)


def layer_slots(shape: ModelShape, pattern: Pattern = UNSTRUCTURED) -> dict[str, SlotCost]:
    return {name: slot_cost(shape, name, pattern) for name in LINEARS}


def mask_pattern(cfg: Config, shape: ModelShape) -> Pattern:
    """cfg's sparsity.pattern / block; N:M only at the density N/M it keeps (as the mask init checks)."""
    pat = parse_pattern(cfg.sparsity.pattern, cfg.sparsity.block)
    if pat.kind == "nm" and shape.family != "dense" and abs(shape.sparsity - (1 - pat.n / pat.m)) > 1e-9:
        want = 1 - pat.n / pat.m
        raise SiftError(f"sparsity.pattern={pat.n}:{pat.m} keeps density {pat.n}/{pat.m}: the sparsity used must be "
                        f"{want:g}, got {shape.sparsity:g} (set sparsity.s={want:g}; exact_iso / align re-solve s)")
    return pat


# ----------------------------------------------------------------------------------------------------------
# Whole model


def _model_flops(cfg: Config, shape: ModelShape, seq: int, vocab: int, pattern: Pattern | None = None) -> dict:
    L = cfg.model.num_layers
    h, f, heads = shape.hidden_size, shape.ffn_hidden_size, shape.num_attention_heads
    slots = layer_slots(shape, mask_pattern(cfg, shape) if pattern is None else pattern)
    per_layer = {name: c.flops for name, c in slots.items()}
    linear_layer = sum(per_layer.values())
    attn_layer = 2 * 2 * seq * h  # QK^T and AV, 2 n h each
    mlp_act = 0 if shape.family == "parallel" else f * ACTIVATION_FLOPS  # parallel: on fc1's branches instead
    elem_layer = (sum(c.elementwise for c in slots.values()) + 2 * h * LAYERNORM_FLOPS + mlp_act
                  + 2 * h + heads * seq * SOFTMAX_FLOPS)
    dense_equiv_layer = 2 * sum(c.sparse_numel + c.dense_weights for c in slots.values())
    kernel_layer = sum(c.kernel_flops for c in slots.values())
    head = 2 * h * vocab
    out = {
        "per_layer": {**per_layer, "transformed_layers": linear_layer, "attention": attn_layer},
        "transformed_layers": L * linear_layer,
        "attention": L * attn_layer,
        "lm_head": head,
        "total": L * (linear_layer + attn_layer) + head,
        "elementwise": L * elem_layer + h * LAYERNORM_FLOPS + h,  # + final LayerNorm, position-embedding add
        # the same architecture with every mask full: what RigL's dense-gradient step costs
        "dense_equivalent_total": L * (dense_equiv_layer + attn_layer) + head,
        # what the GPU runs: a masked dense GEMM executes every masked zero (the same sum as above)
        "executed": {"transformed_layers": L * dense_equiv_layer, "total": L * (dense_equiv_layer + attn_layer) + head},
        # what a kernel for the mask's pattern runs: block-sparse skips zero tiles, 2:4 tensor cores run half,
        # unstructured (and other N:M) = executed
        "kernel": {"transformed_layers": L * kernel_layer, "total": L * (kernel_layer + attn_layer) + head},
    }
    return out


def _model_params(cfg: Config, shape: ModelShape, padded_vocab: int) -> dict:
    m, L, h = cfg.model, cfg.model.num_layers, shape.hidden_size
    slots = layer_slots(shape, mask_pattern(cfg, shape)).values()
    positions = m.max_position_embeddings or m.seq_length
    sparse_stored = L * sum(c.sparse_numel for c in slots)
    sparse_active = L * sum(c.sparse_nnz for c in slots)
    dense_w = L * sum(c.dense_weights for c in slots)
    low_rank = dense_w if shape.family == "doped" else 0
    groups = {
        "word_embedding": padded_vocab * h,
        "position_embedding": positions * h,
        "lm_head": 0 if m.tie_embeddings else padded_vocab * h,  # tied: the word embedding
        "transformed_linears": sparse_stored + dense_w - low_rank,  # sparse (or the dense model's) weights
        "low_rank": low_rank,  # doped: dense U, V
        "biases": L * sum(c.bias_params for c in slots),
        "norms": L * (4 * h + sum(c.norm_params for c in slots)) + 2 * h,
    }
    stored = dict(groups)
    active = dict(groups)
    active["transformed_linears"] = groups["transformed_linears"] - sparse_stored + sparse_active
    return {
        "stored": sum(stored.values()),
        "active": sum(active.values()),
        "sparse_elements": sparse_stored,  # elements under a mask (1-byte mask each)
        "sparse_nonzeros": sparse_active,
        "groups": {k: {"stored": stored[k], "active": active[k]} for k in groups},
    }


def _shape_dict(shape: ModelShape) -> dict:
    return {"hidden_size": shape.hidden_size, "num_attention_heads": shape.num_attention_heads,
            "head_dim": shape.hidden_size // shape.num_attention_heads, "ffn_hidden_size": shape.ffn_hidden_size,
            "branches": shape.branches, "branch_activation": shape.branch_activation, "inner": dict(shape.inner),
            "sparsity": shape.sparsity,
            "nominal_sparsity": shape.nominal_sparsity, "exact_iso_sparsity": shape.exact_iso_sparsity}


def _training_flops(cfg: Config, fwd_sparse: int, fwd_dense_equiv: int) -> dict:
    """Training FLOPs per token, spec 3.4 (RigL's accounting): 3 f_S per static step; during RigL's update
    period (3 f_S dT + 2 f_S + f_D) / (dT + 1), f_D the dense-equivalent forward (dense gradient)."""
    d = cfg.dst
    static = 3 * fwd_sparse
    if cfg.sparsity.family == "dense" or d.algorithm == "static":
        return {"per_token": static, "during_updates": static, "algorithm": "static"}
    dt = d.interval
    during = (3 * fwd_sparse * dt + 2 * fwd_sparse + fwd_dense_equiv) / (dt + 1)
    steps = cfg.train.steps
    end = d.end * steps if d.end < 1 else min(d.end, steps)
    frac = max(0.0, min(1.0, (end - d.begin) / steps)) if steps else 0.0
    return {"per_token": frac * during + (1 - frac) * static, "during_updates": during,
            "algorithm": d.algorithm, "update_fraction_of_training": frac}


def _forward(cfg: Config, seq: int | None, vocab_size: int | None) -> dict:
    n = seq or cfg.model.seq_length
    if n < 1:
        raise SiftError(f"sequence length must be >= 1, got {n}")
    return _model_flops(cfg, transformed_shape(cfg), n, resolve_vocab(cfg, vocab_size)[0])


def model_flops_per_token(cfg: Config, seq: int | None = None, vocab_size: int | None = None) -> float:
    """Training FLOPs per token of the model `cfg` builds, sparse matmuls at their nonzeros (the useful FLOPs
    that Sparse-IFT keeps iso): 3 x forward (backward = 2 x forward; RigL's occasional dense-gradient steps
    not included). Attention is counted full (n x n QK^T and AV, not halved for the causal mask), the LM head
    on the logical vocabulary, as in `flop_report`. For MFU / model TFLOP/s."""
    return 3.0 * _forward(cfg, seq, vocab_size)["total"]


def executed_flops_per_token(cfg: Config, seq: int | None = None, vocab_size: int | None = None) -> float:
    """Training FLOPs per token the GPU executes: with sparsity.kernel=masked (a mask on dense GEMMs) every
    transformed linear at D_in x D_out whatever s; with kernel=block the nonzero tiles (`kernel` of flop_report).
    3 x forward, attention and LM head counted as in `model_flops_per_token` (equal to it for the dense family)."""
    fwd = _forward(cfg, seq, vocab_size)
    return 3.0 * fwd["kernel" if cfg.sparsity.kernel == "block" else "executed"]["total"]


def flop_report(cfg: Config, seq: int | None = None, vocab_size: int | None = None) -> dict:
    """Forward FLOPs per token and parameters of the dense baseline and of the transformed model (JSON-able).

    seq: sequence length for the attention term (default model.seq_length); vocab_size: overrides the
    vocabulary (default: `resolve_vocab`)."""
    n = seq or cfg.model.seq_length
    if n < 1:
        raise SiftError(f"sequence length must be >= 1, got {n}")
    vocab, source = resolve_vocab(cfg, vocab_size)
    padded = padded_vocab_size(vocab, cfg.parallel.tensor, cfg.model.make_vocab_size_divisible_by)
    shape = transformed_shape(cfg)
    check_pattern_fits(cfg)
    base_shape = transformed_shape(baseline_config(cfg))
    base = _model_flops(cfg, base_shape, n, vocab)
    tr = _model_flops(cfg, shape, n, vocab)
    base["training"] = _training_flops(baseline_config(cfg), base["total"], base["dense_equivalent_total"])
    tr["training"] = _training_flops(cfg, tr["total"], tr["dense_equivalent_total"])
    ratio = {name: tr["per_layer"][name] / base["per_layer"][name] for name in LINEARS}
    ratio.update(transformed_layers=tr["transformed_layers"] / base["transformed_layers"],
                 attention=tr["attention"] / base["attention"], lm_head=tr["lm_head"] / base["lm_head"],
                 total=tr["total"] / base["total"],
                 executed_total=tr["executed"]["total"] / base["total"],  # executed / dense baseline
                 kernel_total=tr["kernel"]["total"] / base["total"])
    shapes = {"baseline": _shape_dict(base_shape), "transformed": _shape_dict(shape)}
    align = cfg.sparsity.align
    paper = None
    if align != 1:  # the paper's widths beside the aligned ones
        paper_shape = transformed_shape(dataclasses.replace(cfg, sparsity=dataclasses.replace(cfg.sparsity, align=1)))
        shapes["paper"] = _shape_dict(paper_shape)
        paper = _model_flops(cfg, paper_shape, n, vocab, UNSTRUCTURED)  # paper widths: an unstructured mask
        paper["ratio"] = {"transformed_layers": paper["transformed_layers"] / base["transformed_layers"],
                          "total": paper["total"] / base["total"],
                          "executed_total": paper["executed"]["total"] / base["total"]}
    return {
        "family": cfg.sparsity.family,
        "s": cfg.sparsity.s,
        "align": align,
        "distribution": cfg.sparsity.distribution,
        "pattern": str(parse_pattern(cfg.sparsity.pattern, cfg.sparsity.block)),
        "head_policy": cfg.sparsity.head_policy,
        "num_layers": cfg.model.num_layers,
        "seq_length": n,
        "vocab_size": vocab,
        "vocab_source": source,
        "padded_vocab_size": padded,
        "shape": shapes,
        "baseline": base,
        "transformed": tr,
        "ratio": ratio,
        **({"paper": paper} if paper else {}),
        "params": {"baseline": _model_params(cfg, base_shape, padded),
                   "transformed": _model_params(cfg, shape, padded)},
        "units": "forward FLOPs per token (multiply-add = 2); parameters as counts",
    }


def training_flops_per_token(cfg: Config, vocab_size: int | None = None) -> float:
    """Whole-model training FLOPs per token of the model `cfg` builds, RigL's dense-gradient steps included
    (`flop_report(...)['transformed']['training']['per_token']`); x tokens = a run's training FLOPs."""
    return float(flop_report(cfg, vocab_size=vocab_size)["transformed"]["training"]["per_token"])


def dense_width_for_training_flops(cfg: Config, target_per_token: float, vocab_size: int | None = None) -> int:
    """The dense hidden size whose whole-model training FLOPs per token come closest to `target_per_token`:
    the dense model a sparse run must beat at equal whole-model FLOPs (its embedding, attention and LM head grow
    with the width too). Heads stay as configured, so the width is a multiple of num_attention_heads; an
    explicit ffn_hidden_size scales with the width (None stays 4 x hidden)."""
    m = cfg.model
    step = m.num_attention_heads
    dense = baseline_config(cfg)
    dense = dataclasses.replace(dense, dst=dataclasses.replace(dense.dst, algorithm="static"))

    def cost(h: int) -> float:
        ffn = None if m.ffn_hidden_size is None else max(1, round(m.ffn_hidden_size * h / m.hidden_size))
        return training_flops_per_token(dataclasses.replace(dense, model=dataclasses.replace(
            m, hidden_size=h, ffn_hidden_size=ffn)), vocab_size)

    if not target_per_token > 0:
        raise SiftError(f"target training FLOPs per token must be > 0, got {target_per_token}")
    h = step
    while cost(h + step) < target_per_token:  # cost grows with h: walk up to the bracket, then take the nearer
        h += step
    return min((h, h + step), key=lambda w: abs(cost(w) - target_per_token))
