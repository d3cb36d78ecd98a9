"""The real launch/slurm/pretrain.sbatch on a real single-node SLURM (installed and started by
launch/slurm/install_local_slurm.sh): a 2-process job gets SIGUSR1 mid-run (what `--signal=B:USR1@120` sends
before the time limit), checkpoints, requeues itself, resumes from `latest` and finishes with the losses of an
uninterrupted torchrun run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, fault_env, run_torchrun

INSTALL = REPO / "launch" / "slurm" / "install_local_slurm.sh"
SBATCH = REPO / "launch" / "slurm" / "pretrain.sbatch"
TINY = str(REPO / "configs" / "tiny" / "dense.yaml")
ARGS = ["sparsity.family=wide", "sparsity.s=0.5", "dst.algorithm=rigl", "dst.interval=3", "dst.end=100",
        "train.steps=8", "train.save_interval=0", "logging.progress=false", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def slurm() -> None:
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        pytest.skip("no SLURM and no apt-get to install it (launch/slurm/install_local_slurm.sh needs Debian apt)")
    proc = subprocess.run(["bash", str(INSTALL)], capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:  # the installer's "cannot install here" (no apt, no root, no network)
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-4000:]


def _job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _wait_for(pred, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not pred():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def _losses(run_dir) -> dict[int, float]:
    recs = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.mark.slow
def test_sbatch_checkpoints_on_usr1_requeues_and_resumes(slurm, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHON": sys.executable, "SIFT_ROOT": str(REPO), **fault_env(SIFT_STEP_DELAY_S="0.5")}
    job = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path / 'job.out'}", str(SBATCH), TINY,
                          f"train.out_dir={run}", *ARGS], capture_output=True, text=True, env=env, cwd=tmp_path,
                         check=True).stdout.strip().split(";")[0]
    try:
        _wait_for(lambda: (run / "metrics.jsonl").exists() and len(_losses(run)) >= 2, "the first steps")
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
        # The job checkpoints, requeues itself and waits for SLURM's requeue delay; skip the delay.
        _wait_for(lambda: _job(job).get("Restarts") == "1" and _job(job).get("JobState") == "PENDING",
                  "the requeue")
        # slurmd refuses a job credential issued in the same second as its revocation at the requeue ("Job
        # credential revoked", and the job FAILS): SLURM's own delay avoids that, so wait a few seconds.
        time.sleep(5)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        _wait_for(lambda: _job(job).get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"),
                  "the job to finish")
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    log = (tmp_path / "job.out").read_text()
    assert _job(job)["JobState"] == "COMPLETED", log
    assert "requeueing" in log and "resumed from" in log, log
    stop = int(log.split("stopping at step ")[1].split()[0])
    assert 2 <= stop < 8, log

    ref = tmp_path / "ref"
    run_torchrun(2, ["-m", "sift_megatron.cli", "train", TINY, f"train.out_dir={ref}", *ARGS])
    n_logged = sum('"loss"' in line for line in open(run / "metrics.jsonl"))
    assert n_logged == 8 and _losses(run) == _losses(ref)  # every step once, exactly the uninterrupted losses (dropout 0)
