"""Activation recompute (model.recompute): the megatron TransformerConfig mapping, and bit-exact equivalence
with no recompute for the Sparse Wide RigL model (one real torchrun launch, see dist_scripts/recompute_equiv.py)."""

from __future__ import annotations

import json

import pytest

from sift_megatron.config import load_config
from tests.conftest import REPO, run_torchrun

TINY = REPO / "configs" / "tiny" / "dense.yaml"


@pytest.mark.parametrize("overrides, granularity, method, num_layers", [
    ([], None, None, None),
    (["model.recompute=selective"], "selective", None, None),
    (["model.recompute=full"], "full", "uniform", 1),
    (["model.recompute=full", "model.recompute_num_layers=2", "parallel.pipeline=2"], "full", "uniform", 2),
])
def test_transformer_config_mapping(overrides, granularity, method, num_layers):
    from sift_megatron import platform

    platform.setup()
    from sift_megatron.models.gpt import transformer_config

    tc = transformer_config(load_config(TINY, overrides))
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == (granularity, method, num_layers)
    assert tc.recompute_modules == ["core_attn"] and not tc.distribute_saved_activations


def test_plan_uses_the_configured_recompute():
    from sift_megatron.ift.plan import plan_report

    gpt3 = REPO / "configs" / "gpt3" / "175b"
    fp32 = ["model.precision=fp32"]  # the layouts were sized in fp32; the configs' bf16 needs less
    # the 175B Sparse Wide configs fit their layout only with recompute, and now turn it on themselves
    for name, mode in (("sparse_wide_s50_static", "selective"), ("sparse_wide_s75_rigl", "full")):
        rep = plan_report(load_config(gpt3 / f"{name}.yaml", fp32), 1024)
        own, sug = rep["config_layout"], rep["suggested"]
        assert own["recompute"] == mode and not own["fits"] and own["fits_configured"]
        assert sug["is_config_layout"] and "model.recompute" not in sug["overrides"] and sug["recompute_required"]
        assert own["total_recompute_gb"] <= own["total_configured_gb"] < own["total_gb"]
        # without it the suggestion adds full recompute
        rep = plan_report(load_config(gpt3 / f"{name}.yaml", [*fp32, "model.recompute=none"]), 1024)
        assert rep["suggested"]["overrides"].endswith(" model.recompute=full") and rep["suggested"]["is_config_layout"]
        assert rep["suggested"]["total_configured_gb"] == rep["suggested"]["total_recompute_gb"]
    # 125M with a large micro-batch: without recompute the plan changes the layout, with it keeps the config's
    small = REPO / "configs" / "gpt3" / "125m" / "sparse_wide_s75_rigl.yaml"
    rep = plan_report(load_config(small, [*fp32, "train.micro_batch_size=16", "model.recompute=full"]), 8)
    assert rep["suggested"]["is_config_layout"] and rep["suggested"]["fits_configured"]
    assert not plan_report(load_config(small, ["train.micro_batch_size=16"]), 8)["suggested"]["is_config_layout"]
    # full recompute of N layers per chunk needs N | layers per stage, also in the layouts the plan tries
    rep = plan_report(load_config(small, ["model.recompute=full", "model.recompute_num_layers=4"]), 8)
    assert "TP=1 PP=2: layers per stage 6 not divisible by recompute_num_layers 4" in rep["skipped_layouts"]


LAYERS_PER_RANK = {"tp2": 4, "tp2_sp": 4, "pp2": 2, "tp2_dropout": 4, "tp2_factorized": 4, "dp2_zero2": 4}


@pytest.mark.slow
def test_recompute_is_bit_exact_with_rigl(tmp_path):
    """selective and full (1 or 2 layers per chunk) reproduce none exactly: losses, grad norms, final weights,
    RigL masks (updated at steps 2 and 4) and the captured dense gradients; the sparse gradient hooks fire once
    per micro-batch. Covers TP=2, TP=2 + sequence parallel, PP=2 (1F1B), DP=2 ZeRO-2, dropout 0.1 (RNG states
    restored for the recompute) and the factorized family."""
    script = REPO / "tests" / "dist_scripts" / "recompute_equiv.py"
    proc = run_torchrun(2, [str(script), str(tmp_path), *LAYERS_PER_RANK])
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted((x["group"], x["rank"]) for x in lines) == sorted((g, r) for g in LAYERS_PER_RANK for r in (0, 1))
    for x in lines:
        layers = LAYERS_PER_RANK[x["group"]]
        ref = x["variants"]["none"]
        assert "full" in x["variants"] and ref["granularity"] is None
        assert x["updates"] == 2 and len(ref["losses"]) == 5
        for name, v in x["variants"].items():
            where = f"{x['group']} rank {x['rank']} {name}"
            assert v["losses"] == ref["losses"] and v["norms"] == ref["norms"], where
            assert v["weights_equal"] and v["masks_equal"] and v["dense_equal"], where
            assert v["masks_moved"] and v["updates"] == 2 and v["dense_captures"] == 2, where
            assert v["hooks"] == [[x["accum"], x["sparse_modules"]]] * 5, where  # once per micro-batch and weight
            regions = {"none": 0, "selective": layers, "full": layers, "full2": layers // 2}[name] * x["accum"] * 5
            assert v["checkpoint"] == [regions, regions], where  # recompute really ran (and only in training)
