"""`sift plan`: parameters, FLOPs and memory per GPU of a config on N GPUs, and a TP x PP x DP that fits.

Why: Sparse Wide stores k^2 = 1/(1-s) times the dense weights (plus masks), so a Sparse-IFT run needs a
different layout than its dense baseline; this says which before a cluster job is queued. Pure arithmetic
(no torch). Estimates, per GPU, of the worst pipeline stage:

* weights / gradients / optimizer state, by precision and the effective DeepSpeed ZeRO stage:
  model.precision fp32: weights 4 B, gradients 4 B, Adam 8 B at ZeRO-0; at ZeRO >= 1 DeepSpeed also keeps
  an fp32 copy of its partition, so 12 B / DP. bf16 (model.precision; `sift train` rejects an fp32 config
  that enables DeepSpeed bf16 / fp16, and so does this): weights 2 B, gradients 2 B + 4 B of fp32 accumulation (BF16_Optimizer's full buffer at
  ZeRO-1; none under PP, which accumulates in bf16), 12 B fp32 master + Adam. fp64 (ZeRO-0 only): 8 + 8 + 16 B.
  ZeRO-1 divides the optimizer state by DP, ZeRO-2 also the gradients, ZeRO-3 also the weights.
* masks: 1 B per sparse element (bool buffer) plus the cached float copy used for gradient masking
  (gradient dtype); RigL/SET: the captured dense gradient, 4 B per sparse element, at update steps.
* activations (Korthikanti et al. 2022, "Reducing activation recomputation"): per layer and micro-batch
  s b h (34 + 5 a s / h) bytes for 16-bit activations, i.e. (4e+2) s b h for the norms, the QKV/fc1 inputs
  and dropout masks (split over TP only with sequence parallelism), (4e h + 2e ffn) s b / TP for Q, K, V,
  the projection input and the MLP, (2e+1) a s^2 b / TP for the score matrices (megatron's unfused
  attention), e = bytes per element. Plus what each family stores in addition (branch pre-activations,
  factorized/doped inner vectors), the embedding dropout mask and the fp32 logits of the cross entropy
  4 s b V / TP on the last stage. 1F1B keeps min(PP, micro-batches) micro-batches in flight on the first
  stage (x (1 + (PP-1)/(PP VP)) interleaved). Full recompute (model.recompute=full, N =
  model.recompute_num_layers) keeps the input e s b h (/TP with SP) of every N-th layer plus N layers' full
  activations while they are recomputed; selective keeps everything but the score matrices, recomputing one
  layer's at a time. "total" is without recompute, "total_recompute" with full (N=1), "total_configured"
  with the config's model.recompute, which is what the suggestion uses.
* a 10 % reserve of GPU memory for the CUDA context, allocator fragmentation and NCCL buffers.
"""

from __future__ import annotations

import dataclasses

from sift_megatron.config import Config, deepspeed_config, deepspeed_overrides, effective_zero_stage
from sift_megatron.errors import SiftError
from sift_megatron.ift.flops import flop_report, layer_slots
from sift_megatron.ift.sizes import ModelShape, transformed_shape
from sift_megatron.layout import layout_problems

GB = 2**30  # "GB" as nvidia-smi and the 80 GB of an A100/H100 are meant: 2^30 bytes
RESERVE = 0.10
GPUS_PER_NODE = 8  # TP stays inside a node
DEEPSPEED_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)


def precision_of(cfg: Config) -> str:
    """model.precision, after the DeepSpeed settings pass the checks `sift train` makes (config.deepspeed_overrides:
    an fp32 config that enables bf16 / fp16 in zero.extra or zero.config_file is rejected there, so it is here)."""
    deepspeed_overrides(cfg)
    return cfg.model.precision


def _bucket_elements(cfg: Config) -> int:
    zo = deepspeed_config(cfg, 1, 1, check=False)["zero_optimization"]
    try:
        return int(float(zo.get("reduce_bucket_size", DEEPSPEED_BUCKET)))
    except (TypeError, ValueError):
        return DEEPSPEED_BUCKET


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    vp: int | None
    sequence_parallel: bool
    zero_stage: int  # effective (what DeepSpeed runs)
    micro_batch_size: int
    micro_batches: int  # per step and DP rank (gradient accumulation)

    def overrides(self, cfg: Config) -> str:
        parts = [f"parallel.tensor={self.tp}", f"parallel.pipeline={self.pp}",
                 f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}"]
        if self.vp is None and cfg.parallel.virtual_pipeline is not None:
            parts.append("parallel.virtual_pipeline=null")
        if self.zero_stage != cfg.zero.stage and not (self.zero_stage == 0 and cfg.zero.stage in (1, 2)):
            parts.append(f"zero.stage={self.zero_stage}")
        return " ".join(parts)


