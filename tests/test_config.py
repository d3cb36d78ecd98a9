"""Config loading, overrides and one-line errors (fast, no torch)."""

from __future__ import annotations

import pytest
import yaml

from sift_megatron.config import load_config, save_resolved
from sift_megatron.errors import SiftError
from tests.conftest import REPO, run_sift

TINY = REPO / "configs" / "tiny" / "dense.yaml"


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(TINY, ["model.hidden_size=128", "parallel.tensor=2", "optimizer.lr=1e-3", "data.prefixes=[a, b]"])
    assert cfg.model.hidden_size == 128 and cfg.parallel.tensor == 2
    assert cfg.optimizer.lr == pytest.approx(1e-3) and cfg.data.prefixes == ["a", "b"]
    assert cfg.model.ffn == 512  # 4 x hidden by default
    save_resolved(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg


def test_include(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": {"num_layers": 6}, "train": {"steps": 3}}))
    (tmp_path / "child.yaml").write_text("include: base.yaml\nmodel:\n  hidden_size: 96\n  num_attention_heads: 6\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.train.steps) == (6, 96, 3)


def test_precision_reaches_plan():
    """model.precision drives `sift plan`: bf16 = 2 B weights, 2 B grads + 4 B fp32 accumulation (ZeRO-1, PP=1),
    12 B fp32 master + Adam over DP, and no stage-0 downgrade for one replica (its master lives in ZeRO)."""
    from sift_megatron.ift.plan import GB, plan_report, precision_of

    assert load_config(TINY).model.precision == "fp32"
    # the trainer's default single-replica stage 0 (the shipped GPT-3 configs turn it off for bf16)
    base = [str(REPO / "configs" / "gpt3" / "1.3b" / "dense.yaml"), ["parallel.tensor=1", "parallel.pipeline=1",
                                                                      "train.micro_batch_size=1",
                                                                      "zero.stage0_when_single_replica=true"]]
    cfg = load_config(base[0], [*base[1], "model.precision=bf16"])
    assert precision_of(cfg) == "bf16"
    lay = plan_report(cfg, 8)["config_layout"]
    p = lay["params_per_gpu"]
    assert lay["zero_stage"] == 1
    assert lay["memory_gb"]["weights"] == pytest.approx(p * 2 / GB)
    assert lay["memory_gb"]["gradients"] == pytest.approx(p * 6 / GB)
    assert lay["memory_gb"]["optimizer"] == pytest.approx(p * 12 / 8 / GB)
    assert plan_report(cfg, 1, gpu_mem_gb=400)["config_layout"]["zero_stage"] == 1
    f64 = load_config(base[0], [*base[1], "model.precision=fp64"])
    lay = plan_report(f64, 1, gpu_mem_gb=400)["config_layout"]
    assert lay["zero_stage"] == 0 and lay["memory_gb"]["optimizer"] == pytest.approx(lay["params_per_gpu"] * 16 / GB)


@pytest.mark.parametrize("overrides, message", [
    (["model.hiden_size=3"], "unknown config key 'model.hiden_size'"),
    (["bogus.x=1"], "unknown config key 'bogus'"),
    (["model.hidden_size=100", "model.num_attention_heads=3"], "not divisible by model.num_attention_heads"),
    (["model.num_attention_heads=4", "parallel.tensor=3"], "num_attention_heads 4 is not divisible by parallel.tensor 3"),
    (["sparsity.s=1.0"], "sparsity.s must be in [0, 1)"),
    (["sparsity.family=narrow"], "sparsity.family must be one of"),
    (["model.num_layers=two"], "must be an integer"),
    (["zero.stage=5"], "zero.stage must be 0, 1, 2 or 3"),
    (["model.precision=fp16"], "model.precision must be fp32, bf16 or fp64, got 'fp16'"),
    (["sparsity.parallel_branch_activation=tanh"],
     "sparsity.parallel_branch_activation must be none, gelu or relu, got 'tanh'"),
])
def test_bad_values(overrides, message):
    with pytest.raises(SiftError) as e:
        load_config(TINY, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: [64\n")
    with pytest.raises(SiftError, match="malformed YAML"):
        load_config(bad)


def _one_line_error(proc, needle: str) -> None:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and needle in lines[0], lines[0]


@pytest.mark.parametrize("args, needle", [
    (["model.bogus=1"], "unknown config key 'model.bogus'"),
    (["model.hidden_size=66"], "hidden_size 66 is not divisible by model.num_attention_heads 4"),
    (["model.ffn_hidden_size=255", "parallel.tensor=2"], "ffn_hidden_size 255 is not divisible by parallel.tensor 2"),
    (["model.num_attention_heads=4", "parallel.tensor=8"], "not divisible by parallel.tensor 8"),
    (["parallel.tensor=2"], "world size 1 is not divisible by parallel.tensor x parallel.pipeline = 2 x 1"),
    (["data.mock=false", "data.prefixes=[/nonexistent/corpus]", "model.vocab_size=256"], "missing /nonexistent/corpus.bin"),
    (["model.precision=bf16", "zero.stage=0"], "model.precision bf16 needs zero.stage 1 or 2"),
    (["model.precision=fp64", "zero.stage0_when_single_replica=false"], "model.precision fp64 needs ZeRO stage 0, got 1"),
])
def test_cli_one_line_errors(tmp_path, args, needle):
    proc = run_sift(["train", str(TINY), f"train.out_dir={tmp_path}", *args], check=False)
    _one_line_error(proc, needle)


def test_cli_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {hidden_size: 64\n")
    _one_line_error(run_sift(["train", str(bad)], check=False), "malformed YAML")


@pytest.mark.parametrize("overrides, message", [
    (["model.recompute=layers"], "model.recompute must be none, selective or full, got 'layers'"),
    (["model.recompute=full", "model.recompute_num_layers=0"], "model.recompute_num_layers must be >= 1, got 0"),
    (["model.recompute=selective", "model.recompute_num_layers=2"],
     "model.recompute_num_layers 2 needs model.recompute=full, got 'selective'"),
    (["model.recompute=full", "model.recompute_num_layers=3"],
     "layers per pipeline stage (model.num_layers 4 / parallel.pipeline x virtual_pipeline 1 = 4) are not "
     "divisible by model.recompute_num_layers 3"),
    (["model.recompute=full", "model.recompute_num_layers=4", "parallel.pipeline=2"], "= 2) are not divisible"),
])
def test_bad_recompute(overrides, message):
    with pytest.raises(SiftError) as e:
        load_config(TINY, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_recompute_values():
    assert load_config(TINY).model.recompute == "none"
    cfg = load_config(TINY, ["model.recompute=full", "model.recompute_num_layers=2", "parallel.pipeline=2"])
    assert (cfg.model.recompute, cfg.model.recompute_num_layers) == ("full", 2)
    assert load_config(TINY, ["model.recompute=selective"]).model.recompute == "selective"
