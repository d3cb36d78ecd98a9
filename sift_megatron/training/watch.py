"""Start-up progress: the minutes between launch and the first step (datasets and their index cache, model build,
mask top-k, engine, checkpoint load) are otherwise silent, and a hang there (a collective waiting on a dead rank,
a huge index build) looks exactly like slow progress. `watch("what")` ends a stage: rank 0 prints
`start-up [  12.3 s, +4.5 s] what` (time since start-up began, and the stage's own). A stage that may be slow runs
under `watch.phase(...)`: when it lasts longer than `limit_s`, every rank says what it is doing and for how
long, once per period, until the phase ends."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator


class StartupWatch:
    def __init__(self, limit_s: float, rank: int = 0, world: int = 1, stream=None) -> None:
        self.limit_s, self.rank = limit_s, rank
        self.who = f"rank {rank}: " if world > 1 else ""
        self.stream = stream  # of the phase lines (default stderr); stage lines go to stdout, the run's log
        self.t0 = self.t = time.perf_counter()

    def __call__(self, message: str) -> None:
        now = time.perf_counter()
        if self.rank == 0:
            print(f"start-up [{now - self.t0:7.1f} s, +{now - self.t:.1f} s] {message}", flush=True)
        self.t = now

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
