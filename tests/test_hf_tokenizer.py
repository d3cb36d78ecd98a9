"""Hugging Face tokenizers: a GPT-2-style byte-level BPE built offline with `tokenizers` on tinyshakespeare is
accepted as a directory, a tokenizer.json, Megatron-LM's gpt2-vocab.json + gpt2-merges.txt and a name in the
local Hugging Face cache; the EOD id comes from the tokenizer; data prep, training, `sift convert` and
`sift eval` work with it end to end (one small run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sift_megatron.errors import SiftError
from tests.conftest import REPO, SHARED_DATA, run_sift

SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"
EOT = "<|endoftext|>"
VOCAB = 512
TEXT = "First Citizen:\nBefore we proceed, hear me speak.\n\n  All:\tSpeak, speak. 's 've héllo 😀 3.14\r\n"


def _train_bpe(out: Path, special: list[str]) -> None:
    """GPT-2's recipe (byte-level pre-tokenizer and decoder, BPE) on tinyshakespeare; no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(SHAKESPEARE)], trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=special, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> dict:
    """The same BPE as a tokenizer.json directory, as Megatron-LM's GPT-2 files, and in a local hub cache."""
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} not present")
    from tokenizers import Tokenizer

    tmp = tmp_path_factory.mktemp("bpe")
    _train_bpe(tmp / "json", [EOT])
    megatron = tmp / "megatron"
    megatron.mkdir()
    vocab, merges = Tokenizer.from_file(str(tmp / "json" / "tokenizer.json")).model.save(str(megatron))
    Path(vocab).rename(megatron / "gpt2-vocab.json")  # the names Megatron-LM's examples use
    Path(merges).rename(megatron / "gpt2-merges.txt")
    snapshot = tmp / "hub" / "models--sifttest--shakespeare-bpe" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    shutil.copy(tmp / "json" / "tokenizer.json", snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    return {"tmp": tmp, "json": tmp / "json", "megatron": megatron, "hub": tmp / "hub",
            "name": "sifttest/shakespeare-bpe"}


@pytest.fixture
def hub_cache(bpe, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(bpe["hub"]))
    return bpe["name"]


def test_every_form_gives_gpt2_ids(bpe, hub_cache):
    from transformers import GPT2Tokenizer

    from data_prep.tokenizer import HFTokenizer, load_tokenizer

    text = SHAKESPEARE.read_text(encoding="utf-8")[:30000] + TEXT
    forms = [bpe["json"], bpe["json"] / "tokenizer.json", bpe["megatron"], hub_cache, f"hf:{hub_cache}"]
    toks = [load_tokenizer(f) for f in forms]
    assert all(isinstance(t, HFTokenizer) for t in toks)
    ids = toks[0].tokenize(text)
    assert len(ids) < 0.6 * len(text.encode())  # merges were learned (~1.9 bytes per token)
    for t in toks:
        assert t.tokenize(text) == ids and t.vocab_size == VOCAB
        assert t.eod == t.vocab[EOT] == 0 and t.inv_vocab[t.eod] == EOT
        assert t.detokenize(np.array([*t.tokenize(TEXT), t.eod])) == TEXT  # EOD decodes to nothing
    # transformers' GPT-2 tokenizer on the same vocab.json / merges.txt (what Megatron-LM's GPT2BPETokenizer is)
    (bpe["tmp"] / "gpt2").mkdir(exist_ok=True)
    for src, dst in (("gpt2-vocab.json", "vocab.json"), ("gpt2-merges.txt", "merges.txt")):
        shutil.copy(bpe["megatron"] / src, bpe["tmp"] / "gpt2" / dst)
    gpt2 = GPT2Tokenizer.from_pretrained(bpe["tmp"] / "gpt2")
    assert gpt2(text)["input_ids"] == ids and gpt2.eos_token_id == toks[0].eod


def test_eod_comes_from_the_tokenizer(bpe, tmp_path):
    from data_prep.tokenizer import load_tokenizer

    d = tmp_path / "eos"
    shutil.copytree(bpe["json"], d)
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "e"}}))
    tok = load_tokenizer(d)
    assert tok.eod == tok.vocab["e"] and tok.eod != 0  # the configured eos_token wins over <|endoftext|>
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<never-seen>"}))
    with pytest.raises(SiftError, match="eos_token '<never-seen>' is not in its vocabulary"):
        load_tokenizer(d)
    _train_bpe(tmp_path / "plain", [])  # no special token at all: rejected, never a silent EOD = 0
    with pytest.raises(SiftError, match="has no end-of-document token"):
        load_tokenizer(tmp_path / "plain")


def test_resolution_errors_are_one_line(bpe, hub_cache, tmp_path):
    from data_prep.hf_tokenizer import resolve

    (tmp_path / "ours").mkdir()
    for name in ("tokenizer.model", "sift_tokenizer.json"):
        (tmp_path / "ours" / name).write_text("")
    assert resolve(tmp_path / "ours").kind == "sentencepiece"
    assert resolve(hub_cache).path.name == "0123abcd"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SiftError, match="has no tokenizer.model, tokenizer.json or vocab.json"):
        resolve(tmp_path / "empty")
    with pytest.raises(SiftError, match="nor a model in the local Hugging Face cache .*hf download sifttest/nope"):
        resolve("sifttest/nope")
    with pytest.raises(SiftError, match="not found; create one"):
        resolve(tmp_path / "missing")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SiftError, match="cannot be read"):
        from data_prep.tokenizer import load_tokenizer

        load_tokenizer(tmp_path / "bad.json")


