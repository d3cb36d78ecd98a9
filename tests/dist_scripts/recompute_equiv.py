"""Run under torchrun (2 ranks): train the tiny Sparse Wide RigL model with model.recompute none / selective /
full in one process per rank, at each requested layout, and check on every rank that the recompute runs
reproduce the none run bit for bit: losses, grad norms, final weights and masks (RigL updates at steps 2
and 4), and the dense gradients RigL captured. Also counts the sparse layers' gradient-hook calls: exactly
one per micro-batch per sparse weight, with or without recompute. Rank 0 prints one JSON line per (rank, group).

usage: recompute_equiv.py OUT_DIR GROUP [GROUP ...]   GROUP = a key of GROUPS
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.random import CheckpointFunction

from sift_megatron.config import load_config
from sift_megatron.dst.updater import DSTUpdater
from sift_megatron.sparse.layers import _SparseWeightMixin
from sift_megatron.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
BASE = ["sparsity.family=wide", "sparsity.s=0.75", "dst.algorithm=rigl", "dst.interval=2", "dst.end=100",
        "train.steps=5", "train.save=false", "logging.progress=false", "logging.tensorboard=false"]
TP2 = ["parallel.tensor=2"]
GROUPS = {  # name -> (layout overrides, recompute variants; the first, none, is the reference)
    "tp2": (TP2, ["none", "selective", "full", "full2"]),
    "tp2_sp": (TP2 + ["parallel.sequence_parallel=true"], ["none", "full"]),
    "pp2": (["parallel.pipeline=2"], ["none", "selective", "full"]),
    "tp2_dropout": (TP2 + ["model.hidden_dropout=0.1", "model.attention_dropout=0.1"], ["none", "selective", "full"]),
    "tp2_factorized": (TP2 + ["sparsity.family=factorized", "sparsity.s=0.5"], ["none", "full"]),
    "dp2_zero2": (["zero.stage=2"], ["none", "full"]),
}
VARIANTS = {"none": ["model.recompute=none"], "selective": ["model.recompute=selective"],
            "full": ["model.recompute=full"], "full2": ["model.recompute=full", "model.recompute_num_layers=2"]}

# Instrumentation (installed before any Trainer registers its hooks, which bind the class attribute).
HOOK_CALLS: Counter = Counter()
CHECKPOINT: Counter = Counter()  # megatron checkpoint regions run forward / recomputed in backward
DENSE: list = []
_mask_grad, _after_step = _SparseWeightMixin._mask_grad, DSTUpdater.after_step
_ckpt_fwd, _ckpt_bwd = CheckpointFunction.forward, CheckpointFunction.backward


def _counting_mask_grad(self, grad):
    HOOK_CALLS[id(self)] += 1
    return _mask_grad(self, grad)


def _recording_after_step(self, step):
    if self.active and self.schedule.is_update_step(step):
        DENSE.append([m.dense_grad.clone() for _, m in self.mods])
    return _after_step(self, step)


def _counting_ckpt_fwd(ctx, *args):
    CHECKPOINT["forward"] += 1
    return _ckpt_fwd(ctx, *args)


def _counting_ckpt_bwd(ctx, *args):
    CHECKPOINT["backward"] += 1
    return _ckpt_bwd(ctx, *args)


_SparseWeightMixin._mask_grad = _counting_mask_grad
CheckpointFunction.forward = staticmethod(_counting_ckpt_fwd)
CheckpointFunction.backward = staticmethod(_counting_ckpt_bwd)
DSTUpdater.after_step = _recording_after_step


def run(out: Path, overrides: list[str]) -> dict:
    cfg = load_config(REPO / "configs" / "tiny" / "dense.yaml", [*BASE, *overrides, f"train.out_dir={out}"])
    DENSE.clear()
    CHECKPOINT.clear()
    tr = Trainer(cfg)
    counts = []
    train_step = tr.train_step

    def counted_step(it):
        HOOK_CALLS.clear()
        rec = train_step(it)
        counts.append(sorted(set(HOOK_CALLS.values())) + [len(HOOK_CALLS)])
        return rec

    tr.train_step = counted_step
    hist = tr.fit()
    res = {"losses": [r["loss"] for r in hist if "loss" in r],
           "norms": [r["grad_norm"] for r in hist if "loss" in r],
           "updates": tr.dst.state.updates, "accum": tr.accum, "sparse_modules": len(tr.dst.mods), "hooks": counts,
           "weights": [p.detach().clone() for c in tr.chunks for p in c.parameters()],
           "masks": [m.mask.clone() for _, m in tr.dst.mods], "dense": [list(d) for d in DENSE],
           "masks_moved": not same([m.mask for _, m in tr.dst.mods], tr.dst.initial),
           "recompute": tr.chunks[0].config.recompute_granularity,
           "checkpoint": [CHECKPOINT["forward"], CHECKPOINT["backward"]]}
    tr.close(destroy_process_group=False)
    return res


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def main() -> None:
    out = Path(sys.argv[1])
    for group in sys.argv[2:]:
        layout, variants = GROUPS[group]
        runs = {v: run(out / group / v, layout + VARIANTS[v]) for v in variants}
        ref = runs["none"]
        line = {"rank": dist.get_rank(), "group": group, "accum": ref["accum"], "updates": ref["updates"],
                "sparse_modules": ref["sparse_modules"], "variants": {}}
        for v, r in runs.items():
            line["variants"][v] = {
                **{k: r[k] for k in ("losses", "norms", "hooks", "updates", "checkpoint", "masks_moved")},
                "granularity": r["recompute"], "weights_equal": same(r["weights"], ref["weights"]),
                "masks_equal": same(r["masks"], ref["masks"]), "dense_captures": len(r["dense"]),
                "dense_equal": len(r["dense"]) == len(ref["dense"]) and all(
                    same(a, b) for a, b in zip(r["dense"], ref["dense"]))}
        lines = [None] * dist.get_world_size()
        dist.all_gather_object(lines, line)  # one writer: concurrent ranks' lines interleave in torchrun's stdout
        if dist.get_rank() == 0:
            print("\n".join(json.dumps(x) for x in lines), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
