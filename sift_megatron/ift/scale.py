"""Scale model of `sift plan`: checkpoint bytes and save time, and the communication of one RigL update.

Why: at GPT-3 scale what breaks a run is not the per-GPU memory alone but a save that gathers the model into
one process, or a mask update whose collectives eat the step time; this says so before a job is queued.
Pure arithmetic on a `sift plan` layout (no torch). Estimates, for the checkpoint format that
training/checkpoint.py writes today:

* DeepSpeed's files: on DP rank 0 of every (TP, PP) rank the module (weights in the model dtype + the 1-byte
  masks); on every rank its optimizer partition (ZeRO >= 1: fp32 master + Adam moments, 12 B / DP per
  parameter; ZeRO-0: the moments (fp32: 8 B, fp64: 16 B) and, for bf16, the fp32 master, in the module file).
* The layout-independent copy written by global rank 0 alone, after gathering it over all ranks into its host
  memory: model.safetensors (every stored parameter in fp32 + 1 B per mask element), optimizer.safetensors
  (Adam moments in the optimizer's dtype, + fp32 master for bf16) and sparse_masks.safetensors (masks +
  sparse weights, for analysis). Within 4 % of the files the tiny runs write (tests/test_scale.py).
* Save time at --fs-gbps of aggregate write bandwidth: the sharded part in parallel, then rank 0's gathered
  files through one process (at most --client-gbps): the save is serial in that order. Load time at the same
  bandwidths: the same layout reads DeepSpeed's files; another layout reads each rank's slice of the
  model + optimizer files (once per DP replica).
* A RigL update, per GPU of the worst stage: the dense gradient of its sparse elements all-reduced over DP
  (fp32; bf16 also all-reduces the fp32 master weights for the drop criterion), ring volume 2 (DP-1)/DP x bytes
  at --net-gbps; the exact top-k of drop and of grow over the TP group, each ~3 radix rounds of one all-reduce
  of a [tensors, 2^12 / 2^10] int64 histogram (sparse/topk.py), at --tp-gbps; plus --latency-us per collective.
  Its share of training time: update time / (dst.interval x step time + update time), the step time from the
  training FLOPs at --tflops achieved per GPU.
"""

from __future__ import annotations

from sift_megatron.config import Config

GB = 2**30
TOPK_ROUNDS = 3  # radix rounds per top-k call, typical (sparse/topk.py: "usually 2 or 3")
TOPK_BINS = (1 << 12, 1 << 10, 1 << 10)  # histogram bins of the rounds (int64 counts)


def _tensors_per_layer(family: str, branches: int) -> int:
    """Sparse tensors of one layer (four transformed linears)."""
    return 4 * {"dense": 0, "wide": 1, "parallel": branches, "factorized": 2, "doped": 1}[family]


