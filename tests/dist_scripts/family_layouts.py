"""Run under torchrun: for each Sparse-IFT family (and a RigL run) and each requested layout, train a few steps
with the real Trainer and dump the losses and the gathered logical masks, so the test can compare layouts.

usage: family_layouts.py OUT_DIR LAYOUT [LAYOUT ...]   (LAYOUT = tp<T>pp<P>, T x P must divide the world)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sift_megatron.config import load_config
from sift_megatron.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
FAMILIES = {"dense": 0.0, "wide": 0.75, "parallel": 0.5, "factorized": 0.5, "doped": 0.5}
# Extra runs: name -> overrides. wide_rigl: 2 RigL updates (steps 2 and 4), for the per-Q/K/V budgets after
# updates (fp32: layouts may flip near-tie entries, see dst/updater.py; test_dst compares masks in fp64).
# wide_block_rigl / parallel_nm_rigl: structured masks (16 x 16 tiles; 2:4) with 2 RigL updates; their init masks
# also go to init_masks.safetensors.
RIGL = ["dst.algorithm=rigl", "dst.interval=2", "dst.end=100"]
EXTRA = {"wide_rigl": ["sparsity.family=wide", "sparsity.s=0.75", *RIGL],
         "wide_block_rigl": ["sparsity.family=wide", "sparsity.s=0.75", "sparsity.pattern=block", "sparsity.block=16",
                             *RIGL],
         "parallel_nm_rigl": ["sparsity.family=parallel", "sparsity.s=0.5", "sparsity.pattern=2:4", *RIGL]}
# wide_block_kernel: wide_block_rigl computed by sparsity.kernel=block (with sequence parallelism at TP=2 x PP=1);
# the test wants the masked run's losses and masks at the same layout.
KERNEL = {"tp1pp1": [], "tp2pp1": ["parallel.sequence_parallel=true"], "tp2pp2": []}


def main() -> None:
    out = Path(sys.argv[1])
    for layout in sys.argv[2:]:
        tp, pp = (int(x) for x in layout[2:].split("pp"))
        runs = {fam: [f"sparsity.family={fam}", f"sparsity.s={s}"] for fam, s in FAMILIES.items()} | EXTRA
        if layout in KERNEL:
            runs["wide_block_kernel"] = [*EXTRA["wide_block_rigl"], "sparsity.kernel=block", *KERNEL[layout]]
        for fam, overrides in runs.items():
            cfg = load_config(REPO / "configs" / "tiny" / "dense.yaml", [
                f"parallel.tensor={tp}", f"parallel.pipeline={pp}", *overrides,
                "train.steps=5", "logging.progress=false", "logging.tensorboard=false",
                f"train.out_dir={out / layout / fam}"])
            tr = Trainer(cfg)
            if cfg.sparsity.pattern != "unstructured":
                tr.export_masks(out / layout / fam / "init_masks.safetensors")
            tr.fit()  # writes metrics.jsonl (logging rank) and sparse_masks.safetensors (rank 0)
            tr.close(destroy_process_group=False)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
