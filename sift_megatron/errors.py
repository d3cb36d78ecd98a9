"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator


class SiftError(Exception):
    """Bad input from the user (config, data, checkpoint, CLI). The message is one line that names the
    bad value and what is allowed."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when empty), for one-line errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# Named fault points: production code calls fault_point(name, step) where a crash or an interrupt must be safe
# (after a write's temp output, before its rename; at start-up imports; once per training step). They do nothing
# unless a hook is installed: the tests install theirs (tests/faults/sitecustomize.py) to kill, interrupt or slow
# a process there.
FAULT_HOOKS: list[Callable[[str, int | None], None]] = []


def fault_point(name: str, step: int | None = None) -> None:
    for hook in FAULT_HOOKS:
        hook(name, step)


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
