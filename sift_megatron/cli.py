"""`sift` command line. Thin: parse, validate, call. Heavy imports happen inside the handlers so that
`sift --help` and argument errors are instant."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from sift_megatron.errors import SiftError, deferred_sigint, fault_point

# Each entry is a module exposing `register(subparsers)`; it adds its sub-command(s) and sets
# `func=handler(args) -> int | None` as the parser default. Modules must not import torch at top level.
_COMMAND_MODULES = [
    "sift_megatron.training.cli",  # train
    "data_prep.cli",  # data tokenizer / data preprocess
    "sift_megatron.ift.cli",  # flops
    "sift_megatron.spectral.cli",  # spectral
    "sift_megatron.convert.cli",  # convert, eval
    "sift_megatron.quickstart",  # quickstart
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sift", description="Sparse-IFT pretraining on megatron-core + DeepSpeed")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:  # a module that fails to import is a bug: never drop its sub-command silently
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        with deferred_sigint():  # a Ctrl-C while the sub-command modules import is raised once they have
            fault_point("startup")
            parser = build_parser()
            args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print(f"sift {args.command}: interrupted" if args else "sift: interrupted", file=sys.stderr)
        return 130
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except SiftError as e:
        # Under torchrun every rank hits the same validation error: let rank 0 speak for all.
        if os.environ.get("RANK", "0") == "0":
            print(f"sift {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # Safety net for a write path without its own check (the checks in preflight come first): one line
        # naming the path, never a traceback.
        if os.environ.get("RANK", "0") == "0":
            where = f" '{e.filename}'" if e.filename else ""
            print(f"sift {args.command}: error: cannot access{where}: {e.strerror or e}; give a writable path "
                  "on a file system with free space", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sift {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
