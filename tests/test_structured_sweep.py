"""benchmarks/structured_sweep.py: the statistics and verdict on given numbers, the results section in a shared
file, and a shortened end-to-end run (2 steps, one seed, unstructured vs 16 x 16 tiles; 64 x 64 does not fit)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import REPO


def _mod():
    spec = importlib.util.spec_from_file_location("structured_sweep", REPO / "benchmarks" / "structured_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_settings_stats_and_verdict():
    sw = _mod()
    names = sw.settings([1, 16, 32, 64])
    assert len(names) == 1 + 2 * 2 * 4 + 2  # dense, (s, algorithm, block), 2:4 at s=0.5 static and RigL
    assert "sparsity.pattern=2:4" in names["wide_s50_rigl_2of4"] and "dst.algorithm=rigl" in names["wide_s50_rigl_2of4"]
    assert not any("sparsity.pattern" in o for o in names["wide_s75_static_b1"])
    stats = sw.summarise({"wide_s50_static_b1": [3.0, 3.2], "wide_s50_static_b16": [3.1, 3.3],
                          "wide_s50_static_b32": [3.4, 3.6], "wide_s50_static_b64": [3.05, 3.25], "dense": [3.5]})
    assert stats["wide_s50_static_b1"]["mean"] == pytest.approx(3.1)
    assert stats["wide_s50_static_b1"]["std"] == pytest.approx(0.1414, abs=1e-4) and stats["dense"]["std"] == 0.0
    v = sw.verdict(stats)["wide_s50_static"]
    # b16: +0.1 within the pooled std 0.1414; b32: +0.4 outside; b64: +0.05 within -> the largest within is 64
    assert [g["within"] for g in v["blocks"].values()] == [True, False, True] and list(v["blocks"]) == [16, 32, 64]
    assert v["largest_block_within_1std"] == 64
    text = sw.markdown(stats, {"wide_s75_static_b64": "does not fit"}, sw.verdict(stats), ["## head"])
    assert "| wide_s50_static_b16 | 2 | 3.2000 | 0.1414 | +0.1000 | -0.3000 |" in text
    assert "| wide_s75_static_b64 | 0 | not run: does not fit |" in text
    assert "- wide_s50_static: block 64" in text


def test_results_section_replaces_only_its_own_part(tmp_path):
    sw = _mod()
    f = tmp_path / "RESULTS.md"
    f.write_text("# Reproduction\n\nother results\n")
    sw.write_section(f, "first\n")
    sw.write_section(f, "second\n")
    assert f.read_text() == f"# Reproduction\n\nother results\n{sw.MARK}\nsecond\n{sw.MARK}\n"


@pytest.mark.slow
def test_shortened_sweep_end_to_end(tmp_path):
    sw = _mod()
    out, results = tmp_path / "sweep", tmp_path / "RESULTS.md"
    rc = sw.main(["--steps", "2", "--seeds", "0", "--blocks", "1,16,64", "--nproc", "1", "--corpus-size", "1MB",
                  "--vocab-size", "512", "--out", str(out), "--results", str(results),
                  "--only", "wide_s75_static_b1,wide_s75_static_b16,wide_s75_static_b64"])
    assert rc == 0
    r = json.loads((out / "results.json").read_text())
    assert sorted(r["losses"]) == ["wide_s75_static_b1", "wide_s75_static_b16"]
    assert all(len(v) == 1 and 0 < v[0] < 10 for v in r["losses"].values())
    assert "head dim 32" in r["skipped"]["wide_s75_static_b64"]  # 64 x 64 tiles do not fit the tiny model
    # the masks the b16 run trained with are whole 16 x 16 tiles
    from safetensors.torch import load_file

    masks = load_file(out / "runs" / "wide_s75_static_b16_seed0" / "sparse_masks.safetensors")
    m = masks["decoder.layers.0.mlp.linear_fc1.mask"].bool()
    tiles = m.reshape(m.shape[0] // 16, 16, m.shape[1] // 16, 16).permute(0, 2, 1, 3).flatten(2)
    assert bool((tiles.any(-1) == tiles.all(-1)).all())
    assert (out / "structured_sweep.png").stat().st_size > 0
    assert "wide_s75_static: block" in results.read_text() and sw.MARK in results.read_text()
