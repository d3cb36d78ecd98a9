"""`sift quickstart [--out DIR]`: the main job.

Current stage: trains the tiny dense GPT on megatron's mock token stream with TP=2 under torchrun; the
full pipeline (built-in corpus, tokenizer, dense vs Sparse-IFT comparison, export, spectra) is wired in as
those pieces land.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="the main job: tiny GPT end to end on 2 ranks")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--nproc", type=int, default=2)
    p.set_defaults(func=_quickstart)


def _quickstart(args: argparse.Namespace) -> int:
    config = REPO / "configs" / "tiny" / "dense.yaml"
    out = Path(args.out)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           "--master_addr=127.0.0.1", "--master_port=29655", "-m", "sift_megatron.cli", "train", str(config),
           f"parallel.tensor={args.nproc}", f"train.out_dir={out / 'dense'}", "train.steps=50"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.call(cmd, env=env)
