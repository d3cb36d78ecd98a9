"""Start-up progress lines: on a large model the minutes between launch and the first step (datasets and their
index cache, model build, mask top-k, engine, checkpoint load) are otherwise silent."""

from __future__ import annotations

import os
import time


class Startup:
    """`startup("what")` prints `start-up [  12.3 s, +4.5 s] what` on global rank 0: time since the trainer began,
    and the stage's own time."""

    def __init__(self) -> None:
        self.enabled = int(os.environ.get("RANK", "0")) == 0
        self.t0 = self.t = time.perf_counter()

    def __call__(self, message: str) -> None:
        now = time.perf_counter()
        if self.enabled:
            print(f"start-up [{now - self.t0:7.1f} s, +{now - self.t:.1f} s] {message}", flush=True)
        self.t = now


def model_line(cfg, vocab_size: int, chunks) -> str:
    """Parameters on this rank and of the whole model, and forward / training FLOPs per token."""
    from sift_megatron.ift.flops import flop_report

    rep = flop_report(cfg, vocab_size=vocab_size)
    params = rep["params"]["transformed"]
    local = sum(p.numel() for c in chunks for p in c.parameters())
    return (f"model: {cfg.sparsity.family} {params['active'] / 1e6:,.2f}M active / {params['stored'] / 1e6:,.2f}M "
            f"stored parameters ({local / 1e6:,.2f}M on rank 0), {rep['transformed']['total'] / 1e6:,.1f} forward / "
            f"{rep['transformed']['training']['per_token'] / 1e6:,.1f} training MFLOPs per token")
