"""Run under torchrun: for each Sparse-IFT family and each requested layout, train a few steps with the real
Trainer and dump the losses and the gathered logical masks, so the test can compare layouts.

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


def main() -> None:
    out = Path(sys.argv[1])
    for layout in sys.argv[2:]:
        tp, pp = (int(x) for x in layout[2:].split("pp"))
        for fam, s in FAMILIES.items():
            cfg = load_config(REPO / "configs" / "tiny" / "dense.yaml", [
                f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"sparsity.family={fam}", f"sparsity.s={s}",
                "train.steps=5", "logging.progress=false", "logging.tensorboard=false",
                f"train.out_dir={out / layout / fam}"])
            tr = Trainer(cfg)
            tr.fit()  # writes metrics.jsonl (logging rank) and sparse_masks.safetensors (rank 0)
            tr.close(destroy_process_group=False)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
