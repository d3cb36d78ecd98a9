"""`hf:NAME` inputs are streamed (datasets streaming mode), and `--max-docs` / `--max-bytes` take a prefix of any
input without reading the rest."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SHARED_DATA, run_sift


@pytest.fixture
def corpus(tmp_path):
    src = SHARED_DATA / "tinyshakespeare.txt"
    if not src.exists():
        pytest.skip(f"{src} not present")
    docs = [p + "\n" for p in src.read_text(encoding="utf-8").split("\n\n") if p.strip()][:300]
    (tmp_path / "ds").mkdir()
    with open(tmp_path / "ds" / "train.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(docs))
    return tmp_path, docs


def test_hf_name_is_streamed(corpus, monkeypatch):
    """A hub name goes through load_dataset(..., streaming=True); a local dataset directory stands in for the
    hub here (no network), read the same way."""
    pytest.importorskip("datasets")
    import datasets

    from data_prep.corpus import ReadStats, _hf_dataset, iter_documents, resolve_inputs

    tmp, docs = corpus
    monkeypatch.setenv("HF_HOME", str(tmp / "hf"))
    sources = resolve_inputs([f"hf:{tmp / 'ds'}"])
    assert isinstance(_hf_dataset(sources[0], "train"), datasets.IterableDataset)
    stats = ReadStats()
    assert list(iter_documents(sources, "text", stats)) == docs
    assert stats.bytes == sum(len(d.encode()) for d in docs)
    assert list(iter_documents(sources, "text", max_docs=7)) == docs[:7]
    with pytest.raises(Exception, match="has no column 'body' \\(columns: text, n\\)"):
        list(iter_documents(sources, "body"))


def test_max_docs_and_max_bytes_take_a_prefix(corpus):
    from data_prep.corpus import ReadStats, iter_documents, resolve_inputs

    tmp, docs = corpus
    sources = resolve_inputs([str(tmp / "ds" / "train.jsonl")])
    assert list(iter_documents(sources, max_docs=5)) == docs[:5]
    limit = sum(len(d.encode()) for d in docs[:10]) + 1  # crossed by the 11th document
    stats = ReadStats()
    assert list(iter_documents(sources, stats=stats, max_bytes=limit)) == docs[:11]
    assert stats.documents == 11 and stats.input_bytes < (tmp / "ds" / "train.jsonl").stat().st_size
    assert list(iter_documents(sources, max_docs=3, max_bytes=limit)) == docs[:3]  # the first limit wins


def test_preprocess_cli_max_docs(corpus, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tmp, docs = corpus
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp / "tok.json"))
    proc = run_sift(["data", "preprocess", "--input", str(tmp / "ds" / "train.jsonl"), "--tokenizer",
                     str(tmp / "tok.json"), "--out", str(tmp / "p"), "--max-docs", "12", "--no-progress"])
    assert "preprocess: 12 documents" in proc.stdout
    bad = run_sift(["data", "preprocess", "--input", "x", "--tokenizer", "t", "--out", str(tmp / "q"),
                    "--max-bytes", "lots"], check=False)
    assert bad.returncode == 2 and "size 'lots' is not a number of bytes" in bad.stderr