# ----------------------------------------------------------------------------------------------------------
# Memory of one layout


def _bytes(precision: str) -> dict:
    """Bytes per parameter (activations: per element); grad_accum = DeepSpeed's fp32 gradient accumulation."""
    if precision == "bf16":
        return {"weight": 2, "grad": 2, "grad_accum": 4, "optim_stage0": 12, "optim": 12, "act": 2}
    if precision == "fp64":
        return {"weight": 8, "grad": 8, "grad_accum": 0, "optim_stage0": 16, "optim": 12, "act": 8}
    return {"weight": 4, "grad": 4, "grad_accum": 0, "optim_stage0": 8, "optim": 12, "act": 4}


def _layer_activation(shape: ModelShape, s: int, b: int, tp: int, sp: bool, e: int) -> float:
    h, f = shape.hidden_size, shape.ffn_hidden_size
    slots = layer_slots(shape).values()
    extra = sum(c.extra_act_split for c in slots) / tp + sum(c.extra_act_replicated for c in slots)
    return (s * b * h * (4 * e + 2) / (tp if sp else 1) + s * b * (4 * e * h + 2 * e * f) / tp
            + _score_activation(shape, s, b, tp, e) + e * s * b * extra)


def _score_activation(shape: ModelShape, s: int, b: int, tp: int, e: int) -> float:
    """Softmax input/output and dropout mask of the attention scores: what selective recompute drops."""
    return shape.num_attention_heads * s * s * b * (2 * e + 1) / tp


def _memory(cfg: Config, shape: ModelShape, padded_vocab: int, lay: Layout, precision: str, bucket: int) -> dict:
    """Bytes per GPU of the worst stage, by component, without and with full activation recompute."""
    m, L = cfg.model, cfg.model.num_layers
    h, tp, pp, dp = shape.hidden_size, lay.tp, lay.pp, lay.dp
    s, b = m.seq_length, lay.micro_batch_size
    by = _bytes(precision)
    e, tp_sp = by["act"], (tp if lay.sequence_parallel else 1)
    slots = layer_slots(shape).values()
    layer_params = sum(c.params_split for c in slots) / tp + sum(c.params_replicated for c in slots) + 4 * h
    layer_sparse = sum(c.sparse_numel for c in slots) / tp
    positions = m.max_position_embeddings or m.seq_length
    emb = padded_vocab * h / tp
    Ls = L // pp
    act_layer = _layer_activation(shape, s, b, tp, lay.sequence_parallel, e)
    scores = _score_activation(shape, s, b, tp, e)
    recompute_layer = e * s * b * h / tp_sp
    inflight = min(pp, lay.micro_batches) if pp > 1 else 1
    if pp > 1 and lay.vp:
        inflight *= 1 + (pp - 1) / (pp * lay.vp)
    emb_act = s * b * h / tp_sp  # embedding dropout mask
    head_act = 2 * e * s * b * h / tp_sp + 4 * s * b * padded_vocab / tp  # final LN, head input, fp32 logits

    stages = {}
    first_params = Ls * layer_params + emb + positions * h
    last_params = Ls * layer_params + 2 * h + (emb if (pp > 1 or not m.tie_embeddings) else 0)
    if pp == 1:
        stages["only"] = (first_params + last_params - Ls * layer_params, 1, emb_act + head_act)
    else:
        stages["first"] = (first_params, inflight, emb_act * inflight)
        stages["last"] = (last_params, 1, head_act)
    out = {}
    for name, (params, n_inflight, edge_act) in stages.items():
        stage, sparse = lay.zero_stage, Ls * layer_sparse
        comp = {
            "weights": params * by["weight"] / (dp if stage == 3 else 1),
            "gradients": params * (by["grad"] + (by["grad_accum"] if pp == 1 or stage >= 2 else 0))
            / (dp if stage >= 2 else 1),
            "optimizer": params * (by["optim_stage0"] if stage == 0 else by["optim"] / dp),
            "masks": sparse * 1,
            "mask_float_cache": sparse * by["grad"],
            "dst_dense_grad": sparse * 4 if cfg.dst.algorithm in ("rigl", "set") and shape.family != "dense" else 0,
            "zero_buckets": min(bucket, params) * by["grad"] if stage >= 1 else 0,
        }
        static = sum(comp.values())
        act = Ls * n_inflight * act_layer + edge_act
        act_rc = Ls * n_inflight * recompute_layer + act_layer + edge_act
        n = m.recompute_num_layers
        act_cfg = {"none": act,
                   "full": -(-Ls // n) * n_inflight * recompute_layer + min(n, Ls) * act_layer + edge_act,
                   "selective": Ls * n_inflight * (act_layer - scores) + scores + edge_act}[m.recompute]
        out[name] = {"params": params, "components": {**comp, "activations": act}, "total": static + act,
                     "activations_recompute": act_rc, "total_recompute": static + act_rc,
                     "total_configured": static + act_cfg}
    worst = max(out, key=lambda k: out[k]["total"])
    worst_rc = max(out, key=lambda k: out[k]["total_recompute"])
    return {"worst_stage": worst, **out[worst], "total_recompute": out[worst_rc]["total_recompute"],
            "activations_recompute": out[worst_rc]["activations_recompute"],
            "total_configured": max(v["total_configured"] for v in out.values())}


def _layout_report(cfg: Config, lay: Layout, precision: str, usable: float, padded_vocab: int,
                   bucket: int) -> dict:
    c = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, tensor=lay.tp))
    shape = transformed_shape(c)  # keep_head_dim widths depend on TP
    mem = _memory(cfg, shape, padded_vocab, lay, precision, bucket)
    return {
        "tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "vp": lay.vp, "sequence_parallel": lay.sequence_parallel,
        "zero_stage": lay.zero_stage, "micro_batch_size": lay.micro_batch_size,
        "micro_batches_per_step": lay.micro_batches, "overrides": lay.overrides(cfg),
        "hidden_size": shape.hidden_size, "worst_stage": mem["worst_stage"],
        "params_per_gpu": round(mem["params"]),
        "memory_gb": {k: v / GB for k, v in mem["components"].items()},
        "total_gb": mem["total"] / GB,
        "activations_recompute_gb": mem["activations_recompute"] / GB,
        "total_recompute_gb": mem["total_recompute"] / GB,
        "recompute": cfg.model.recompute,
        "total_configured_gb": mem["total_configured"] / GB,
        "fits": mem["total"] <= usable,
        "fits_with_recompute": mem["total_recompute"] <= usable,
        "fits_configured": mem["total_configured"] <= usable,
    }


