"""Throughput fields of every logged step: tokens/s, useful and executed TFLOP/s per GPU, MFU, peak memory."""

from __future__ import annotations

import json

import pytest
import torch

from sift_megatron.config import load_config
from sift_megatron.ift.flops import flop_report
from sift_megatron.training import throughput as T
from tests.conftest import REPO, run_sift

TINY = REPO / "configs" / "tiny" / "dense.yaml"


def test_peak_table_and_override(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H200")
    cuda = torch.device("cuda", 0)
    assert T.peak_tflops(cuda, "bf16") == 989.4
    assert T.peak_tflops(cuda, "fp32") == 494.7  # TF32
    assert T.peak_tflops(cuda, "fp64") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 PCIe")
    assert T.peak_tflops(cuda, "bf16") == 756.0  # the PCIe card, not the SXM one
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Some Future GPU")
    assert T.peak_tflops(cuda, "bf16") is None
    assert T.peak_tflops(cuda, "bf16", override=123.0) == 123.0
    assert T.peak_tflops(torch.device("cpu"), "bf16") is None


def test_flops_per_token_is_three_forwards():
    cfg = load_config(str(TINY), ["sparsity.family=wide", "sparsity.s=0.75"])
    useful, executed = T.flops_per_token(cfg, 256)
    tr = flop_report(cfg, vocab_size=256)["transformed"]
    assert useful == 3 * tr["total"] and executed == 3 * tr["dense_equivalent_total"]
    assert executed > useful  # masked zeros are executed by a dense GEMM
    dense = load_config(str(TINY))
    assert T.flops_per_token(dense, 256)[0] == T.flops_per_token(dense, 256)[1]


def test_record_arithmetic():
    cfg = load_config(str(TINY), ["logging.peak_tflops=2e-3"])
    tp = T.Throughput(cfg, 256, world_size=2, device=torch.device("cpu"))
    rec = tp.record(0.5)
    tokens = cfg.train.global_batch_size * cfg.model.seq_length / 0.5
    assert rec["tokens_per_s"] == pytest.approx(tokens)
    assert rec["tflops_per_gpu"] == pytest.approx(tp.useful * tokens / 2 / 1e12)
    assert rec["mfu"] == pytest.approx(rec["tflops_per_gpu"] / 2e-3)
    assert rec["peak_rss_gib"] > 0


def test_bad_peak_is_one_line_error():
    proc = run_sift(["check", str(TINY), "logging.peak_tflops=-1"], check=False)
    assert proc.returncode != 0
    assert "logging.peak_tflops must be > 0" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_metrics_have_throughput(tmp_path):
    run_sift(["train", str(TINY), f"train.out_dir={tmp_path}", "train.steps=2", "logging.progress=false",
              "logging.tensorboard=false", "train.save=false", "logging.peak_tflops=1"])
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"loss"' in line]
    assert len(recs) == 2
    for r in recs:
        assert r["tflops_per_gpu"] > 0 and r["executed_tflops_per_gpu"] == pytest.approx(r["tflops_per_gpu"])
        assert 0 < r["mfu"] < 1 and r["peak_rss_gib"] > 0
