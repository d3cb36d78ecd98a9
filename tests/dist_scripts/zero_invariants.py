"""Run under torchrun (2 ranks, DP=2): under ZeRO-1 and ZeRO-2 with RigL, check after every step that masked
positions are exactly 0 in the module weights, ZeRO's fp32 master and both Adam moments; that grown positions
start with zero moments; that a non-finite dense gradient skips the update without touching the masks.
Prints one JSON line per stage on rank 0."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sift_megatron.config import load_config
from sift_megatron.training import data as D
from sift_megatron.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


def full_state(p):
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    return (safe_get_full_fp32_param(p), safe_get_full_optimizer_state(p, "exp_avg"),
            safe_get_full_optimizer_state(p, "exp_avg_sq"))


def amax(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def main() -> None:
    out = Path(sys.argv[1])
    for stage in (1, 2):
        cfg = load_config(REPO / "configs" / "tiny" / "dense.yaml", [
            f"zero.stage={stage}", "sparsity.family=wide", "sparsity.s=0.5", "dst.algorithm=rigl", "dst.interval=5",
            "dst.end=100", "train.steps=20", "logging.progress=false", f"train.out_dir={out / f'z{stage}'}"])
        tr = Trainer(cfg)
        it = D.micro_batches(tr.datasets.train, cfg, tr.dp_rank, tr.dp_size, 0, tr.plat.device)
        mods = tr.dst.mods
        worst = 0.0
        grown_moment = 0.0
        updates = skipped = 0
        for step in range(1, cfg.train.steps + 1):
            tr.dst.before_step(step)
            tr.train_step(it)
            old = [m.mask.clone() for _, m in mods]
            if step == 15:  # poison one dense gradient: the update must be skipped everywhere
                mods[0][1].dense_grad[0, 0] = float("nan") if dist.get_rank() == 0 else 0.0
            rec = tr.dst.after_step(step) or {}
            if rec.get("dst/skipped"):
                skipped += 1
                assert all(torch.equal(o, m.mask) for o, (_, m) in zip(old, mods)), "skip changed a mask"
            elif rec:
                updates += 1
            for o, (_, m) in zip(old, mods):
                master, m1, m2 = full_state(m.weight)
                off = ~m.mask
                worst = max(worst, amax(m.weight.detach()[off]), amax(master[off]), amax(m1[off]), amax(m2[off]))
                grown = m.mask & ~o
                grown_moment = max(grown_moment, amax(m1[grown]), amax(m2[grown]))
        nnz_ok = all(int(m.mask.sum()) == int(o.sum()) for o, (_, m) in zip(tr.dst.initial, mods))
        if dist.get_rank() == 0:
            print(json.dumps({"stage": stage, "max_masked_abs": worst, "max_grown_moment": grown_moment,
                              "updates": updates, "skipped": skipped, "nnz_constant": nnz_ok}), flush=True)
        tr.close(destroy_process_group=False)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