def _candidates(cfg: Config, gpus: int) -> list[tuple[int, int]]:
    """(TP, PP) with TP within a node, ordered: fewest model-parallel GPUs, then less pipelining."""
    tps = [t for t in (1, 2, 4, 8) if t <= GPUS_PER_NODE and gpus % t == 0]
    pps = [p for p in range(1, cfg.model.num_layers + 1) if cfg.model.num_layers % p == 0]
    pairs = [(t, p) for t in tps for p in pps if gpus % (t * p) == 0]
    return sorted(pairs, key=lambda tp_pp: (tp_pp[0] * tp_pp[1], tp_pp[1], tp_pp[0]))


def plan_report(cfg: Config, gpus: int, gpu_mem_gb: float = 80.0, precision: str | None = None,
                vocab_size: int | None = None, scale: dict | None = None) -> dict:
    """Plan for `gpus` GPUs of `gpu_mem_gb` GB (JSON-able). Raises a one-line SiftError when the config's own
    TP x PP does not divide `gpus` or when no layout fits. `scale`: assumptions of the scale model
    (ift/scale.py: fs_gbps, net_gbps, ...), applied to the suggested layout."""
    if gpus < 1:
        raise SiftError(f"--gpus must be >= 1, got {gpus}")
    if gpu_mem_gb <= 0:
        raise SiftError(f"--gpu-mem must be > 0, got {gpu_mem_gb}")
    p, t = cfg.parallel, cfg.train
    if gpus % (p.tensor * p.pipeline):
        raise SiftError(f"--gpus {gpus} is not divisible by parallel.tensor x parallel.pipeline = "
                        f"{p.tensor} x {p.pipeline} of the config")
    own = precision_of(cfg)  # also the DeepSpeed-settings checks sift train makes, whatever --precision says
    precision = precision or own
    if precision not in ("fp32", "bf16", "fp64"):
        raise SiftError(f"precision must be fp32, bf16 or fp64, got {precision!r}")
    rep = flop_report(cfg, vocab_size=vocab_size)
    padded = rep["padded_vocab_size"]
    usable = gpu_mem_gb * GB * (1 - RESERVE)
    bucket = _bucket_elements(cfg)
    sparse = cfg.sparsity.family != "dense"

    def make(tp: int, pp: int, vp: int | None, sp: bool, stage: int) -> Layout:
        dp = gpus // (tp * pp)
        return Layout(tp, pp, dp, vp, sp, effective_zero_stage(cfg, dp, stage=stage, pipeline=pp, precision=precision), t.micro_batch_size,
                      max(1, t.global_batch_size // (t.micro_batch_size * dp)))

    own_problems = layout_problems(cfg, p.tensor, p.pipeline, p.virtual_pipeline, p.sequence_parallel,
                                   cfg.zero.stage, gpus, precision)
    own = _layout_report(cfg, make(p.tensor, p.pipeline, p.virtual_pipeline, p.sequence_parallel, cfg.zero.stage),
                         precision, usable, padded, bucket)
    own["problems"] = own_problems

    tried, skipped = [], []
    for tp, pp in _candidates(cfg, gpus):
        stage = 1 if pp > 1 else (2 if sparse and cfg.zero.stage == 3 else cfg.zero.stage)
        sp = not layout_problems(cfg, tp, pp, None, True, stage, gpus, precision)  # wherever it runs
        problems = layout_problems(cfg, tp, pp, None, sp, stage, gpus, precision)
        if not problems:
            try:
                tried.append(_layout_report(cfg, make(tp, pp, None, sp, stage), precision, usable, padded, bucket))
            except SiftError as e:
                problems = [str(e)]
        if problems:
            skipped.append(f"TP={tp} PP={pp}: {problems[0]}")
    if not tried:
        reason = skipped[0].split(": ", 1)[1] if skipped else "no TP x PP divides the GPU count"
        raise SiftError(f"no valid TP x PP x DP layout of {gpus} GPUs for this config ({reason})")
    own_ok = not own_problems
    fits = [c for c in tried if c["fits_configured"]]  # with the config's model.recompute
    fits_rc = [c for c in tried if c["fits_with_recompute"]]
    notes = []
    if own_ok and own["fits_configured"]:
        suggested = own
    elif fits:
        suggested = fits[0]
    elif own_ok and own["fits_with_recompute"]:
        suggested = own
    elif fits_rc:
        suggested = fits_rc[0]
    else:
        best = min(tried, key=lambda c: c["total_recompute_gb"])
        raise SiftError(f"the model does not fit on {gpus} GPUs of {gpu_mem_gb:g} GB with any TP x PP layout "
                        f"(least: TP={best['tp']} PP={best['pp']} DP={best['dp']} needs "
                        f"{best['total_recompute_gb']:.1f} GB per GPU even with full recompute; usable "
                        f"{usable / GB:.1f} GB): use more GPUs, a smaller micro_batch_size or bf16")
    suggested = {**suggested, "is_config_layout": suggested is own}
    suggested["recompute_required"] = not suggested["fits"]
    rc = cfg.model.recompute
    if not suggested["fits_configured"]:  # only full recompute of every layer (N=1) makes it fit
        fix = "model.recompute_num_layers=1" if rc == "full" else "model.recompute=full"
        suggested.update(overrides=f"{suggested['overrides']} {fix}", recompute="full", fits_configured=True,
                         total_configured_gb=suggested["total_recompute_gb"])
        notes.append(f"fits only with full activation recompute of every layer: add {fix} (in the suggested "
                     "overrides), or lower train.micro_batch_size, or use more GPUs")
    elif suggested["recompute_required"]:
        notes.append(f"fits only with activation recompute: model.recompute={rc} as configured")
    elif rc != "none":
        notes.append("fits without activation recompute too: model.recompute=none would skip its extra forward")
    if precision == "fp32":
        notes.append("fp32 training (model.precision); set model.precision=bf16 (or --precision bf16) to plan bf16")
    tr = rep["params"]["transformed"]
    out = {
        "gpus": gpus,
        "gpu_mem_gb": gpu_mem_gb,
        "usable_gb": usable / GB,
        "reserve_fraction": RESERVE,
        "precision": precision,
        "model": {"family": cfg.sparsity.family, "s": cfg.sparsity.s, "num_layers": cfg.model.num_layers,
                  "seq_length": cfg.model.seq_length, "vocab_size": rep["vocab_size"],
                  "vocab_source": rep["vocab_source"], "padded_vocab_size": padded, "shape": rep["shape"]},
        "params": {"baseline": {k: rep["params"]["baseline"][k] for k in ("stored", "active")},
                   "transformed": {k: tr[k] for k in ("stored", "active", "sparse_elements")}},
        "flops_per_token": {"baseline": rep["baseline"]["total"], "transformed": rep["transformed"]["total"],
                            "ratio_total": rep["ratio"]["total"],
                            "ratio_transformed_layers": rep["ratio"]["transformed_layers"],
                            "training": rep["transformed"]["training"]["per_token"]},
        "config_layout": own,
        "suggested": suggested,
        "skipped_layouts": skipped,
        "notes": notes,
    }
    from sift_megatron.ift.scale import scale_report

    out["scale"] = scale_report(cfg, out, suggested, **(scale or {}))
    return out


# ----------------------------------------------------------------------------------------------------------
# Table


def _count(x: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


_ROWS = [("weights", "weights"), ("gradients", "gradients"), ("optimizer", "optimizer state"),
         ("masks", "masks (1 B/sparse element)"), ("mask_float_cache", "mask float cache"),
         ("dst_dense_grad", "DST dense gradient"), ("zero_buckets", "ZeRO reduce bucket"),
         ("activations", "activations")]


def format_plan(rep: dict, name: str = "") -> str:
    m, sh = rep["model"], rep["model"]["shape"]
    b, t = sh["baseline"], sh["transformed"]
    pb, pt, f = rep["params"]["baseline"], rep["params"]["transformed"], rep["flops_per_token"]
    own, sug = rep["config_layout"], rep["suggested"]
    lines = [
        f"sift plan {name}: {rep['gpus']} GPUs x {rep['gpu_mem_gb']:g} GB (usable {rep['usable_gb']:.1f} GB after "
        f"a {rep['reserve_fraction']:.0%} reserve), {rep['precision']} training",
        f"model: {m['family']} s={m['s']:g}, {m['num_layers']} layers, hidden {b['hidden_size']} -> "
        f"{t['hidden_size']}, heads {t['num_attention_heads']} x {t['head_dim']}, ffn {t['ffn_hidden_size']}, "
        f"seq {m['seq_length']}, vocab {m['vocab_size']} (padded {m['padded_vocab_size']}; {m['vocab_source']})",
        f"parameters: baseline {_count(pb['stored'])}; transformed stored {_count(pt['stored'])}, "
        f"active {_count(pt['active'])}, under masks {_count(pt['sparse_elements'])}",
        f"forward FLOPs/token: baseline {_count(f['baseline'])}, transformed {_count(f['transformed'])} "
        f"(whole model x{f['ratio_total']:.3f}, transformed layers x{f['ratio_transformed_layers']:.3f})",
        "",
    ]

    def head(c: dict) -> str:
        return f"TP={c['tp']} PP={c['pp']} DP={c['dp']} ZeRO-{c['zero_stage']}"

    same = sug["is_config_layout"]
    cols = [("config", own)] + ([] if same else [("suggested", sug)])
    unit, scale = ("GB", 1.0) if max(c["total_gb"] for _, c in cols) >= 1 else ("MB", 1024.0)
    lines.append(f"{f'memory per GPU ({unit})':<30}" + "".join(f"{label + ': ' + head(c):>34}" for label, c in cols))
    lines.append(f"{'  micro-batch x per step':<30}" + "".join(
        f"{str(c['micro_batch_size']) + ' x ' + str(c['micro_batches_per_step']):>34}" for _, c in cols))
    for key, label in _ROWS:
        lines.append(f"{'  ' + label:<30}" + "".join(f"{c['memory_gb'][key] * scale:>34.2f}" for _, c in cols))
    lines.append(f"{'  total':<30}" + "".join(f"{c['total_gb'] * scale:>34.2f}" for _, c in cols))
    lines.append(f"{'  total with full recompute':<30}" + "".join(f"{c['total_recompute_gb'] * scale:>34.2f}"
                                                                    for _, c in cols))
    if own["recompute"] != "none":
        label = f"  total, recompute={own['recompute']}"
        lines.append(f"{label:<30}" + "".join(f"{c['total_configured_gb'] * scale:>34.2f}" for _, c in cols))
    lines.append(f"{'  fits':<30}" + "".join(
        f"{'yes' if c['fits'] else ('with recompute' if c['fits_with_recompute'] else 'no'):>34}" for _, c in cols))
    lines.append("")
    if own["problems"]:
        lines.append("config layout problems: " + "; ".join(own["problems"]))
    if same:
        lines.append(f"suggested: the config's layout ({head(sug)}, {sug['overrides']})")
    else:
        lines.append(f"suggested: {head(sug)}: {sug['overrides']}")
    lines.extend(f"note: {n}" for n in rep["notes"])
    from sift_megatron.ift.scale import format_scale

    lines.append("")
    lines.append(f"scale (suggested layout, {head(sug)}):")
    lines.extend("  " + x for x in format_scale(rep["scale"]))
    return "\n".join(lines)
