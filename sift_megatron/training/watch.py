"""Start-up watch: building datasets (index caches), masks or the DeepSpeed engine, or loading a checkpoint, can
take minutes on a big corpus or model, and a hang there (a collective waiting on a dead rank, a huge index
build) looks exactly like slow progress. Each phase runs under `watch.phase(...)`; when one lasts longer than
`limit_s`, a line says what the rank is doing and for how long, once per period, until the phase ends."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator


class StartupWatch:
    def __init__(self, limit_s: float, rank: int = 0, world: int = 1, stream=None) -> None:
        self.limit_s = limit_s
        self.who = f"rank {rank}: " if world > 1 else ""
        self.stream = stream

    def _say(self, text: str) -> None:
        print(f"[sift train] {self.who}{text}", file=self.stream or sys.stderr, flush=True)

    @contextlib.contextmanager
    def phase(self, what: str) -> Iterator[None]:
        if not self.limit_s:
            yield
            return
        done = threading.Event()
        t0 = time.monotonic()

        def watch() -> None:
            while not done.wait(self.limit_s):
                self._say(f"still {what} after {time.monotonic() - t0:.1f} s")

        thread = threading.Thread(target=watch, name="sift-startup-watch", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            elapsed = time.monotonic() - t0
            if elapsed >= self.limit_s:
                self._say(f"done {what} in {elapsed:.1f} s")
