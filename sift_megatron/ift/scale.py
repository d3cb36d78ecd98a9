"""Scale model of `sift plan`: checkpoint bytes and save time, and the communication of one RigL update.

Why: at GPT-3 scale what breaks a run is not the per-GPU memory alone but a save that is slow or that gathers
the model into one process, or a mask update whose collectives eat the step time; this says so before a job is
queued. Pure arithmetic on a `sift plan` layout (no torch). Estimates:

* The sharded checkpoint (training/checkpoint.py, torch.distributed.checkpoint): every (TP, PP) rank's shard of
  the weights (model dtype) and masks (1 B), its Adam moments (fp32: 8 B, fp64: 16 B per parameter) and, for
  bf16, its fp32 master weights (4 B): (module + optimizer) x TP x PP in total, nothing gathered. Within a DP
  group the replicated boxes are written once, spread over the replicas, and ZeRO splits the optimizer state:
  about (module + optimizer) / DP bytes per rank. Within 25 % of the files the tiny runs write
  (tests/test_scale.py).
* Save time at --fs-gbps of aggregate write bandwidth, each rank at most --client-gbps: max(total / fs,
  per rank / client). Load: each rank reads its boxes (the whole module shard on every DP replica, its part of
  the optimizer state), at any layout; a resharded load can read more where saved and wanted boxes overlap
  partly (DCP reads a saved box whole and keeps the overlap), which the estimate leaves out.
* The end-of-run mask export (spectral.export_masks): global rank 0 writes masks + sparse weights (5 B per
  sparse element) to one file, streamed one logical tensor at a time (sparse/export.py), so it holds one
  tensor, not the model; listed for the single writer's time. The GPT-3 configs turn it off.
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
    tp, pp, dp = layout["tp"], layout["pp"], layout["dp"]
    gpus = tp * pp * dp
    sparse_total = plan["params"]["transformed"]["sparse_elements"]
    params_gpu = layout["params_per_gpu"]
    sparse_gpu = layout["memory_gb"]["masks"] * GB  # 1 B per sparse element of the worst stage
    weight_b = {"fp32": 4, "bf16": 2, "fp64": 8}[prec]

    module = params_gpu * weight_b + sparse_gpu  # a (TP, PP) rank's weights + masks, replicated over DP
    optim = params_gpu * {"fp32": 8, "bf16": 12, "fp64": 16}[prec]  # moments (+ bf16's fp32 master)
    total = (module + optim) * tp * pp
    per_rank = (module + optim) / dp
    read_rank = module + optim / dp
    fs, client = fs_gbps * GB, min(client_gbps, fs_gbps) * GB
    load_s = max(read_rank * gpus / fs, read_rank / client)
    export = sparse_total * 5 if cfg.spectral.export_masks and sparse_total else 0

    out = {
        "assumptions": {"fs_gbps": fs_gbps, "client_gbps": client_gbps, "net_gbps": net_gbps, "tp_gbps": tp_gbps,
                        "latency_us": latency_us, "tflops_per_gpu": tflops},
        "checkpoint": {
            "format": "sharded (torch.distributed.checkpoint, one file per rank)",
            "bytes_total": total,
            "bytes_per_rank": per_rank,
            "bytes_module_per_mp_rank": module,
            "bytes_optimizer_per_mp_rank": optim,
            "save_s": max(total / fs, per_rank / client),
            "load_s_same_layout": load_s,
            "load_s_resharded": load_s,
            "end_of_run_mask_export_bytes_rank0": export,
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
        f"checkpoint (sharded, one file per rank): {c['bytes_total'] / GB:,.1f} GB in total, "
        f"{c['bytes_per_rank'] / GB:,.2f} GB per rank (nothing gathered)",
        f"save time at {a['fs_gbps']:g} GB/s aggregate ({a['client_gbps']:g} GB/s per process): "
        f"{c['save_s']:,.0f} s; load {c['load_s_same_layout']:,.0f} s (any layout)"
        + (f"; end-of-run mask export: rank 0 writes {c['end_of_run_mask_export_bytes_rank0'] / GB:,.1f} GB, one "
           "tensor at a time (spectral.export_masks)" if c["end_of_run_mask_export_bytes_rank0"] else ""),
        f"step time at {a['tflops_per_gpu']:g} TFLOP/s per GPU: {rep['step_s']:.3g} s",
    ]
    r = rep["rigl_update"]
    if r:
        lines.append(f"RigL update every {r['interval']} steps: {r['bytes_sent_per_gpu'] / GB:.3g} GB sent per GPU "
                     f"in {r['collectives']} collectives, {r['time_s']:.3g} s ({r['share_of_training']:.2%} of "
                     f"training time)")
    return lines
