"""Shared test helpers. Multi-rank tests launch real `torchrun` processes (gloo on CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def fault_env(**env: str) -> dict:
    """`env` (SIFT_FAULT_KILL_AT, SIFT_FAULT_SIGINT_AT, SIFT_STEP_DELAY_S: see tests/faults/sitecustomize.py) plus
    the PYTHONPATH that makes a subprocess (and the torchrun ranks it starts) install the fault hooks; the repo
    stays importable ahead of any installed copy."""
    path = [str(REPO / "tests" / "faults"), str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "PYTHONPATH": os.pathsep.join(path)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(nproc: int, argv: list[str], *, timeout: float = 600, env: dict | None = None,
                 cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run `torchrun --nproc_per_node=nproc <argv>` (argv[0] a script path or `-m module`); raise with the
    output on failure so the test log shows what the ranks printed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", *argv]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=cwd or REPO)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed rc={proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
                             f"\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def run_sift(args: list[str], *, timeout: float = 600, env: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run the `sift` CLI in a subprocess (the same code path a user runs)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "sift_megatron.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"sift {' '.join(args)} failed rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture
def shakespeare() -> Path:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path
