"""Zstandard inputs (`.jsonl.zst`, the Pile's format, and `.txt.zst`): streamed, multi-frame, the same
documents and the same .bin/.idx as the uncompressed files; without the `data` extra a one-line error."""

from __future__ import annotations

import json
import sys

import pytest

from sift_megatron.errors import SiftError
from tests.conftest import SHARED_DATA


@pytest.fixture
def files(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    src = SHARED_DATA / "tinyshakespeare.txt"
    if not src.exists():
        pytest.skip(f"{src} not present")
    text = src.read_text(encoding="utf-8")
    docs = [p + "\n" for p in text.split("\n\n") if p.strip()][:400]
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    (tmp_path / "docs.jsonl").write_bytes(lines)
    half = len(lines) // 2
    cut = lines.index(b"\n", half) + 1
    cctx = zstandard.ZstdCompressor(level=3)
    # two frames, split mid-file: readers must continue across frames
    (tmp_path / "docs.jsonl.zst").write_bytes(cctx.compress(lines[:cut]) + cctx.compress(lines[cut:]))
    (tmp_path / "plain.txt").write_text(text[:50000], encoding="utf-8")
    (tmp_path / "plain.txt.zst").write_bytes(cctx.compress(text[:50000].encode()))
    return tmp_path, docs


def test_zst_gives_the_same_documents(files):
    from data_prep.corpus import ReadStats, iter_documents, known_size, resolve_inputs

    d, docs = files
    for plain, packed in (("docs.jsonl", "docs.jsonl.zst"), ("plain.txt", "plain.txt.zst")):
        a, b = ReadStats(), ReadStats()
        got = list(iter_documents(resolve_inputs([str(d / packed)]), "text", b))
        assert got == list(iter_documents(resolve_inputs([str(d / plain)]), "text", a))
        assert b.bytes == a.bytes and b.input_bytes == a.input_bytes
    assert list(iter_documents(resolve_inputs([str(d / "docs.jsonl.zst")]))) == docs
    assert resolve_inputs([str(d / "docs.jsonl.zst")])[0].kind == "jsonl"
    assert known_size(resolve_inputs([str(d / "docs.jsonl.zst")])) is None  # compressed: no byte total


def test_zst_preprocess_equals_uncompressed(files):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from data_prep.preprocess import preprocess

    d, _ = files
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(d / "plain.txt")], trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tok.json"))
    for name in ("docs.jsonl", "docs.jsonl.zst"):
        preprocess([str(d / name)], d / "tok.json", d / name.replace(".", "_"), progress=False)
    for ext in (".bin", ".idx"):
        assert (d / f"docs_jsonl{ext}").read_bytes() == (d / f"docs_jsonl_zst{ext}").read_bytes()


def test_zst_without_zstandard_is_one_line(tmp_path, monkeypatch):
    from data_prep.corpus import iter_documents, resolve_inputs

    (tmp_path / "x.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(SiftError, match=r"needs zstandard, not installed here: pip install 'sift-megatron\[data\]'"):
        list(iter_documents(resolve_inputs([str(tmp_path / "x.jsonl.zst")])))