def scale_report(cfg: Config, plan: dict, layout: dict, *, fs_gbps: float = 5.0, client_gbps: float = 2.0,
                 net_gbps: float = 25.0, tp_gbps: float = 150.0, latency_us: float = 20.0,
                 tflops: float = 150.0) -> dict:
    """Checkpoint and RigL-update costs of `layout` (an entry of plan_report: config_layout or suggested)."""
    prec = plan["precision"]
    tp, pp, dp, stage = layout["tp"], layout["pp"], layout["dp"], layout["zero_stage"]
    gpus = tp * pp * dp
    stored = plan["params"]["transformed"]["stored"]
    sparse_total = plan["params"]["transformed"]["sparse_elements"]
    params_gpu = layout["params_per_gpu"]
    sparse_gpu = layout["memory_gb"]["masks"] * GB  # 1 B per sparse element of the worst stage
    weight_b = {"fp32": 4, "bf16": 2, "fp64": 8}[prec]

    module = params_gpu * weight_b + sparse_gpu  # DP rank 0 of each model-parallel rank
    if stage >= 1:
        optim = params_gpu * 12 / dp
    else:
        optim = params_gpu * ({"fp32": 8, "bf16": 12, "fp64": 16}[prec])
    sharded_rank0 = module + optim
    sharded_total = module * tp * pp + optim * (gpus if stage >= 1 else tp * pp)
    gathered = {
        "model.safetensors": stored * 4 + sparse_total,
        "optimizer.safetensors": stored * {"fp32": 8, "bf16": 12, "fp64": 16}[prec],  # moments (+ bf16 master)
        "sparse_masks.safetensors": sparse_total * 5,
    }
    gathered_total = sum(gathered.values())
    fs, client = fs_gbps * GB, min(client_gbps, fs_gbps) * GB
    save_sharded_s = max(sharded_total / fs, sharded_rank0 / client)
    save_gathered_s = gathered_total / client
    # another layout reads its TP x PP slice of model + optimizer.safetensors on every rank, once per DP replica
    reshard_read = gathered["model.safetensors"] + gathered["optimizer.safetensors"]

    out = {
        "assumptions": {"fs_gbps": fs_gbps, "client_gbps": client_gbps, "net_gbps": net_gbps, "tp_gbps": tp_gbps,
                        "latency_us": latency_us, "tflops_per_gpu": tflops},
        "checkpoint": {
            "bytes_total": sharded_total + gathered_total,
            "bytes_sharded_total": sharded_total,
            "bytes_gathered_rank0": gathered_total,
            "bytes_per_rank_max": sharded_rank0 + gathered_total,  # global rank 0
            "bytes_per_rank_other": optim,  # a rank with DP rank > 0: its optimizer partition only
            "bytes_module_per_mp_rank": module,  # written by DP rank 0 of each (TP, PP) rank in addition
            "gathered_files": gathered,
            "rank0_host_gb_during_save": gathered_total / GB,
            "save_s": save_sharded_s + save_gathered_s,
            "save_s_sharded_part": save_sharded_s,
            "save_s_gathered_part": save_gathered_s,
            "load_s_same_layout": max(sharded_total / fs, sharded_rank0 / client),
            "load_s_resharded": max(reshard_read * dp / fs, reshard_read / (tp * pp) / client),
        },
    }
    t = cfg.train
    train_flops = plan["flops_per_token"]["training"]
    step_s = train_flops * t.global_batch_size * cfg.model.seq_length / (gpus * tflops * 1e12)
    out["step_s"] = step_s
    if cfg.dst.algorithm != "rigl" or cfg.sparsity.family == "dense":
        out["rigl_update"] = None
        return out
    shape = plan["model"]["shape"]["transformed"]
    tensors = _tensors_per_layer(cfg.sparsity.family, shape.get("branches", 1)) * cfg.model.num_layers // pp
    ring = 2 * (dp - 1) / dp if dp > 1 else 0.0
    dp_bytes = 4 * sparse_gpu * (2 if prec == "bf16" else 1)  # dense grads (+ fp32 master for bf16)
    hist = 2 * tensors * sum(TOPK_BINS[:TOPK_ROUNDS]) * 8  # drop + grow selections
    tp_ring = 2 * (tp - 1) / tp if tp > 1 else 0.0
    collectives = (2 if prec == "bf16" else 1) * (dp > 1) + 2 * TOPK_ROUNDS * (tp > 1) + 2
    time_s = dp_bytes * ring / (net_gbps * GB) + hist * tp_ring / (tp_gbps * GB) + collectives * latency_us * 1e-6
    interval = cfg.dst.interval
    out["rigl_update"] = {
        "interval": interval,
        "dp_allreduce_bytes": dp_bytes,
        "tp_topk_bytes": hist if tp > 1 else 0,
        "bytes_sent_per_gpu": dp_bytes * ring + (hist * tp_ring if tp > 1 else 0),
        "collectives": collectives,
        "time_s": time_s,
        "share_of_training": time_s / (interval * step_s + time_s),
    }
    return out


def format_scale(rep: dict) -> list[str]:
    c, a = rep["checkpoint"], rep["assumptions"]
    lines = [
        f"checkpoint (today's format): {c['bytes_total'] / GB:,.1f} GB in total, of which rank 0 gathers and "
        f"writes {c['bytes_gathered_rank0'] / GB:,.1f} GB alone; per rank: rank 0 {c['bytes_per_rank_max'] / GB:,.1f}"
        f" GB, others {c['bytes_per_rank_other'] / GB:,.2f} GB (+ {c['bytes_module_per_mp_rank'] / GB:,.2f} GB of "
        f"module on DP rank 0)",
        f"save time at {a['fs_gbps']:g} GB/s aggregate ({a['client_gbps']:g} GB/s per process): "
        f"{c['save_s']:,.0f} s ({c['save_s_sharded_part']:,.0f} s sharded + {c['save_s_gathered_part']:,.0f} s "
        f"rank 0's gathered copy); load {c['load_s_same_layout']:,.0f} s (same layout) / "
        f"{c['load_s_resharded']:,.0f} s (resharded)",
        f"step time at {a['tflops_per_gpu']:g} TFLOP/s per GPU: {rep['step_s']:.3g} s",
    ]
    r = rep["rigl_update"]
    if r:
        lines.append(f"RigL update every {r['interval']} steps: {r['bytes_sent_per_gpu'] / GB:.3g} GB sent per GPU "
                     f"in {r['collectives']} collectives, {r['time_s']:.3g} s ({r['share_of_training']:.2%} of "
                     f"training time)")
    return lines
