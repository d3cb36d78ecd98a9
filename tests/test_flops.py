"""FLOP accounting and family sizes (fast, no torch): iso-FLOP transformed layers for every family, the Sparse
Wide widths of the Cerebras GPT-3 Small configs, the spec's FLOPs/token figures, every shipped config."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sift_megatron.config import Config, load_config
from sift_megatron.errors import SiftError
from sift_megatron.ift.flops import flop_report, nnz_for
from sift_megatron.ift.plan import plan_report
from sift_megatron.ift.sizes import transformed_shape
from tests.conftest import REPO, run_sift

GPT3 = REPO / "configs" / "gpt3"
SMALL = GPT3 / "125m" / "dense.yaml"
# The spec's GPT-3 Small figures (section 1.1): forward FLOPs/token at n=1024, V=50257.
SPEC_N1024 = ["model.seq_length=1024", "model.max_position_embeddings=1024", "model.vocab_size=50257"]


def small(*overrides: str) -> Config:
    return load_config(SMALL, list(overrides))


@pytest.mark.parametrize("s", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("family", ["wide", "parallel", "factorized", "doped"])
def test_transformed_layers_are_iso_flop(family, s):
    rep = flop_report(small(f"sparsity.family={family}", f"sparsity.s={s}"))
    assert rep["ratio"]["transformed_layers"] == pytest.approx(1.0, abs=0.02)
    for name in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"):
        assert rep["ratio"][name] == pytest.approx(1.0, abs=0.02), name
    if family != "wide":  # only Sparse Wide widens attention and the LM head
        assert rep["ratio"]["total"] == pytest.approx(1.0, abs=0.02)


def test_sparse_wide_gpt3_small_widths_keep_heads():
    for s, hidden, ffn in ((0.5, 1092, 4368), (0.75, 1536, 6144)):
        for tp in (1, 2, 4):  # the width does not depend on TP (megatron needs heads % TP only)
            shape = transformed_shape(small("sparsity.family=wide", f"sparsity.s={s}", f"parallel.tensor={tp}"))
            assert (shape.hidden_size, shape.num_attention_heads, shape.ffn_hidden_size) == (hidden, 12, ffn)
    shape = transformed_shape(small("sparsity.family=wide", "sparsity.s=0.5", "sparsity.exact_iso=true"))
    assert shape.sparsity == pytest.approx(1 - (768 / 1092) ** 2) == pytest.approx(0.5054, abs=1e-4)
    assert flop_report(small("sparsity.family=wide", "sparsity.s=0.5", "sparsity.exact_iso=true"))[
        "ratio"]["transformed_layers"] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("s", [0.5, 0.75, 0.9])
def test_keep_head_dim_sizes_split_over_tp(s, tp):
    cfg = small("sparsity.family=wide", f"sparsity.s={s}", "sparsity.head_policy=keep_head_dim",
                f"parallel.tensor={tp}", "sparsity.exact_iso=true")
    shape = transformed_shape(cfg)
    heads, d = shape.num_attention_heads, shape.hidden_size
    assert d == heads * 64 and heads % tp == 0 and d % (heads * tp) == 0 and shape.ffn_hidden_size % tp == 0
    assert d >= 768 / (1 - s) ** 0.5  # never narrower than the iso width
    assert flop_report(cfg)["ratio"]["transformed_layers"] == pytest.approx(1.0, abs=0.02)
    if tp == 1 and s == 0.5:
        assert (d, heads) == (1088, 17)


def test_spec_flops_per_token_gpt3_small_n1024():
    dense = flop_report(small(*SPEC_N1024))["transformed"]
    assert dense["transformed_layers"] == pytest.approx(169.9e6, rel=5e-3)
    assert dense["attention"] == pytest.approx(37.8e6, rel=5e-3)
    assert dense["lm_head"] == pytest.approx(77.2e6, rel=5e-3)
    assert dense["total"] == pytest.approx(284.8e6, rel=5e-3)
    for s, total in ((0.5, 335.2e6), (0.75, 399.8e6)):
        rep = flop_report(small(*SPEC_N1024, "sparsity.family=wide", f"sparsity.s={s}"))
        assert rep["transformed"]["total"] == pytest.approx(total, rel=5e-3)
        assert rep["baseline"]["total"] == pytest.approx(284.8e6, rel=5e-3)
    # --seq overrides the attention length only
    assert flop_report(small(), seq=1024)["transformed"]["attention"] == pytest.approx(37.8e6, rel=5e-3)


def test_spec_parameter_counts_gpt3_small():
    """Spec 1.1: stored linear 84.9M -> 171.7M -> 339.7M, embeddings 39.4M -> 56.0M -> 78.8M (n=1024)."""
    for overrides, linear, emb in (([], 84.9e6, 39.4e6), (["sparsity.family=wide", "sparsity.s=0.5"], 171.7e6, 56.0e6),
                                   (["sparsity.family=wide", "sparsity.s=0.75"], 339.7e6, 78.8e6)):
        p = flop_report(small(*SPEC_N1024, *overrides))["params"]["transformed"]
        g = p["groups"]
        assert g["transformed_linears"]["stored"] == pytest.approx(linear, rel=5e-3)
        assert g["word_embedding"]["stored"] + g["position_embedding"]["stored"] == pytest.approx(emb, rel=5e-3)
        assert p["active"] <= p["stored"]


def test_active_counts_are_exact_nnz():
    rep = flop_report(small("sparsity.family=wide", "sparsity.s=0.75"))
    h, f = 1536, 6144
    per_layer = sum(nnz_for(n, 0.25) for n in (3 * h * h, h * h, h * f, f * h))
    p = rep["params"]["transformed"]
    assert p["sparse_nonzeros"] == 12 * per_layer
    assert p["groups"]["transformed_linears"]["active"] == 12 * per_layer
    assert rep["transformed"]["transformed_layers"] == 2 * 12 * per_layer  # 2 FLOPs per nonzero and token
    base = rep["params"]["baseline"]
    assert base["stored"] == base["active"] and rep["params"]["baseline"]["sparse_elements"] == 0


def test_family_structure():
    par = flop_report(small("sparsity.family=parallel", "sparsity.s=0.75"))
    assert par["shape"]["transformed"]["branches"] == 4
    assert par["params"]["transformed"]["sparse_elements"] == 4 * par["params"]["baseline"]["groups"][
        "transformed_linears"]["stored"]
    doped = flop_report(small("sparsity.family=doped", "sparsity.s=0.5"))
    low = doped["params"]["transformed"]["groups"]["low_rank"]
    assert low["stored"] == low["active"] > 0  # dense, unmasked U V
    assert doped["shape"]["transformed"]["inner"]["linear_proj"] == 192  # 0.5 * 768 * 768 / 1536
    fac = flop_report(small("sparsity.family=factorized", "sparsity.s=0.5"))
    assert fac["shape"]["transformed"]["inner"]["linear_proj"] == 768  # 768 / (2 (1 - s))
    assert fac["params"]["transformed"]["groups"]["norms"]["stored"] > fac["params"]["baseline"]["groups"]["norms"][
        "stored"]  # the LayerNorm between U and V


def test_report_is_json_and_vocab_resolution(tmp_path):
    rep = flop_report(small("sparsity.family=wide", "sparsity.s=0.5", "dst.algorithm=rigl"))
    assert json.loads(json.dumps(rep)) == rep
    assert rep["vocab_size"] == 50257 and rep["padded_vocab_size"] == 50304 and "assumed" in rep["vocab_source"]
    assert rep["transformed"]["training"]["per_token"] > 3 * rep["transformed"]["total"]  # RigL's dense steps
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "sift_tokenizer.json").write_text(json.dumps({"vocab_size": 32000}))
    rep = flop_report(small(f"data.tokenizer={tok}"))
    assert (rep["vocab_size"], rep["padded_vocab_size"]) == (32000, 32000)
    assert flop_report(small("model.vocab_size=1000"), vocab_size=500)["vocab_size"] == 500


@pytest.mark.parametrize("overrides, message", [
    (["sparsity.s=1.0"], "sparsity.s must be in [0, 1)"),
    (["sparsity.s=-0.1"], "sparsity.s must be in [0, 1)"),
    (["sparsity.family=narrow"], "sparsity.family must be one of"),
    (["parallel.tensor=8"], "not divisible by parallel.tensor 8"),
])
def test_one_line_errors_from_config(overrides, message):
    with pytest.raises(SiftError) as e:
        flop_report(small(*overrides))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("change, message", [
    ({"s": 1.0}, "sparsity.s must be in [0, 1)"),
    ({"family": "narrow"}, "sparsity.family must be one of"),
])
def test_one_line_errors_from_unvalidated_config(change, message):
    """transformed_shape guards itself: the planner builds configs that never went through validate."""
    cfg = small()
    cfg = dataclasses.replace(cfg, sparsity=dataclasses.replace(cfg.sparsity, **({"family": "wide", "s": 0.5} | change)))
    with pytest.raises(SiftError) as e:
        transformed_shape(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_sizes_that_cannot_split_over_tp():
    cfg = small("sparsity.family=wide", "sparsity.s=0.5")
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, tensor=8))  # 12 heads / 8
    with pytest.raises(SiftError) as e:
        transformed_shape(cfg)
    assert "cannot be split over parallel.tensor 8" in str(e.value) and "\n" not in str(e.value)


def _shipped_configs() -> list:
    return sorted(p for p in (REPO / "configs").rglob("*.yaml") if "deepspeed" not in p.parts)


GPUS = {"125m": 8, "350m": 8, "760m": 8, "1.3b": 8, "2.7b": 8, "6.7b": 16, "13b": 32, "175b": 1024}


@pytest.mark.parametrize("path", _shipped_configs(), ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_config_validates_and_plans(path):
    cfg = load_config(path)
    rep = flop_report(cfg)
    assert rep["transformed"]["total"] > 0 and json.dumps(rep)
    size = path.parent.name
    gpus = GPUS.get(size, cfg.parallel.tensor * cfg.parallel.pipeline)
    plan = plan_report(cfg, gpus)
    own = plan["config_layout"]
    assert not own["problems"], own["problems"]
    if size in GPUS and path.name != "common.yaml":
        # the shipped layout is the one `sift plan` sized for nodes of 8 x 80 GB
        assert own["fits"] or (size == "175b" and own["fits_with_recompute"]), (own["total_gb"], own["overrides"])
        if cfg.sparsity.family in ("wide", "dense"):
            assert rep["ratio"]["transformed_layers"] == pytest.approx(1.0, abs=0.02)


def test_gpt3_family_shapes():
    expect = {"125m": (12, 768, 12), "350m": (24, 1024, 16), "760m": (24, 1536, 16), "1.3b": (24, 2048, 16),
              "2.7b": (32, 2560, 32), "6.7b": (32, 4096, 32), "13b": (40, 5120, 40), "175b": (96, 12288, 96)}
    for size, (layers, d, heads) in expect.items():
        for name in ("dense", "sparse_wide_s50_static", "sparse_wide_s75_rigl"):
            cfg = load_config(GPT3 / size / f"{name}.yaml")
            m = cfg.model
            assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length) == (layers, d, heads, 2048)
            assert cfg.train.global_batch_size * 2048 * cfg.lr_schedule.warmup_steps == pytest.approx(375e6, rel=0.01)
            assert cfg.optimizer.min_lr == pytest.approx(cfg.optimizer.lr / 10)
        rigl = load_config(GPT3 / size / "sparse_wide_s75_rigl.yaml")
        assert (rigl.sparsity.family, rigl.sparsity.s, rigl.dst.algorithm, rigl.dst.interval, rigl.dst.end,
                rigl.dst.drop_fraction, rigl.dst.decay) == ("wide", 0.75, "rigl", 100, 0.75, 0.3, "cosine")
        static = load_config(GPT3 / size / "sparse_wide_s50_static.yaml")
        assert (static.sparsity.family, static.sparsity.s, static.dst.algorithm) == ("wide", 0.5, "static")


def test_wikitext103_recipe_configs():
    """configs/wikitext103: the released GPT-3 Small WikiText-103 Sparse-IFT recipe (spec 3.3): seq 1024, 512 x
    21,511 steps, warm-up 2,151 then cosine over 19,360; SW-50 static at d=1092, SW-75 RigL at d=1536 with an
    update every 500 steps that stops at 80 % of training (34 updates). Whole-model FLOPs x1.18 / x1.40 (spec 1.1)."""
    from sift_megatron.dst.schedule import DSTSchedule

    wt = REPO / "configs" / "wikitext103"
    for name, (d, ratio) in {"dense": (768, 1.0), "sparse_wide_s50_static": (1092, 1.177),
                             "sparse_wide_s75_rigl": (1536, 1.404)}.items():
        cfg = load_config(wt / f"{name}.yaml")
        m, t, lr = cfg.model, cfg.train, cfg.lr_schedule
        assert (m.num_layers, m.num_attention_heads, m.seq_length, t.global_batch_size, t.steps) == (12, 12, 1024, 512,
                                                                                                 21511)
        assert (lr.warmup_steps, lr.decay_steps, cfg.optimizer.lr, cfg.optimizer.min_lr) == (2151, 19360, 6e-4, 6e-5)
        assert (m.hidden_dropout, m.attention_dropout, cfg.optimizer.clip_grad) == (0.1, 0.1, 1.0)
        rep = flop_report(cfg, vocab_size=50257)
        assert transformed_shape(cfg).hidden_size == d
        assert rep["ratio"]["total"] == pytest.approx(ratio, abs=2e-3)
    rigl = load_config(wt / "sparse_wide_s75_rigl.yaml")
    d = rigl.dst
    assert (rigl.sparsity.s, d.algorithm, d.interval, d.drop_fraction, d.decay) == (0.75, "rigl", 500, 0.3, "cosine")
    sched = DSTSchedule(interval=d.interval, begin=d.begin, end=d.end, total_steps=rigl.train.steps)
    updates = [s for s in range(1, rigl.train.steps + 1) if sched.is_update_step(s)]
    assert len(updates) == 34 and updates[-1] == 17000 and d.end == int(0.8 * rigl.train.steps) + 1


def test_cli_flops_json_and_table():
    proc = run_sift(["flops", str(GPT3 / "125m" / "sparse_wide_s50_static.yaml"), "--json", "--seq", "1024",
                     "model.vocab_size=50257"])
    rep = json.loads(proc.stdout)
    assert rep["shape"]["transformed"]["hidden_size"] == 1092
    assert rep["transformed"]["total"] == pytest.approx(335.2e6, rel=5e-3)
    proc = run_sift(["flops", str(SMALL), "sparsity.family=doped", "sparsity.s=0.9"])
    assert "transformed-layer FLOP ratio" in proc.stdout and "whole-model FLOP ratio" in proc.stdout
    proc = run_sift(["flops", str(SMALL), "sparsity.s=1.5", "sparsity.family=wide"], check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "sparsity.s must be in [0, 1)" in proc.stderr and "Traceback" not in proc.stderr


TINY = REPO / "configs" / "tiny" / "dense.yaml"


def test_structured_flops_count_whole_tiles_and_kernel_work():
    """Block masks keep nnz_for(tiles, 1-s) whole tiles per tensor (per Q, K, V): Sparse Wide s=0.6 on the tiny
    model is hidden 104 (head dim 26), so proj is 52 x 52 tiles of 2 x 2 and keeps floor(0.4 x 2704) = 1081 tiles
    = 4324 nonzeros (unstructured: floor(0.4 x 10816) = 4326). A block-sparse kernel executes the nonzero tiles;
    the masked-dense `executed` line is unchanged."""
    base = ["sparsity.family=wide", "sparsity.s=0.6"]
    un = flop_report(load_config(TINY, base))
    blk = flop_report(load_config(TINY, [*base, "sparsity.pattern=block", "sparsity.block=2"]))
    assert transformed_shape(load_config(TINY, base)).hidden_size == 104 and blk["pattern"] == "block 2x2"
    assert un["transformed"]["per_layer"]["linear_proj"] == 2 * nnz_for(104 * 104, 0.4) == 2 * 4326
    assert blk["transformed"]["per_layer"]["linear_proj"] == 2 * 1081 * 4
    assert blk["transformed"]["per_layer"]["linear_qkv"] == 3 * 2 * 1081 * 4  # Q, K and V: 2704 tiles each
    assert blk["transformed"]["per_layer"]["linear_fc1"] == 2 * nnz_for(208 * 52, 0.4) * 4  # [416, 104]
    t = blk["transformed"]
    assert t["kernel"] == {"transformed_layers": t["transformed_layers"], "total": t["total"]}
    assert t["executed"] == un["transformed"]["executed"]  # masked dense runs every element either way
    assert un["transformed"]["kernel"] == un["transformed"]["executed"] and un["pattern"] == "unstructured"
    assert blk["ratio"]["kernel_total"] == pytest.approx(t["total"] / blk["baseline"]["total"])
    assert blk["params"]["transformed"]["sparse_nonzeros"] == t["transformed_layers"] // 2


def test_n_m_flops_and_errors():
    """2:4 keeps exactly half of every tensor and sparse tensor cores run half the dense GEMM; 1:4 has no
    hardware kernel (masked dense); a sparsity other than 1 - N/M, or a block that does not divide a tensor, is
    a one-line error."""
    two = flop_report(load_config(TINY, ["sparsity.family=parallel", "sparsity.s=0.5", "sparsity.pattern=2:4"]))
    t = two["transformed"]
    assert t["per_layer"]["linear_fc1"] == 2 * 2 * (256 * 64 // 2)  # 2 branches, half of each [256, 64]
    assert t["kernel"]["total"] == t["total"] < t["executed"]["total"]
    one = flop_report(load_config(TINY, ["sparsity.family=parallel", "sparsity.s=0.75", "sparsity.pattern=1:4"]))
    assert one["transformed"]["kernel"] == one["transformed"]["executed"]
    assert one["transformed"]["per_layer"]["linear_proj"] == 4 * 2 * (64 * 64 // 4)
    with pytest.raises(SiftError, match=r"sparsity.pattern=2:4 keeps density 2/4: the sparsity used must be 0.5, "
                                        r"got 0.75"):
        flop_report(load_config(TINY, ["sparsity.family=parallel", "sparsity.s=0.75", "sparsity.pattern=2:4"]))
    with pytest.raises(SiftError, match=r"sparsity.block=16 does not fit the wide linear_qkv sparse tensor: "
                                        r"logical shape \(312, 104\)"):
        flop_report(load_config(TINY, ["sparsity.family=wide", "sparsity.s=0.6", "sparsity.pattern=block",
                                       "sparsity.block=16"]))


def test_cli_flops_shows_the_kernel_line():
    out = run_sift(["flops", str(TINY), "sparsity.family=wide", "sparsity.s=0.75", "sparsity.pattern=block",
                    "sparsity.block=16"]).stdout
    assert "block 16x16 masks" in out and "block 16x16 kernel executes" in out
    assert "block 16x16 kernel / dense 1.2000" in out  # tiles divide exactly: the useful FLOPs, whole model 1.2x


@pytest.mark.parametrize("overrides, fits, message", [
    (["sparsity.family=wide", "sparsity.s=0.75", "sparsity.pattern=block", "sparsity.block=64"], "sparsity.block=32",
     r"sparsity.block=64 does not fit the wide linear_qkv sparse tensor: logical shape \(384, 128\), local shard "
     r"\(96, 128\) at parallel.tensor=4, head dim 32 \(each shard's dims and the head dim must be multiples"),
    (["sparsity.family=factorized", "sparsity.s=0.5", "sparsity.pattern=block", "sparsity.block=16"],
     "sparsity.block=2",
     r"sparsity.block=16 does not fit the factorized linear_qkv sparse tensor: logical shape \(96, 64\), local "
     r"shard \(24, 64\) at parallel.tensor=4"),
    (["sparsity.family=wide", "sparsity.s=0.5", "sparsity.pattern=2:4"], "sparsity.family=parallel",
     r"sparsity.pattern=2:4 does not fit the wide linear_proj sparse tensor: logical shape \(92, 92\), local shard "
     r"\(92, 23\) at parallel.tensor=4 \(each shard's input dim must be a multiple of 4\)"),
])
def test_structured_masks_that_do_not_fit_the_tp_shards_are_rejected_before_training(overrides, fits, message,
                                                                                     tmp_path):
    """Tiles / N:M groups never straddle a TP shard (column-parallel shards split the output dim, row-parallel
    the input dim; Q, K, V rows come per head): `sift check` / `sift train` say so before anything is built;
    `fits` is the nearest setting that does fit at TP=4."""
    from sift_megatron.ift.flops import check_pattern_fits

    with pytest.raises(SiftError, match=message):
        check_pattern_fits(load_config(TINY, [*overrides, "parallel.tensor=4"]))
    check_pattern_fits(load_config(TINY, [*overrides, fits, "parallel.tensor=4"]))
    proc = run_sift(["check", str(TINY), *overrides, "parallel.tensor=4", "train.global_batch_size=16",
                     f"train.out_dir={tmp_path}", "--world-size", "4"], check=False)
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0 and "does not fit" in proc.stderr


def test_dense_width_at_a_sparse_models_whole_model_training_flops():
    """The quickstart's dense-frontier run: the dense width (a multiple of the heads) whose whole-model training
    FLOPs per token are nearest to the sparse model's, RigL's dense-gradient steps included."""
    from sift_megatron.ift.flops import dense_width_for_training_flops, training_flops_per_token

    base = ["model.vocab_size=4096", "train.steps=500"]
    tiny = REPO / "configs" / "tiny" / "quickstart.yaml"
    sw75 = load_config(tiny, [*base, "sparsity.family=wide", "sparsity.s=0.75", "sparsity.exact_iso=true",
                              "dst.algorithm=rigl", "dst.interval=25"])
    target = training_flops_per_token(sw75)
    assert target == flop_report(sw75)["transformed"]["training"]["per_token"] > 3 * flop_report(sw75)["transformed"]["total"]
    h = dense_width_for_training_flops(sw75, target)
    cost = {w: training_flops_per_token(load_config(tiny, [*base, f"model.hidden_size={w}"])) for w in (h - 4, h, h + 4)}
    assert h % 4 == 0 and cost[h - 4] < target < cost[h + 4]
    assert abs(cost[h] - target) == min(abs(c - target) for c in cost.values())
    assert cost[h] == 3 * flop_report(load_config(tiny, [*base, f"model.hidden_size={h}"]))["transformed"]["total"]
    with pytest.raises(SiftError, match="must be > 0"):
        dense_width_for_training_flops(sw75, 0)
