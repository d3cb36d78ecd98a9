"""Shared benchmark plumbing: re-launch a script under torchrun and time steps with barriers."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def launch(script: str, nproc: int, args: list[str], port: int) -> dict:
    """Run `script --worker args` under torchrun; return the last JSON line rank 0 printed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={port}", script, "--worker", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc)), "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        sys.exit(f"{Path(script).name} with {nproc} processes failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def timed(fn: Callable[[], object], steps: int, warmup: int) -> float:
    """Median seconds of fn() over `steps` runs after `warmup`, synchronised across ranks."""
    import torch.distributed as dist

    times = []
    for i in range(warmup + steps):
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        fn()
        if dist.is_initialized():
            dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def emit(record: dict) -> None:
    """Print one JSON line from global rank 0 (what `launch` collects)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(record), flush=True)
