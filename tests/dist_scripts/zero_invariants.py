"""Run under torchrun (2 ranks, DP=2): under ZeRO-1 and ZeRO-2 with RigL, in fp32 and bf16 (bf16 module, fp32
master in DeepSpeed's BF16_Optimizer at ZeRO-1 / the ZeRO-2 optimizer), check after every step that masked
positions are exactly 0 in the module weights, the fp32 master and both Adam moments; that grown positions
start with zero moments; that a non-finite dense gradient skips the update without touching the masks.
Prints one JSON line per (precision, stage) on rank 0, with the losses.

Usage: zero_invariants.py OUT_DIR [PRECISION:STAGE[:PATTERN] ...] (default: fp32:1 fp32:2 bf16:1 bf16:2; PATTERN
block<B> = sparsity.pattern=block, sparsity.block=B at s=0.75, or N:M at s=1-N/M, with whole tiles / exactly N of
every M checked after every step). Also runs as one plain process (DP=1), where bf16 keeps ZeRO-1 (its fp32 master
lives in BF16_Optimizer)."""

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


def structure_ok(mask: torch.Tensor, pattern: str, block: int) -> bool:
    """The local mask shard is made of whole block x block tiles / keeps exactly N of every M columns."""
    if pattern == "block":
        R, C = mask.shape
        tiles = mask.reshape(R // block, block, C // block, block).permute(0, 2, 1, 3).reshape(R // block, C // block, -1)
        return torch.equal(tiles.any(-1), tiles.all(-1))
    if ":" in pattern:
        n, m = (int(x) for x in pattern.split(":"))
        return bool((mask.reshape(-1, m).sum(1) == n).all())
    return True


def main() -> None:
    out = Path(sys.argv[1])
    runs = [(a.split(":", 2) + ["unstructured"])[:3] for a in sys.argv[2:]]
    for precision, stage, pattern in runs or [(p, s, "unstructured") for p in ("fp32", "bf16") for s in (1, 2)]:
        stage = int(stage)
        sparsity, suffix = ["sparsity.s=0.5"], "" if pattern == "unstructured" else "_" + pattern.replace(":", "of")
        if pattern.startswith("block"):
            sparsity = ["sparsity.s=0.75", "sparsity.pattern=block", f"sparsity.block={int(pattern[5:])}"]
        elif pattern != "unstructured":
            n, m = (int(x) for x in pattern.split(":"))
            sparsity = [f"sparsity.s={1 - n / m}", f"sparsity.pattern={pattern}"]
        cfg = load_config(REPO / "configs" / "tiny" / "dense.yaml", [
            f"model.precision={precision}", f"zero.stage={stage}", "sparsity.family=wide", *sparsity,
            "dst.algorithm=rigl", "dst.interval=5", "dst.end=100", "train.steps=20", "logging.progress=false",
            f"train.out_dir={out / (f'{precision}z{stage}' + suffix)}"])
        tr = Trainer(cfg)
        it = D.micro_batches(tr.datasets.train, cfg, tr.dp_rank, tr.dp_size, 0, tr.plat.device)
        mods = tr.dst.mods
        worst = 0.0
        grown_moment = 0.0
        updates = skipped = 0
        structured = True
        losses = []
        for step in range(1, cfg.train.steps + 1):
            tr.dst.before_step(step)
            losses.append(tr.train_step(it)["loss"])
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
                structured &= structure_ok(m.mask, cfg.sparsity.pattern, cfg.sparsity.block)
        # the master is a real fp32 copy: under bf16 it holds values the bf16 module weight cannot
        master = full_state(mods[0][1].weight)[0]
        finer = bool((master.to(torch.bfloat16).float() != master).any())
        nnz_ok = all(int(m.mask.sum()) == int(o.sum()) for o, (_, m) in zip(tr.dst.initial, mods))
        if dist.get_rank() == 0:
            print(json.dumps({"precision": precision, "stage": stage, "pattern": pattern, "structured": structured,
                              "optimizer": type(tr.optimizer).__name__,
                              "weight_dtype": str(mods[0][1].weight.dtype), "master_finer_than_bf16": finer,
                              "losses": losses, "max_masked_abs": worst, "max_grown_moment": grown_moment,
                              "updates": updates, "skipped": skipped, "nnz_constant": nnz_ok}), flush=True)
        tr.close(destroy_process_group=False)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
