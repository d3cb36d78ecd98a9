"""`sift plan` (fast, no torch): published GPT-3 sizes, the memory model (ZeRO stages, masks, Korthikanti
activations), layout suggestion and one-line errors for impossible plans."""

from __future__ import annotations

import json

import pytest

from sift_megatron.config import load_config
from sift_megatron.errors import SiftError
from sift_megatron.ift.plan import GB, _layer_activation, plan_report
from sift_megatron.ift.sizes import transformed_shape
from sift_megatron.training.engine import check_layout
from tests.conftest import REPO, run_sift

GPT3 = REPO / "configs" / "gpt3"
# GPT-3 paper, Table 2.1 (n_params); 175B is 174.6B counted exactly.
PUBLISHED = {"125m": 125e6, "350m": 350e6, "760m": 760e6, "1.3b": 1.3e9, "2.7b": 2.7e9, "6.7b": 6.7e9,
             "13b": 13.0e9, "175b": 174.6e9}


# The memory-model figures below are for fp32 and DeepSpeed's single-replica stage 0 (the trainer's defaults);
# the shipped GPT-3 configs choose bf16 for GPUs, which test_gpt3_configs_are_bf16 checks.
FP32 = ["model.precision=fp32", "zero.stage0_when_single_replica=true"]


def cfg_of(size: str, name: str = "dense", *overrides: str):
    return load_config(GPT3 / size / f"{name}.yaml", [*FP32, *overrides])


