"""`sift train CONFIG [a.b=c ...]`: one process, or one per rank under torchrun / launch/."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain a (Sparse-IFT) GPT with megatron-core + DeepSpeed ZeRO")
    p.add_argument("config", help="YAML config (e.g. configs/tiny/dense.yaml)")
    p.add_argument("overrides", nargs="*", metavar="a.b=c", help="config overrides")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from sift_megatron.config import load_config

    cfg = load_config(args.config, args.overrides)  # validate before importing torch/megatron
    from sift_megatron.training.trainer import run

    run(cfg)
    return 0
