"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
from collections.abc import Iterator


class SiftError(Exception):
    """Bad input from the user (config, data, checkpoint, CLI). The message is one line that names the
    bad value and what is allowed."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when empty), for one-line errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def fault_point(name: str, step: int | None = None) -> None:
    """Crash-safety test hook: with SIFT_FAULT_KILL_AT=name (or name@step, for a point reached at every step)
    the process dies here (SIGKILL, as on a power cut or an OOM kill). Every write path calls it after writing
    its temp output and before renaming it into place."""
    if os.environ.get("SIFT_FAULT_KILL_AT") in (name, f"{name}@{step}"):
        os.kill(os.getpid(), signal.SIGKILL)


def interrupt_point(name: str) -> None:
    """Interrupt test hook: with SIFT_FAULT_SIGINT_AT=name the process gets a SIGINT here (a Ctrl-C at this point)."""
    if os.environ.get("SIFT_FAULT_SIGINT_AT") == name:
        os.kill(os.getpid(), signal.SIGINT)


@contextlib.contextmanager
def deferred_sigint() -> Iterator[None]:
    """Hold a Ctrl-C back until the block ends, then raise KeyboardInterrupt. For imports of C extensions: a
    KeyboardInterrupt raised inside one (torch's pybind11 modules) can abort the interpreter (rc -6), skipping
    every cleanup. Process-wide (a handler, not a thread mask); an ignored SIGINT stays ignored."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    pending: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pending:
        raise KeyboardInterrupt


def positive_int(text: str) -> int:
    """argparse type for counts (workers, shards, limits): argparse prints the message as its one-line error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value
