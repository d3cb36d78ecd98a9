"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""

from __future__ import annotations

import argparse
import os
import signal


class SiftError(Exception):
    """Bad input from the user (config, data, checkpoint, CLI). The message is one line that names the
    bad value and what is allowed."""


def fault_point(name: str) -> None:
    """Crash-safety test hook: with SIFT_FAULT_KILL_AT=name the process dies here (SIGKILL, as on a power cut or
    an OOM kill). Every write path calls it after writing its temp output and before renaming it into place."""
    if os.environ.get("SIFT_FAULT_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def positive_int(text: str) -> int:
    """argparse type for counts (workers, shards, limits): argparse prints the message as its one-line error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value
