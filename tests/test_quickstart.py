"""The main job, shortened (same code path, fewer steps and a smaller corpus): every artefact exists and is valid."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_sift


@pytest.mark.slow
def test_quickstart_short(tmp_path):
    out = tmp_path / "qs"
    proc = run_sift(["quickstart", "--out", str(out), "--steps", "8", "--corpus-size", "1MB", "--vocab-size", "600"],
                    timeout=900)
    assert "| dense |" in proc.stdout and "| sparse_wide_s75_rigl |" in proc.stdout
    summary = (out / "SUMMARY.md").read_text()
    assert "| sparse_wide_s50_static |" in summary and "Best Sparse-IFT run" in summary
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results] == ["dense", "sparse_wide_s50_static", "sparse_wide_s75_rigl",
                                            "dense_same_total_flops"]
    for r in results:
        assert r["val_loss"] > 0 and r["active"] <= r["stored"]
    dense, sw50 = results[0], results[1]
    assert sw50["flops_transformed"] == pytest.approx(dense["flops_transformed"], rel=0.02)  # iso-FLOP
    # the dense-frontier run: dense widened to the best sparse run's whole-model training FLOPs (same tokens),
    # to the nearest multiple of the heads (4): within one width step of it
    best = min(results[1:3], key=lambda r: r["val_loss"])
    iso_total = results[3]
    assert iso_total["hidden_size"] > dense["hidden_size"] and iso_total["hidden_size"] % 4 == 0
    assert iso_total["train_flops"] == pytest.approx(best["train_flops"], rel=0.08)
    assert iso_total["flops_transformed"] > dense["flops_transformed"]
    assert "at equal whole-model training FLOPs (dense_same_total_flops" in summary

    from PIL import Image

    with Image.open(out / "loss_curves.png") as im:
        assert im.size[0] > 200 and im.size[1] > 100

    best = best["name"]
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out / "hf" / best)
    assert model.config.vocab_size >= 600
    spectral = json.loads((out / "spectral" / f"{best}.json").read_text())
    assert spectral  # per-layer metrics of the exported model's masks
    assert (out / "spectral" / f"{best}.png").stat().st_size > 0
