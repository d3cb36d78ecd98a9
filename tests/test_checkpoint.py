"""Checkpoints: kill -9 and resume equals an uninterrupted run (across a DST update), a kill during a save
leaves the previous checkpoint and `latest` valid, a TP=2 checkpoint loads at TP=1 and PP=2, one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, free_port, run_sift, run_torchrun

TINY = str(REPO / "configs" / "tiny" / "dense.yaml")
COMMON = ["sparsity.family=wide", "sparsity.s=0.5", "dst.algorithm=rigl", "dst.interval=3", "dst.end=100",
          "train.steps=8", "train.save_interval=2", "logging.progress=false", "logging.tensorboard=false",
          "train.eval_interval=4"]


def _by_step(run_dir) -> dict[int, dict]:
    """Last record per step (a resumed run appends to the same metrics.jsonl)."""
    out: dict[int, dict] = {}
    for line in open(run_dir / "metrics.jsonl"):
        r = json.loads(line)
        out.setdefault(r["step"], {}).update(r)
    return out


def _torchrun_cmd(out, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "-m", "sift_megatron.cli", "train", TINY, f"train.out_dir={out}",
            *COMMON, *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    run_torchrun(2, ["-m", "sift_megatron.cli", "train", TINY, f"train.out_dir={out}", *COMMON])
    return out


@pytest.mark.slow
def test_kill9_and_resume_equals_uninterrupted(uninterrupted, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "SIFT_STEP_DELAY_S": "0.3"}
    proc = subprocess.Popen(_torchrun_cmd(out), env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    kill_after = 5  # a checkpoint exists at step 4, a DST update happened at step 3 and is due at 6
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and any(json.loads(x).get("step", 0) >= kill_after
                                                    for x in open(out / "metrics.jsonl")):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000004"
    run_torchrun(2, ["-m", "sift_megatron.cli", "train", TINY, f"train.out_dir={out}", *COMMON, "train.resume=auto"])
    ref, got = _by_step(uninterrupted), _by_step(out)
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    for step in ref:
        assert got[step]["loss"] == ref[step]["loss"], step  # exact: same layout, dropout 0
        if "val_loss" in ref[step]:
            assert got[step]["val_loss"] == ref[step]["val_loss"]
    assert [s for s in got if "dst/update" in got[s]] == [3, 6]


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    env = {"SIFT_FAULT_KILL_IN_SAVE": "4"}  # rank 0 dies (SIGKILL) after writing step 4, before the rename
    with pytest.raises(AssertionError):
        run_torchrun(2, ["-m", "sift_megatron.cli", "train", TINY, f"train.out_dir={out}", *COMMON], env=env)
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000002"
    assert not (root / "step_000004").exists()
    run_torchrun(2, ["-m", "sift_megatron.cli", "train", TINY, f"train.out_dir={out}", *COMMON, "train.resume=auto"])
    assert (root / "latest").read_text().strip() == "step_000008"
    assert not list(root.glob(".tmp-*"))


@pytest.mark.slow
def test_tp2_checkpoint_loads_at_tp1_and_pp2(uninterrupted, tmp_path):
    tp2 = tmp_path / "tp2"
    args = ["train", TINY, "sparsity.family=wide", "sparsity.s=0.75", "train.steps=3", "logging.progress=false",
            "logging.tensorboard=false"]
    run_torchrun(2, ["-m", "sift_megatron.cli", *args, f"train.out_dir={tp2}", "parallel.tensor=2"])
    ref = _by_step(tp2)[3]["val_loss"]
    ckpt = tp2 / "checkpoints" / "step_000003"
    # Same step count: nothing to train, the final validation runs on the loaded weights.
    run_sift([*args, f"train.out_dir={tmp_path / 'tp1'}", f"train.resume={ckpt}"])
    run_torchrun(2, ["-m", "sift_megatron.cli", *args, f"train.out_dir={tmp_path / 'pp2'}", "parallel.pipeline=2",
                     f"train.resume={ckpt}"])
    assert _by_step(tmp_path / "tp1")[3]["val_loss"] == pytest.approx(ref, abs=1e-5)
    assert _by_step(tmp_path / "pp2")[3]["val_loss"] == pytest.approx(ref, abs=1e-5)


def test_resume_errors_are_one_line(tmp_path):
    bad = tmp_path / "ckpt"
    bad.mkdir()
    proc = run_sift(["train", TINY, f"train.out_dir={tmp_path / 'r'}", f"train.resume={tmp_path / 'missing'}"],
                    check=False)
    assert proc.returncode != 0 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_sift(["train", TINY, f"train.out_dir={tmp_path / 'r'}", f"train.resume={bad}"], check=False)
    assert proc.returncode != 0 and "incomplete or corrupt" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
