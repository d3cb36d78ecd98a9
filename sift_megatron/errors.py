"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""

from __future__ import annotations

import argparse


class SiftError(Exception):
    """Bad input from the user (config, data, checkpoint, CLI). The message is one line that names the
    bad value and what is allowed."""


def positive_int(text: str) -> int:
    """argparse type for counts (workers, shards, limits): argparse prints the message as its one-line error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value
