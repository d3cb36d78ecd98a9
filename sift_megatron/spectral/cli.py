"""`sift spectral CHECKPOINT [CHECKPOINT ...]`: Ramanujan-graph metrics of the sparse masks of checkpoints.
numpy / scipy / matplotlib are imported inside the handler so that `sift --help` stays instant."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "spectral", help="spectral analysis (Ramanujan gap, weighted spectral gap) of the sparse masks",
        description="Per-layer and model-mean Ramanujan gap (delta_r, delta_s), weighted spectral gap (lambda), "
                    "their iterative-mean variants and NaRC, from the masks (and |W|) in each checkpoint's "
                    "sparse_masks.safetensors. Several checkpoints of one run give metric-vs-step output.")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="checkpoint dir, checkpoints root or run dir (follows `latest`), or a .safetensors file")
    p.add_argument("--json", metavar="OUT", help="write all numbers as JSON")
    p.add_argument("--csv", metavar="OUT", help="write one row per layer (and model mean) per checkpoint")
    p.add_argument("--plot", metavar="OUT.png",
                   help="(delta_r, lambda) plane per layer; with several checkpoints also OUT_steps.png")
    p.add_argument("--no-iterative", action="store_true",
                   help="skip the iterative-mean variants (delta_r_imdb, lambda_imsg, ...)")
    p.add_argument("--convention", choices=("neurips23", "iclr23"), default="neurips23",
                   help="validity rules / Cheeger factor of the iterative mean (default: neurips23)")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="layers analysed in parallel threads (default: CPU count, at most 4)")
    p.add_argument("--quiet", action="store_true", help="print nothing but the written file names")
    p.set_defaults(func=_spectral)


def _spectral(args: argparse.Namespace) -> int:
    import os

    from sift_megatron.errors import SiftError

    if args.jobs is not None and args.jobs < 1:
        raise SiftError(f"--jobs must be >= 1, got {args.jobs}")
    from sift_megatron.extras import require

    require("sift spectral", "scipy", *(["matplotlib"] if args.plot else []))
    from sift_megatron.spectral.report import run

    run(args.checkpoints, json_out=args.json, csv_out=args.csv, plot_out=args.plot,
        iterative=not args.no_iterative, convention=args.convention,
        jobs=args.jobs or min(4, os.cpu_count() or 1), quiet=args.quiet)
    return 0
