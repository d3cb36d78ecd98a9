"""One process on one GPU: every Sparse-IFT family, static and RigL, trains 10 steps in bf16 (DeepSpeed ZeRO-1
with its fp32 master in BF16_Optimizer) and after every step the masked positions are exactly 0 in the bf16
weights, the fp32 master and both Adam moments; masks live on the GPU and keep their exact count.
Prints one JSON line per run. Usage: family_check.py OUT_DIR [FAMILY:ALGORITHM ...]"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from sift_megatron.config import load_config
from sift_megatron.sparse.layers import sparse_modules
from sift_megatron.training import data as D
from sift_megatron.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
RUNS = [f"{fam}:{alg}" for fam in ("wide", "parallel", "factorized", "doped") for alg in ("static", "rigl")]


def amax(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def main() -> None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = Path(sys.argv[1])
    for run in sys.argv[2:] or RUNS:
        fam, alg = run.split(":")
        cfg = load_config(REPO / "configs" / "tiny" / "dense.yaml", [
            "model.precision=bf16", "zero.stage=1", "zero.stage0_when_single_replica=false",
            f"sparsity.family={fam}", "sparsity.s=0.5", f"dst.algorithm={alg}", "dst.interval=3", "dst.end=100",
            "train.steps=10", "logging.progress=false", f"train.out_dir={out / f'{fam}_{alg}'}"])
        tr = Trainer(cfg)
        it = D.micro_batches(tr.datasets.train, cfg, tr.dp_rank, tr.dp_size, 0, tr.plat.device)
        mods = [nm for chunk in tr.chunks for nm in sparse_modules(chunk)]
        nnz0 = [int(m.mask.sum()) for _, m in mods]
        worst, losses, updates, moved = 0.0, [], 0, 0
        first = [m.mask.clone() for _, m in mods]
        for step in range(1, cfg.train.steps + 1):
            if tr.dst:
                tr.dst.before_step(step)
            losses.append(tr.train_step(it)["loss"])
            if tr.dst and tr.dst.after_step(step):
                updates += 1
            for _, m in mods:
                off = ~m.mask
                master = safe_get_full_fp32_param(m.weight)
                m1 = safe_get_full_optimizer_state(m.weight, "exp_avg")
                m2 = safe_get_full_optimizer_state(m.weight, "exp_avg_sq")
                worst = max(worst, amax(m.weight.detach()[off]), amax(master[off]), amax(m1[off]), amax(m2[off]))
        moved = sum(int((f != m.mask).sum()) for f, (_, m) in zip(first, mods))
        print(json.dumps({
            "family": fam, "algorithm": alg, "device": str(mods[0][1].mask.device),
            "weight_dtype": str(mods[0][1].weight.dtype), "optimizer": type(tr.optimizer).__name__,
            "losses": losses, "max_masked_abs": worst, "updates": updates, "moved": moved,
            "nnz_constant": [int(m.mask.sum()) for _, m in mods] == nnz0, "sparse_modules": len(mods)}), flush=True)
        tr.close(destroy_process_group=False)


if __name__ == "__main__":
    main()
