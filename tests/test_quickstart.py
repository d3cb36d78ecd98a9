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
    assert [r["name"] for r in results] == ["dense", "sparse_wide_s50_static", "sparse_wide_s75_rigl"]
    for r in results:
        assert r["val_loss"] > 0 and r["active"] <= r["stored"]
    dense, sw50 = results[0], results[1]
    assert sw50["flops_transformed"] == pytest.approx(dense["flops_transformed"], rel=0.02)  # iso-FLOP

    from PIL import Image

    with Image.open(out / "loss_curves.png") as im:
        assert im.size[0] > 200 and im.size[1] > 100

    best = min(results[1:], key=lambda r: r["val_loss"])["name"]
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out / "hf" / best)
    assert model.config.vocab_size >= 600
    spectral = json.loads((out / "spectral" / f"{best}.json").read_text())
    assert spectral  # per-layer metrics of the exported model's masks
    assert (out / "spectral" / f"{best}.png").stat().st_size > 0