@pytest.mark.parametrize("size", ["125m", "13b", "175b"])
def test_gpt3_configs_are_bf16(size):
    for path in sorted((GPT3 / size).glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.model.precision == "bf16" and not cfg.zero.stage0_when_single_replica, path
        world = cfg.parallel.tensor * cfg.parallel.pipeline * 8
        rep = plan_report(cfg, world)
        assert rep["precision"] == "bf16" and rep["config_layout"]["zero_stage"] >= 1
        check_layout(cfg, world)  # what `sift check --world-size` runs: bf16 passes the trainer's layout rules
        check_layout(cfg, cfg.parallel.tensor * cfg.parallel.pipeline)  # one replica too (ZeRO-1, not stage 0)


@pytest.mark.parametrize("size", PUBLISHED)
def test_parameter_counts_match_the_paper(size):
    cfg = cfg_of(size)
    rep = plan_report(cfg, cfg.parallel.tensor * cfg.parallel.pipeline * 4)
    p = rep["params"]["transformed"]
    assert p["stored"] == pytest.approx(PUBLISHED[size], rel=0.02)
    assert p["active"] == p["stored"] and rep["params"]["baseline"]["stored"] == p["stored"]


def test_sparse_wide_125m_plan():
    for name, hidden, factor in (("sparse_wide_s50_static", 1092, 2), ("sparse_wide_s75_rigl", 1536, 4)):
        rep = plan_report(cfg_of("125m", name), 8)
        assert rep["model"]["shape"]["transformed"]["hidden_size"] == hidden
        p, base = rep["params"]["transformed"], rep["params"]["baseline"]
        # the transformed linears store k^2 = 1/(1-s) times the dense weights, about as many stay active
        assert p["sparse_elements"] == pytest.approx(factor * 85e6, rel=0.02)
        assert p["active"] == pytest.approx(base["stored"], rel=0.35) and p["active"] < p["stored"]
        assert rep["flops_per_token"]["ratio_transformed_layers"] == pytest.approx(1.0, abs=0.02)


def test_activation_formula_is_korthikanti():
    """16-bit, no TP: 34 s b h + 5 a s^2 b per layer; with TP and sequence parallelism all of it / TP."""
    cfg = cfg_of("1.3b")
    shape = transformed_shape(cfg)
    s, b, h, a = 2048, 2, shape.hidden_size, shape.num_attention_heads
    ref = 34 * s * b * h + 5 * a * s * s * b
    assert _layer_activation(shape, s, b, 1, False, 2) == pytest.approx(ref)
    assert _layer_activation(shape, s, b, 8, True, 2) == pytest.approx(ref / 8)
    # TP without SP: s b h (10 + 24 / t + 5 a s / (h t))
    assert _layer_activation(shape, s, b, 4, False, 2) == pytest.approx(s * b * h * (10 + 24 / 4 + 5 * a * s / (h * 4)))


def test_memory_components_follow_the_zero_stage():
    base = ["parallel.tensor=1", "parallel.pipeline=1", "train.micro_batch_size=1"]
    mem = {}
    for stage in (1, 2, 3):
        rep = plan_report(cfg_of("1.3b", "dense", *base, f"zero.stage={stage}"), 8)
        mem[stage] = rep["config_layout"]
    p = mem[1]["params_per_gpu"]
    assert mem[1]["zero_stage"] == 1
    assert mem[1]["memory_gb"]["weights"] == pytest.approx(p * 4 / GB)  # fp32
    assert mem[1]["memory_gb"]["gradients"] == pytest.approx(p * 4 / GB)
    assert mem[1]["memory_gb"]["optimizer"] == pytest.approx(p * 12 / 8 / GB)  # fp32 copy + Adam m, v over DP
    assert mem[2]["memory_gb"]["gradients"] == pytest.approx(p * 4 / 8 / GB)
    assert mem[3]["memory_gb"]["weights"] == pytest.approx(p * 4 / 8 / GB)
    # one replica, no pipeline: DeepSpeed runs ZeRO-1/2 as stage 0 (training.engine), Adam state unsharded
    single = plan_report(cfg_of("1.3b", "dense", *base), 1, gpu_mem_gb=200)["config_layout"]
    assert single["zero_stage"] == 0 and single["memory_gb"]["optimizer"] == pytest.approx(p * 8 / GB)
    bf16 = plan_report(cfg_of("1.3b", "dense", *base), 8, precision="bf16")["config_layout"]
    assert bf16["memory_gb"]["weights"] == pytest.approx(p * 2 / GB)
    assert bf16["memory_gb"]["activations"] < 0.6 * mem[1]["memory_gb"]["activations"]
    # an fp32 config that turns DeepSpeed bf16 on: sift train rejects it (megatron would build fp32 weights), and
    # so does the plan, with the same one-line error, also when --precision asks for a plan in another precision
    extra = f"zero.extra={json.dumps({'bf16': {'enabled': True}})}"
    for asked in (None, "bf16"):
        with pytest.raises(SiftError, match=r"^DeepSpeed bf16 is enabled in zero.extra / zero.config_file but "
                                            r"model.precision is fp32; set model.precision=bf16"):
            plan_report(cfg_of("1.3b", "dense", *base, extra), 8, precision=asked)


def test_masks_and_dst_memory():
    rep = plan_report(cfg_of("125m", "sparse_wide_s75_rigl"), 8)
    own, sparse = rep["config_layout"], rep["params"]["transformed"]["sparse_elements"]
    assert own["tp"] == 1 and own["pp"] == 1
    assert own["memory_gb"]["masks"] == pytest.approx(sparse / GB)  # 1 byte per sparse element
    assert own["memory_gb"]["dst_dense_grad"] == pytest.approx(4 * sparse / GB)  # RigL's dense gradient
    static = plan_report(cfg_of("125m", "sparse_wide_s50_static"), 8)["config_layout"]
    assert static["memory_gb"]["dst_dense_grad"] == 0
    assert plan_report(cfg_of("125m"), 8)["config_layout"]["memory_gb"]["masks"] == 0


def test_recompute_and_suggestion():
    rep = plan_report(cfg_of("125m", "sparse_wide_s75_rigl", "train.micro_batch_size=16"), 8)
    own, sug = rep["config_layout"], rep["suggested"]
    assert not own["fits"] and own["fits_with_recompute"]
    assert own["total_recompute_gb"] < own["total_gb"]
    assert sug["fits"] and not sug["recompute_required"] and sug["tp"] * sug["pp"] > 1
    assert "parallel.tensor=" in sug["overrides"] and sug["total_gb"] <= rep["usable_gb"]
    # a config that fits is its own suggestion
    rep = plan_report(cfg_of("125m"), 8)
    assert rep["suggested"]["overrides"] == rep["config_layout"]["overrides"] and rep["suggested"]["fits"]
    # nothing fits without recompute at 175B in fp32 (activations of ~96 layers on the first stage)
    rep = plan_report(cfg_of("175b", "sparse_wide_s50_static"), 1024)
    assert rep["suggested"]["recompute_required"] and rep["notes"]


def test_plan_errors_in_process():
    with pytest.raises(SiftError, match="not divisible by parallel.tensor x parallel.pipeline = 8 x 32"):
        plan_report(cfg_of("175b"), 100)
    with pytest.raises(SiftError, match="does not fit on 8 GPUs of 16 GB"):
        plan_report(cfg_of("175b", "dense", "parallel.pipeline=1"), 8, gpu_mem_gb=16)
    with pytest.raises(SiftError, match="no valid TP x PP x DP layout of 7 GPUs"):
        plan_report(cfg_of("125m"), 7)
    with pytest.raises(SiftError, match="--gpus must be >= 1"):
        plan_report(cfg_of("125m"), 0)



def test_plan_and_train_ask_the_same_layout_rules():
    """One function holds the layout rules (layout.layout_problems): `sift plan` lists every problem of the
    config's layout, also the trainer's ZeRO-3 + sequence-parallel rule it used to miss; check_layout raises
    the first; the suggestion is a layout without problems."""
    from sift_megatron.layout import layout_problems

    cfg = load_config(REPO / "configs" / "tiny" / "dense.yaml",
                      ["zero.stage=3", "parallel.tensor=2", "parallel.sequence_parallel=true"])
    rep = plan_report(cfg, 4)
    problems = rep["config_layout"]["problems"]
    assert problems == layout_problems(cfg, 2, 1, None, True, 3, 4) == [
        "zero.stage 3 with parallel.sequence_parallel is not supported; use stage 1 or 2"]
    with pytest.raises(SiftError) as e:
        check_layout(cfg, 4)
    assert str(e.value) == problems[0]
    sug = rep["suggested"]
    assert not sug["is_config_layout"] and not sug["sequence_parallel"]
    assert layout_problems(cfg, sug["tp"], sug["pp"], sug["vp"], sug["sequence_parallel"], 3, 4) == []

def test_cli_plan_json_and_one_line_errors():
    proc = run_sift(["plan", str(GPT3 / "125m" / "sparse_wide_s50_static.yaml"), "--gpus", "8", "--json",
                     "train.micro_batch_size=2", *FP32])
    rep = json.loads(proc.stdout)
    assert rep["config_layout"]["micro_batch_size"] == 2 and rep["model"]["shape"]["transformed"]["hidden_size"] == 1092
    proc = run_sift(["plan", str(GPT3 / "125m" / "dense.yaml"), "--gpus", "8"])
    assert "memory per GPU" in proc.stdout and "suggested" in proc.stdout
    for args, message in (
            (["--gpus", "12", str(GPT3 / "13b" / "sparse_wide_s75_rigl.yaml")], "not divisible by parallel.tensor"),
            ([str(GPT3 / "175b" / "dense.yaml"), "--gpus", "8", "--gpu-mem", "16", "parallel.pipeline=1"],
             "does not fit")):
        proc = run_sift(["plan", *args], check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
