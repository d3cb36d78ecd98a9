"""Watching a run: UTC timestamps and an ETA on plain step lines, and optional Weights & Biases logging of the
TensorBoard scalars (offline mode: no network); without the extra, a one-line error."""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

RECORDS = [{"step": 1, "loss": 4.25, "lr": 1e-3, "grad_norm": None, "tokens_per_s": 1000.0},
           {"step": 2, "loss": 3.5, "lr": 2e-3, "grad_norm": 0.5, "tokens_per_s": 1100.0},
           {"step": 4, "loss": 3.0, "lr": 1.5e-3, "grad_norm": 0.25, "tokens_per_s": 1200.0},
           {"step": 4, "val_loss": 3.125}]


def _log_all(logger) -> None:
    for rec in RECORDS:
        logger.log(dict(rec))
        logger.advance()
    logger.close()


def test_plain_lines_have_utc_time_and_eta(tmp_path, capsys):
    from sift_megatron.training.logger import MetricsLogger

    _log_all(MetricsLogger(tmp_path, True, 4, 0, tensorboard=False, jsonl=True, progress=True))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    stamp = r"time=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
    for line in lines[:2]:  # steps 1, 2 of 4: time left
        assert re.search(rf" {stamp} eta=\d+:\d\d:\d\d$", line), line
    for line in lines[2:]:  # the last step: nothing left
        assert re.search(rf" {stamp}$", line), line
    fields = dict(kv.split("=", 1) for kv in lines[0].split())  # how sift quickstart reads these lines
    assert (fields["step"], fields["loss"]) == ("1", "4.25")
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == RECORDS


def test_wandb_without_the_extra_is_one_line(tmp_path, monkeypatch, capsys):
    from sift_megatron.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)
    rc = main(["train", str(REPO / "configs" / "tiny" / "dense.yaml"), "data.mock=true",
               f"train.out_dir={tmp_path}", "logging.wandb_project=sift"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.splitlines() == [err]
    assert "logging.wandb_project needs wandb, not installed here: pip install 'sift-megatron[wandb]'" in err


def _wandb_history(run_file: Path) -> list[dict]:
    """History rows of an offline run file (LevelDB-log framing: 7-byte header, 32 KiB blocks of
    checksum / length / type records; types 1 full, 2 first, 3 middle, 4 last), as {key: value}."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, rows = run_file.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (n == 0 and kind == 0):
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_wandb_offline_logs_the_tensorboard_scalars(tmp_path, monkeypatch):
    """wandb is in the dev extra (CI installs it): no skip. Offline mode, so no network."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sift_megatron.config import load_config
    from sift_megatron.training.logger import MetricsLogger, wandb_settings

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(REPO / "configs" / "tiny" / "dense.yaml", [f"train.out_dir={tmp_path / 'run'}",
                                                                  "logging.wandb_project=sift"])
    settings = wandb_settings(cfg)
    assert settings["name"] == "run" and settings == wandb_settings(cfg)  # same id on resume
    _log_all(MetricsLogger(tmp_path / "run", True, 4, 0, tensorboard=True, progress=False, wandb=settings))
    tb = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    tb.Reload()
    want = {(e.step, tag, e.value) for tag in tb.Tags()["scalars"] for e in tb.Scalars(tag)}
    assert len(want) == 12  # loss, lr, tokens_per_s at 3 steps, grad_norm at 2 (None is not a scalar), val_loss
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    got = {(row["_step"], k, v) for row in _wandb_history(run_file) for k, v in row.items()
           if not k.startswith("_")}
    assert {(s, k) for s, k, _ in got} == {(s, k) for s, k, _ in want}
    for step, key, value in want:  # TensorBoard stores float32
        assert any(s == step and k == key and v == pytest.approx(value, rel=1e-6) for s, k, v in got), key
    assert settings["config"]["logging"]["wandb_project"] == "sift"


def test_train_prints_start_up_stages_then_timed_step_lines(tmp_path):
    from tests.conftest import run_sift

    proc = run_sift(["train", str(REPO / "configs" / "tiny" / "dense.yaml"), "data.mock=true", "train.steps=3",
                     "sparsity.family=wide", "sparsity.s=0.5", f"train.out_dir={tmp_path}", "train.save=false",
                     "logging.tensorboard=false", "logging.log_interval=1"], env={"OMP_NUM_THREADS": "1"})
    lines = proc.stdout.splitlines()
    stages = [re.match(r"start-up \[ *[\d.]+ s, \+[\d.]+ s\] (\w+):", ln) for ln in lines]
    assert [m.group(1) for m in stages if m] == ["distributed", "datasets", "model", "masks", "engine"]
    assert "masks: 16 sparse tensors at density 0.500" in proc.stdout and "EOD id 0" in proc.stdout  # mock data
    assert "TP 1 x PP 1 x DP 1" in proc.stdout and "ZeRO stage 0, fp32" in proc.stdout
    steps = [ln for ln in lines if ln.startswith(("loss=", "step="))]  # as sift quickstart reads them
    assert len(steps) == 4  # three steps and the final validation
    assert all(re.search(r" time=\S+Z( eta=\d+:\d\d:\d\d)?$", ln) for ln in steps), steps
    assert " eta=" in steps[0] and " eta=" not in steps[2]
    first_step = lines.index(steps[0])
    assert max(i for i, m in enumerate(stages) if m) < first_step
