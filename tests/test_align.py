"""sparsity.align (fast, no torch): GPU-friendly widths that are multiples of align, nearest to the paper's
targets, with s re-solved so the transformed layers stay exactly iso-FLOP; align=1 keeps the paper's widths;
executed FLOPs (masked zeros computed) for MFU and the GPU benchmark."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from sift_megatron.config import load_config
from sift_megatron.errors import SiftError
from sift_megatron.ift.flops import GPT2_VOCAB, executed_flops_per_token, flop_report, model_flops_per_token
from sift_megatron.ift.sizes import LINEARS, transformed_shape
from tests.conftest import REPO, run_sift

GPT3 = REPO / "configs" / "gpt3"
SMALL = GPT3 / "125m" / "dense.yaml"


def small(*overrides: str, size: str = "125m"):
    return load_config(GPT3 / size / "dense.yaml", list(overrides))


def _dense_dims(h: int, f: int) -> dict:
    return {"linear_qkv": (h, 3 * h), "linear_proj": (h, h), "linear_fc1": (h, f), "linear_fc2": (f, h)}


def _iso_slack(rep: dict) -> int:
    """Dense minus transformed FLOPs of the transformed layers: each sparse tensor floors its nnz, so an exactly
    iso-FLOP s' leaves 0 <= slack < 2 FLOPs per sparse tensor."""
    return rep["baseline"]["transformed_layers"] - rep["transformed"]["transformed_layers"]


