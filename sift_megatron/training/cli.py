"""`sift train CONFIG [a.b=c ...]`: one process, or one per rank under torchrun / launch/.
`sift check CONFIG [a.b=c ...] --world-size N`: validate a config and a layout before launching."""

from __future__ import annotations

import argparse

from sift_megatron.errors import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain a (Sparse-IFT) GPT with megatron-core + DeepSpeed ZeRO")
    p.add_argument("config", help="YAML config (e.g. configs/tiny/dense.yaml)")
    p.add_argument("overrides", nargs="*", default=[], metavar="a.b=c", help="config overrides (optional)")
    p.set_defaults(func=_train)
    c = sub.add_parser("check", help="validate a config (and a world size) without training")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*", default=[], metavar="a.b=c", help="config overrides (optional)")
    c.add_argument("--world-size", type=positive_int, default=1)
    c.add_argument("--print-out-dir", action="store_true", help="print the run directory on success")
    c.set_defaults(func=_check)


def _train(args: argparse.Namespace) -> int:
    import os

    from sift_megatron.config import load_config
    from sift_megatron.preflight import check_train

    cfg = load_config(args.config, args.overrides)  # validate before importing megatron
    checked = check_train(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # data, checkpoint, run dir: before any write
    _print_budget(cfg)
    from sift_megatron.extras import require

    if cfg.spectral.interval:
        require("spectral.interval", "scipy")
    if cfg.logging.wandb_project:
        require("logging.wandb_project", "wandb")
    from sift_megatron.training.trainer import run

    run(cfg, checked)  # the Trainer does not check again
    return 0


def _print_budget(cfg) -> None:
    """Steps derived from a tokens / samples budget, said once (rank 0) before the slow start-up."""
    import os

    from sift_megatron.config import budget_summary

    t, s = cfg.train, cfg.lr_schedule
    if int(os.environ.get("RANK", "0")) == 0 and any(v is not None for v in (
            t.tokens, t.samples, s.warmup_tokens, s.warmup_samples, s.decay_tokens, s.decay_samples)):
        print(budget_summary(cfg), flush=True)


def _check(args: argparse.Namespace) -> int:
    from sift_megatron.config import load_config
    from sift_megatron.preflight import check_train

    cfg = load_config(args.config, args.overrides)
    check_train(cfg, args.world_size)  # what `sift train` checks before it writes anything
    if args.print_out_dir:  # its stdout is the run directory (launch/slurm/pretrain.sbatch reads it)
        print(cfg.train.out_dir)
    else:
        _print_budget(cfg)
    return 0