def test_preprocess_appends_the_tokenizers_eod(bpe, tmp_path):
    """Documents are the tokenizer's ids plus its EOD; 2 workers write the same bytes as 1."""
    import warnings

    from data_prep.preprocess import preprocess
    from data_prep.tokenizer import load_tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = [p + "\n" for p in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if p.strip()][:300] + [TEXT]
    with open(tmp_path / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    for w in (1, 2):
        s = preprocess([str(tmp_path / "docs.jsonl")], bpe["megatron"], tmp_path / f"w{w}", workers=w,
                       progress=False)
        assert s.documents == len(docs) and s.dtype == "uint16"
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()
    tok = load_tokenizer(bpe["json"])
    ds = IndexedDataset(str(tmp_path / "w1"))
    assert len(ds) == len(docs)
    for i in (0, 7, len(docs) - 1):
        assert ds[i].tolist() == tok.tokenize(docs[i]) + [tok.eod]


def test_model_vocab_smaller_than_tokenizer_is_rejected(bpe):
    from sift_megatron.config import load_config
    from sift_megatron.training.data import base_vocab_size, load_tokenizer

    cfg = load_config(REPO / "configs" / "tiny" / "dense.yaml",
                      ["data.mock=false", f"data.tokenizer={bpe['json']}", "model.vocab_size=300"])
    with pytest.raises(SiftError, match="model.vocab_size 300 is smaller than the vocabulary of data.tokenizer"):
        base_vocab_size(cfg, load_tokenizer(cfg))
    cfg.model.vocab_size = None
    assert base_vocab_size(cfg, load_tokenizer(cfg)) == VOCAB


# ------------------------------------------------------------------------------------ end to end (CLI)
@pytest.mark.slow
def test_train_convert_eval_with_a_gpt2_bpe(bpe, tmp_path):
    """Data tokenized with the cached tokenizer by name; training names Megatron-LM's GPT-2 files (the same
    BPE: existing Megatron data + its tokenizer train as is); the export's tokenizer gives the training ids and
    `sift eval`'s log-likelihoods are the exported model's on those ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_prep.tokenizer import load_tokenizer

    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_CACHE": str(bpe["hub"]), "TRANSFORMERS_VERBOSITY": "error"}
    docs = [p + "\n" for p in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if p.strip()][:1500]
    with open(tmp_path / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    proc = run_sift(["data", "preprocess", "--input", str(tmp_path / "docs.jsonl"), "--tokenizer", bpe["name"],
                     "--out", str(tmp_path / "shk"), "--split", "98,2,0", "--no-progress"], env=env)
    assert "uint16" in proc.stdout
    run, export = tmp_path / "run", tmp_path / "hf_export"
    run_sift(["train", "configs/tiny/dense.yaml", "train.steps=3", "data.mock=false",
              f"data.prefixes=[{tmp_path / 'shk_train'}]", f"data.valid_prefixes=[{tmp_path / 'shk_valid'}]",
              f"data.tokenizer={bpe['megatron']}", f"train.out_dir={run}", "logging.progress=false",
              "logging.tensorboard=false"], env=env)
    losses = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(losses[-1]["val_loss"])
    proc = run_sift(["convert", str(run), "--out", str(export)], env=env)
    assert "with tokenizer" in proc.stdout

    ours = load_tokenizer(bpe["megatron"])
    tok = AutoTokenizer.from_pretrained(export)
    corpus = SHAKESPEARE.read_text(encoding="utf-8")
    assert tok(corpus, add_special_tokens=False)["input_ids"] == ours.tokenize(corpus)
    assert tok.eos_token_id == tok.bos_token_id == ours.eod and len(tok) == VOCAB
    assert json.loads((export / "config.json").read_text())["eos_token_id"] == ours.eod

    out = tmp_path / "eval.json"
    run_sift(["eval", str(export), "--tasks", "sift_offline_mc", "--limit", "2", "--output", str(out)], env=env)
    samples = sorted(json.loads(out.read_text())["samples"]["sift_offline_mc"], key=lambda s: s["doc_id"])
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    for s in samples:
        for (ctx, cont), resp in zip(s["arguments"], s["filtered_resps"]):
            c, whole = ours.tokenize(ctx), ours.tokenize(ctx + cont)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            k = whole[len(c):]
            ll = logp[torch.arange(len(c) - 1, len(whole) - 1), torch.tensor(k)].sum().item()
            assert abs(ll - resp[0]) <= 1e-3, (ctx, cont, ll, resp)

    # a real-data run that names no tokenizer: convert says so instead of exporting EOD = 0
    import yaml

    from sift_megatron.convert.hf import export_hf

    bare = tmp_path / "bare"
    shutil.copytree(run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip(), bare)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["tokenizer"] = None
    (bare / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SiftError, match="names no data.tokenizer .* pass --tokenizer"):
        export_hf(bare, tmp_path / "o")
