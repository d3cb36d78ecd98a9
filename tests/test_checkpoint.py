"""Checkpoints: kill -9 and resume equals an uninterrupted run (across a DST update), a kill during a save
leaves the previous checkpoint and `latest` valid, a TP=2 x DP=2 ZeRO-2 checkpoint (sharded: each rank wrote its
own shards) resumes at TP=1 and at TP=1 x PP=2 x DP=2 ZeRO-1 with the same losses, logits and masks (Adam moments
included), one-line errors (missing, corrupt, another model's checkpoint)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, fault_env, free_port, run_sift, run_torchrun

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
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **fault_env(SIFT_STEP_DELAY_S="0.3")}
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
    env = fault_env(SIFT_FAULT_KILL_AT="checkpoint_data@4")  # the ranks die (SIGKILL) after writing step 4, before the rename
    with pytest.raises(AssertionError):
        run_torchrun(2, ["-m", "sift_megatron.cli", "train", TINY, f"train.out_dir={out}", *COMMON], env=env)
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000002"
    assert not (root / "step_000004").exists()
    run_torchrun(2, ["-m", "sift_megatron.cli", "train", TINY, f"train.out_dir={out}", *COMMON, "train.resume=auto"])
    assert (root / "latest").read_text().strip() == "step_000008"
    assert not list(root.glob(".tmp-*"))


# Sparse Wide with RigL updating every step: the saved masks differ from the (layout-invariant) initial ones,
# so equal masks after loading prove the masks moved with the checkpoint. The TP=2 run saves at step 3 and ends
# at 5; the resharded runs resume from step 3 and train to 5.
RESHARD = ["train", TINY, "sparsity.family=wide", "sparsity.s=0.75", "dst.algorithm=rigl", "dst.interval=1",
           "dst.end=100", "train.steps=5", "train.save_interval=3", "logging.progress=false",
           "logging.tensorboard=false", "logging.logits=true"]


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp2")
    # ZeRO-2 over DP=2: each DP rank saves only its flat fragment of the fp32 Adam state.
    run_torchrun(4, ["-m", "sift_megatron.cli", *RESHARD, f"train.out_dir={out}", "parallel.tensor=2",
                     "zero.stage=2", "spectral.interval=5"])
    return out


@pytest.mark.slow
def test_tp2_checkpoint_loads_at_tp1_and_pp2(tp2_run, tmp_path):
    """Issues 7 and 15's must-show: the TP=2 x DP=2 ZeRO-2 run's step-3 checkpoint resumed at TP=1 and at
    TP=1 x PP=2 x DP=2 ZeRO-1 continues the TP=2 run: losses of steps 4-5, final logits (first validation
    micro-batch, gathered over the vocab shards) and masks agree within fp32 rounding, which needs the Adam
    moments to move with the checkpoint; the same resume with fresh moments visibly does not."""
    import shutil

    import torch
    from safetensors.torch import load_file

    ckpt = tp2_run / "checkpoints" / "step_000003"
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    assert not list(ckpt.glob("*.safetensors")) and not list(ckpt.glob("*.pt"))  # one copy of the state
    fresh = tmp_path / "fresh_ckpt"
    shutil.copytree(ckpt, fresh)
    meta = json.loads((fresh / "meta.json").read_text())
    (fresh / "meta.json").write_text(json.dumps({**meta, "optimizer_step": 0}))  # as if saved before any step
    tp1 = run_sift([*RESHARD, f"train.out_dir={tmp_path / 'tp1'}", f"train.resume={ckpt}"])
    pp2 = run_torchrun(4, ["-m", "sift_megatron.cli", *RESHARD, f"train.out_dir={tmp_path / 'pp2'}",
                           "parallel.pipeline=2", "zero.stage=1", f"train.resume={ckpt}"])
    nomom = run_sift([*RESHARD, f"train.out_dir={tmp_path / 'fresh'}", f"train.resume={fresh}"])
    ref_run = _by_step(tp2_run)
    assert ref_run[3]["dst/initial_still_active"] < 1.0  # masks moved away from their init
    ref = load_file(tp2_run / "logits.safetensors")
    ref_masks = load_file(tp2_run / "sparse_masks.safetensors")
    assert ref["logits"].shape == (4, 64, 256)
    for name, proc in (("tp1", tp1), ("pp2", pp2)):
        assert "resharded" in proc.stdout and "Adam moments (optimizer step 3) loaded" in proc.stdout, name
        run = _by_step(tmp_path / name)
        assert sorted(run) == [4, 5], name
        for step, key in ((4, "loss"), (5, "loss"), (5, "val_loss")):  # step 5 is the first to use the moments
            d = abs(run[step][key] - ref_run[step][key])
            print(f"{name}: step {step} |{key} - TP=2 {key}| = {d:.3g}")
            assert d <= 1e-5, (name, step, key)
        got = load_file(tmp_path / name / "logits.safetensors")
        assert torch.equal(got["tokens"], ref["tokens"])
        diff = (got["logits"] - ref["logits"]).abs().max().item()
        print(f"{name}: max |logits - TP=2 logits| = {diff:.3g}")
        assert diff <= 1e-5, name
        masks = load_file(tmp_path / name / "sparse_masks.safetensors")
        assert sorted(masks) == sorted(ref_masks)
        for k in (k for k in ref_masks if k.endswith(".mask")):
            assert torch.equal(masks[k], ref_masks[k]), (name, k)
    assert "Adam moments) starts fresh" in nomom.stdout
    run = _by_step(tmp_path / "fresh")
    d = [abs(run[5][k] - ref_run[5][k]) for k in ("loss", "val_loss")]
    print(f"fresh moments: step 5 |loss - TP=2 loss| = {d[0]:.3g}, |val_loss - TP=2 val_loss| = {d[1]:.3g}")
    assert min(d) > 1e-3


@pytest.mark.slow
def test_checkpoint_of_another_model_is_a_one_line_error(tp2_run, tmp_path):
    ckpt = tp2_run / "checkpoints" / "step_000003"
    proc = run_sift([*RESHARD, "model.hidden_size=128", f"train.out_dir={tmp_path / 'r'}", f"train.resume={ckpt}"],
                    check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "does not fit this model" in proc.stderr and "model.hidden_size 64 -> 128" in proc.stderr


def test_resume_errors_are_one_line(tmp_path):
    bad = tmp_path / "ckpt"
    bad.mkdir()
    proc = run_sift(["train", TINY, f"train.out_dir={tmp_path / 'r'}", f"train.resume={tmp_path / 'missing'}"],
                    check=False)
    assert proc.returncode != 0 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_sift(["train", TINY, f"train.out_dir={tmp_path / 'r'}", f"train.resume={bad}"], check=False)
    assert proc.returncode != 0 and "incomplete or corrupt" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_spectral_reads_masks_from_the_sharded_checkpoint(tp2_run):
    """`sift spectral`'s reader assembles each layer's mask and weight from the 4 ranks' boxes of the final
    checkpoint: equal to the end-of-run export gathered over TP. The spectral/* scalars the run logged at
    step 5 (streamed over the TP ranks of DP rank 0 while DP rank 1 waits) are exactly their analysis."""
    import numpy as np
    from safetensors.torch import load_file

    from sift_megatron.spectral.io import read_masks
    from sift_megatron.spectral.metrics import analyze_masks, summary_scalars

    step, got = read_masks(tp2_run / "checkpoints")
    ref = load_file(tp2_run / "sparse_masks.safetensors")
    assert step == 5 and sorted(f"{k}.mask" for k in got) == sorted(k for k in ref if k.endswith(".mask"))
    for layer, (mask, weight) in got.items():
        assert np.array_equal(mask, ref[f"{layer}.mask"].numpy() != 0), layer
        assert np.array_equal(weight, ref[f"{layer}.weight"].float().numpy()), layer
    logged = {k: v for k, v in _by_step(tp2_run)[5].items() if k.startswith("spectral/")}
    assert logged == summary_scalars(analyze_masks(got), per_layer=False) and logged["spectral/layers_scored"] >= 16