@pytest.mark.parametrize("s, hidden, ffn", [(0.5, 1152, 4608), (0.75, 1536, 6144)])
def test_gpt3_small_sparse_wide_align64(s, hidden, ffn):
    """SW-50: the paper's 1092 (12 heads of 91) becomes 1152 = 12 x 96, the multiple of 12 x 16 nearest to
    768 sqrt(2) = 1086.1 (960 is farther); SW-75's 1536 = 12 x 128 is already aligned."""
    cfg = small("sparsity.family=wide", f"sparsity.s={s}", "sparsity.align=64")
    shape = transformed_shape(cfg)
    d, heads, f = shape.hidden_size, shape.num_attention_heads, shape.ffn_hidden_size
    assert (d, heads, f) == (hidden, 12, ffn)
    assert d % 64 == 0 and f % 64 == 0 and (d // heads) % 8 == 0
    target = 768 / math.sqrt(1 - s)
    unit = 12 * 16  # 12 heads x a head dim with 12 x head_dim % 64 == 0 and head_dim % 8 == 0
    assert abs(d - target) <= min(abs(d - unit - target), abs(d + unit - target))  # nearest admissible
    assert shape.sparsity == shape.exact_iso_sparsity == pytest.approx(1 - (768 / d) ** 2, abs=1e-12)
    assert shape.nominal_sparsity == s
    rep = flop_report(cfg)
    assert 0 <= _iso_slack(rep) < 2 * 4 * 12
    for name in LINEARS:  # ffn scales with hidden, so every linear is iso on its own
        assert rep["ratio"][name] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("align", [8, 64, 128])
@pytest.mark.parametrize("s", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("family", ["wide", "factorized", "doped"])
def test_aligned_widths_are_multiples_and_exactly_iso(family, s, align):
    cfg = small(f"sparsity.family={family}", f"sparsity.s={s}", f"sparsity.align={align}")
    shape = transformed_shape(cfg)
    if family == "wide":
        assert shape.hidden_size % align == 0 and shape.ffn_hidden_size % align == 0
    assert (shape.hidden_size // shape.num_attention_heads) % min(align, 8) == 0
    assert all(v % align == 0 for v in shape.inner.values())
    dims = _dense_dims(768, 3072)
    dense_work = sum(a * b for a, b in dims.values())
    if family == "factorized":  # s' = 1 - sum(D_in D_out) / sum(d_sf (D_in + D_out))
        expect = 1 - dense_work / sum(shape.inner[k] * (a + b) for k, (a, b) in dims.items())
        # the paper's target, rounded to the nearest multiple of align
        for k, (a, b) in dims.items():
            assert abs(shape.inner[k] - a * b / ((a + b) * (1 - s))) <= align / 2
    elif family == "doped":  # s' = sum(d_sd (D_in + D_out)) / sum(D_in D_out)
        expect = sum(shape.inner[k] * (a + b) for k, (a, b) in dims.items()) / dense_work
        for k, (a, b) in dims.items():
            assert abs(shape.inner[k] - s * a * b / (a + b)) <= align / 2
    else:
        expect = 1 - (768 / shape.hidden_size) ** 2
        assert shape.hidden_size >= 768 and shape.ffn_hidden_size == 4 * shape.hidden_size
    assert shape.sparsity == pytest.approx(expect, abs=1e-12) and 0 <= shape.sparsity < 1
    rep = flop_report(cfg)
    sparse_tensors = {"wide": 4, "factorized": 8, "doped": 4}[family]
    assert 0 <= _iso_slack(rep) < 2 * sparse_tensors * 12, rep["ratio"]["transformed_layers"]
    assert rep["ratio"]["transformed_layers"] == pytest.approx(1.0, abs=1e-6)


# Today's (paper) GPT-3 Small shapes: (hidden, heads, ffn, branches, inner dims), sparsity used = s.
PAPER = {
    ("wide", 0.5): (1092, 12, 4368, 1, ()), ("wide", 0.75): (1536, 12, 6144, 1, ()),
    ("wide", 0.9): (2436, 12, 9744, 1, ()),
    ("parallel", 0.5): (768, 12, 3072, 2, ()), ("parallel", 0.75): (768, 12, 3072, 4, ()),
    ("parallel", 0.9): (768, 12, 3072, 10, ()),
    ("factorized", 0.5): (768, 12, 3072, 1, (1152, 768, 1232, 1232)),
    ("factorized", 0.75): (768, 12, 3072, 1, (2304, 1536, 2464, 2464)),
    ("factorized", 0.9): (768, 12, 3072, 1, (5760, 3840, 6144, 6144)),
    ("doped", 0.5): (768, 12, 3072, 1, (288, 192, 304, 304)),
    ("doped", 0.75): (768, 12, 3072, 1, (432, 288, 456, 456)),
    ("doped", 0.9): (768, 12, 3072, 1, (512, 344, 552, 552)),
}


@pytest.mark.parametrize("family, s", list(PAPER))
def test_align1_keeps_the_paper_widths(family, s):
    cfg = small(f"sparsity.family={family}", f"sparsity.s={s}", "sparsity.align=1")
    shape = transformed_shape(cfg)
    got = (shape.hidden_size, shape.num_attention_heads, shape.ffn_hidden_size, shape.branches,
           tuple(shape.inner[k] for k in LINEARS if k in shape.inner))
    assert got == PAPER[family, s] and shape.sparsity == s
    assert shape == transformed_shape(small(f"sparsity.family={family}", f"sparsity.s={s}"))  # the default
    rep = flop_report(cfg)
    assert rep["align"] == 1 and "paper" not in rep and "paper" not in rep["shape"]


def test_parallel_and_dense_ignore_align():
    for family, s in (("parallel", 0.75), ("dense", 0.0)):
        base = transformed_shape(small(f"sparsity.family={family}", f"sparsity.s={s}"))
        assert transformed_shape(small(f"sparsity.family={family}", f"sparsity.s={s}", "sparsity.align=64")) == base


@pytest.mark.parametrize("family, s", [("wide", 0.5), ("wide", 0.75), ("factorized", 0.5), ("doped", 0.75)])
def test_aligned_widths_do_not_depend_on_tp(family, s):
    """The same model (and checkpoint) at TP=1, 2, 4, 8 (350M: 16 heads; 125M's 12 do not split over 8)."""
    for size, tps in (("350m", (1, 2, 4, 8)), ("125m", (1, 2, 4))):
        shapes = {tp: transformed_shape(small(f"sparsity.family={family}", f"sparsity.s={s}", "sparsity.align=64",
                                              f"parallel.tensor={tp}", size=size)) for tp in tps}
        ref = shapes[1]
        assert ref.hidden_size % 64 == 0 and all(v % 64 == 0 for v in ref.inner.values())
        for tp, shape in shapes.items():
            assert shape == ref, (size, tp)
            assert shape.num_attention_heads % tp == 0 and shape.ffn_hidden_size % tp == 0


def test_keep_head_dim_aligned():
    """keep_head_dim keeps head dim 64 and picks the head count nearest to the target (a multiple of TP)."""
    for tp in (1, 2, 4):
        cfg = small("sparsity.family=wide", "sparsity.s=0.5", "sparsity.head_policy=keep_head_dim",
                    "sparsity.align=64", f"parallel.tensor={tp}")
        shape = transformed_shape(cfg)
        heads = shape.num_attention_heads
        assert shape.hidden_size == 64 * heads and heads % tp == 0 and shape.hidden_size % 64 == 0
        target = 768 / math.sqrt(0.5) / 64  # 16.97 heads
        assert abs(heads - target) <= min(abs(heads - tp - target), abs(heads + tp - target))
        assert flop_report(cfg)["ratio"]["transformed_layers"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("value", ["0", "-8", "3", "12", "1.5", "true", "x"])
def test_bad_align_is_a_one_line_error(value):
    with pytest.raises(SiftError) as e:
        small("sparsity.family=wide", "sparsity.s=0.5", f"sparsity.align={value}")
    assert "sparsity.align" in str(e.value) and "\n" not in str(e.value)


def test_bad_align_on_an_unvalidated_config():
    """The planner builds configs that never went through load_config: transformed_shape checks align too."""
    cfg = small("sparsity.family=wide", "sparsity.s=0.5")
    with pytest.raises(SiftError, match="sparsity.align must be 1, 2, 4 or a positive multiple of 8, got 12"):
        dataclasses.replace(cfg.sparsity, align=12)
    cfg.sparsity.align = 25  # set after construction
    with pytest.raises(SiftError, match="got 25"):
        transformed_shape(cfg)


@pytest.mark.parametrize("overrides, message", [
    # factorized s=0 at align 512: every inner dim rounds to 512, below the iso target: s' < 0
    (["sparsity.family=factorized", "sparsity.s=0.0", "sparsity.align=512"], "outside [0, 1)"),
    # doped s=0.95 at align 1024: the rank-1024 parts alone cost more than the dense layer: s' >= 1
    (["sparsity.family=doped", "sparsity.s=0.95", "sparsity.align=1024"], "outside [0, 1)"),
    # keep_head_dim cannot align a head dim of 12 to 8
    (["model.hidden_size=96", "model.num_attention_heads=8", "sparsity.family=wide", "sparsity.s=0.5",
      "sparsity.head_policy=keep_head_dim", "sparsity.align=8"], "keeps the head dim 12"),
])
def test_unsizable_alignment_is_a_one_line_error(overrides, message):
    with pytest.raises(SiftError) as e:
        transformed_shape(small(*overrides))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_executed_flops_count_masked_zeros():
    """Issue 14's benchmark ratios at GPT-3 125M, n=2048, paper widths: executed SW-50 / dense 1.74, SW-75 3.05;
    checked against the closed form L (2 x 12 h^2 + 4 n h) + 2 h V (ffn = 4h, attention full n x n)."""
    L, n, V = 12, 2048, GPT2_VOCAB

    def closed_form(h):
        return L * (2 * 12 * h * h + 4 * n * h) + 2 * h * V

    dense = small()
    assert executed_flops_per_token(dense) == model_flops_per_token(dense) == 3 * closed_form(768)
    ratios = {}
    for s, align, h in ((0.5, 1, 1092), (0.75, 1, 1536), (0.5, 64, 1152), (0.75, 64, 1536)):
        cfg = small("sparsity.family=wide", f"sparsity.s={s}", f"sparsity.align={align}")
        executed = executed_flops_per_token(cfg)
        assert executed == 3 * closed_form(h)
        ratios[s, align] = executed / executed_flops_per_token(dense)
        rep = flop_report(cfg)
        assert rep["ratio"]["executed_total"] == pytest.approx(ratios[s, align], rel=1e-12)
        assert model_flops_per_token(cfg) == 3 * rep["transformed"]["total"] < executed
    assert ratios[0.5, 1] == pytest.approx(1.74, abs=5e-3) and ratios[0.75, 1] == pytest.approx(3.05, abs=5e-3)
    assert ratios[0.75, 64] == ratios[0.75, 1] and ratios[0.5, 64] == pytest.approx(1.895, abs=5e-4)
    # --seq counts attention at another length, the same way in both
    assert executed_flops_per_token(dense, seq=1024) == 3 * (closed_form(768) - L * 4 * 1024 * 768)


def test_shipped_gpt3_configs_state_their_widths():
    """Every Sparse Wide / factorized / doped GPT-3 config names its align; each *_align64 variant is its paper
    file with align 64 only (same recipe and layout)."""
    for path in sorted(GPT3.rglob("sparse_*.yaml")):
        cfg = load_config(path)
        if cfg.sparsity.family == "parallel":
            continue
        assert f"align: {cfg.sparsity.align}" in path.read_text(), path
        if path.stem.endswith("_align64"):
            paper = load_config(path.with_name(path.stem.removesuffix("_align64") + ".yaml"))
            assert cfg.sparsity.align == 64 and paper.sparsity.align == 1
            assert dataclasses.replace(cfg, sparsity=paper.sparsity, train=paper.train) == paper


def test_cli_flops_shows_paper_and_aligned_widths():
    path = str(GPT3 / "125m" / "sparse_wide_s50_static_align64.yaml")
    table = run_sift(["flops", path]).stdout
    assert "widths: paper -> aligned (sparsity.align 64): hidden 1092 -> 1152, head dim 91 -> 96, ffn 4368 -> 4608" \
        in table and "sparsity used 0.5000 -> 0.5556" in table and "executed" in table
    rep = json.loads(run_sift(["flops", path, "--json"]).stdout)
    assert rep["align"] == 64
    assert (rep["shape"]["paper"]["hidden_size"], rep["shape"]["transformed"]["hidden_size"]) == (1092, 1152)
    assert (rep["shape"]["paper"]["head_dim"], rep["shape"]["transformed"]["head_dim"]) == (91, 96)
    assert rep["shape"]["paper"]["sparsity"] == 0.5
    assert rep["shape"]["transformed"]["sparsity"] == pytest.approx(1 - (768 / 1152) ** 2)
    assert rep["paper"]["ratio"]["executed_total"] == pytest.approx(1.74, abs=5e-3)
    assert rep["ratio"]["executed_total"] == pytest.approx(1.895, abs=5e-4)
    assert rep == json.loads(json.dumps(flop_report(load_config(path))))  # the CLI prints flop_report
