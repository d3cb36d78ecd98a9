"""Training reads Megatron .bin/.idx prefixes through megatron's GPTDataset: a weighted blend with a split, and
separate validation prefixes; bad prefixes are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import REPO, run_sift

TINY = str(REPO / "configs" / "tiny" / "dense.yaml")


def _corpus(prefix, seed: int, docs: int = 60) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for _ in range(docs):
        doc = np.append(rng.integers(1, 200, int(rng.integers(20, 200))), 0)  # EOD = 0
        b.add_item(torch.from_numpy(doc))
        b.end_document()
    b.finalize(f"{prefix}.idx")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpora")
    for name, seed in (("a", 0), ("b", 1), ("v", 2)):
        _corpus(d / name, seed)
    return d


def _val(run_dir) -> float:
    return [json.loads(x) for x in open(run_dir / "metrics.jsonl")][-1]["val_loss"]


def test_blend_with_split_and_valid_prefixes(corpora, tmp_path):
    common = ["data.mock=false", "model.vocab_size=200", "train.steps=3", "logging.progress=false",
              "logging.tensorboard=false", "train.save=false"]
    run_sift(["train", TINY, *common, f"train.out_dir={tmp_path / 'blend'}", "data.split=90,10,0",
              f"data.prefixes=[0.7, {corpora / 'a'}, 0.3, {corpora / 'b'}]"])
    run_sift(["train", TINY, *common, f"train.out_dir={tmp_path / 'sep'}", f"data.prefixes=[{corpora / 'a'}]",
              f"data.valid_prefixes=[{corpora / 'v'}]"])
    assert np.isfinite(_val(tmp_path / "blend")) and np.isfinite(_val(tmp_path / "sep"))


def test_corrupt_index_is_one_line_error(tmp_path):
    (tmp_path / "bad.bin").write_bytes(b"\0" * 10)
    (tmp_path / "bad.idx").write_bytes(b"not an index")
    proc = run_sift(["train", TINY, "data.mock=false", "model.vocab_size=200", f"train.out_dir={tmp_path / 'r'}",
                     f"data.prefixes=[{tmp_path / 'bad'}]"], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "not a Megatron index file" in proc.stderr
