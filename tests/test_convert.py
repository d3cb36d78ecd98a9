"""`sift convert --to hf` and `sift eval`: every family's export computes megatron's logits, the exported
tokenizer gives our ids, lm-eval's log-likelihoods are megatron's, and bad inputs are one-line errors.

One module fixture trains a tiny model of each family on real data (tinyshakespeare, a 500-piece
tokenizer) with `sift train` and converts it with `sift convert`; megatron's reference logits for all of
them come from one `python -m sift_megatron.convert.reference` process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED_DATA, run_sift

FAMILIES = {"dense": 0.0, "wide": 0.75, "parallel": 0.5, "factorized": 0.5, "doped": 0.5}
ARCH = {"dense": "GPT2LMHeadModel", "wide": "GPT2LMHeadModel", "doped": "GPT2LMHeadModel",
        "parallel": "SiftGPTForCausalLM", "factorized": "SiftGPTForCausalLM"}
EVAL_FAMILY = "factorized"  # the custom architecture: the riskier half of the export
EVAL_LIMIT = 4
CLI_CONVERT = ("dense", "factorized")  # one export per architecture through the CLI, the rest in-process
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"
TASK_FILE = REPO / "sift_megatron" / "convert" / "tasks" / "sift_offline_mc.jsonl"


def _env(tmp: Path) -> dict:
    """Subprocesses: one thread each (2 shared cores), and no hub traffic or home-directory caches."""
    return {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp / "hf"),
            "TRANSFORMERS_VERBOSITY": "error"}


def _one_line_error(args: list[str], env: dict) -> str:
    proc = run_sift(args, check=False, timeout=300, env=env)
    err = proc.stderr.strip()
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr and len(err.splitlines()) == 1, proc.stderr
    return err


def _eval_pairs(tokenizer) -> list[tuple[str, str, list[int], list[int]]]:
    """(context, continuation, context ids, continuation ids) of the first EVAL_LIMIT task items, split the
    way lm-eval's HF backend splits them (continuation = ids of context+continuation after the context's)."""
    out = []
    for line in TASK_FILE.read_text().splitlines()[:EVAL_LIMIT]:
        doc = json.loads(line)
        for choice in doc["choices"]:
            ctx, cont = doc["context"], "\n" + choice
            ctx_ids, whole = tokenizer.tokenize(ctx), tokenizer.tokenize(ctx + cont)
            out.append((ctx, cont, ctx_ids, whole[len(ctx_ids):]))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} not present")
    from data_prep.tokenizer import load_tokenizer

    tmp = tmp_path_factory.mktemp("convert")
    env = _env(tmp)
    docs = [p + "\n" for p in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    with open(tmp / "docs.jsonl", "w") as f:  # one document per paragraph, so a 2 % valid split has some
        for d in docs[:1500]:
            f.write(json.dumps({"text": d}) + "\n")
    tok = tmp / "tok"
    run_sift(["data", "tokenizer", "--input", str(SHAKESPEARE), "--vocab-size", "500", "--out", str(tok)], env=env)
    run_sift(["data", "preprocess", "--input", str(tmp / "docs.jsonl"), "--tokenizer", str(tok), "--out",
              str(tmp / "shk"), "--split", "98,2,0", "--no-progress"], env=env)
    runs, exports = {}, {}
    for fam, s in FAMILIES.items():
        runs[fam] = tmp / f"run_{fam}"
        run_sift(["train", "configs/tiny/dense.yaml", f"sparsity.family={fam}", f"sparsity.s={s}", "train.steps=3",
                  "data.mock=false", f"data.prefixes=[{tmp / 'shk_train'}]",
                  f"data.valid_prefixes=[{tmp / 'shk_valid'}]", f"data.tokenizer={tok}",
                  f"train.out_dir={runs[fam]}", "logging.progress=false", "logging.tensorboard=false"], env=env)
        exports[fam] = tmp / f"hf_{fam}"
        if fam in CLI_CONVERT:
            proc = run_sift(["convert", str(runs[fam]), "--to", "hf", "--out", str(exports[fam])], env=env)
            assert f"as {ARCH[fam]}" in proc.stdout and not proc.stderr.strip(), proc.stdout + proc.stderr
        else:  # the same function in this process: saves a transformers import per family
            from sift_megatron.convert.hf import export_hf

            export_hf(runs[fam], exports[fam])

    # megatron's own logits: a shakespeare passage for every family, the eval items for EVAL_FAMILY
    ours = load_tokenizer(tok)
    passage = ours.tokenize(SHAKESPEARE.read_text(encoding="utf-8")[20000:21000])[:64]
    pairs = _eval_pairs(ours)
    jobs = []
    for fam, run in runs.items():
        seqs = [passage] + ([(c + k)[:-1] for _, _, c, k in pairs] if fam == EVAL_FAMILY else [])
        (tmp / f"tokens_{fam}.json").write_text(json.dumps(seqs))
        jobs.append(f"{run}={tmp / f'tokens_{fam}.json'}")
    ref_file = tmp / "reference.safetensors"
    proc = subprocess.run([sys.executable, "-m", "sift_megatron.convert.reference", str(ref_file), *jobs],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
    assert proc.returncode == 0, proc.stderr[-4000:]
    from safetensors.torch import load_file

    return {"tmp": tmp, "env": env, "tok": tok, "ours": ours, "runs": runs, "exports": exports,
            "passage": passage, "pairs": pairs, "ref": load_file(str(ref_file))}


def _ref(world: dict, fam: str, i: int):
    return world["ref"][f"run_{fam}.{i}"]


# --------------------------------------------------------------------------------------------- exports
@pytest.mark.slow
@pytest.mark.parametrize("fam", list(FAMILIES))
def test_export_logits_equal_megatron(world, fam):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import sift_megatron.convert  # noqa: F401  (registers sift_gpt with the Auto classes)

    d = world["exports"][fam]
    assert AutoConfig.from_pretrained(d).architectures == [ARCH[fam]]
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    assert type(model).__name__ == ARCH[fam]
    vocab = world["ours"].vocab_size
    with torch.no_grad():
        hf = model(torch.tensor([world["passage"]])).logits[0]
    ref = _ref(world, fam, 0)
    assert hf.shape == (len(world["passage"]), vocab) and ref.shape[1] >= vocab
    err = (hf - ref[:, :vocab]).abs().max().item()
    assert err <= 1e-4, f"{fam}: max |logit diff| {err}"


@pytest.mark.slow
@pytest.mark.parametrize("fam", list(FAMILIES))
def test_export_files_and_stats(world, fam):
    d = world["exports"][fam]
    names = {p.name for p in d.iterdir()}
    want = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "sparsity_stats.json"} | ({"modeling_sift.py"} if ARCH[fam] != "GPT2LMHeadModel" else set())
    assert names == want  # safetensors only: nothing pickled, no temp leftovers
    assert not [p for p in d.parent.iterdir() if p.name.startswith(f".{d.name}")]
    stats = json.loads((d / "sparsity_stats.json").read_text())
    assert stats["family"] == fam and stats["s"] == FAMILIES[fam] and stats["step"] == 3
    assert stats["architecture"] == ARCH[fam]
    if fam == "dense":
        assert stats["tensors"] == [] and stats["total"]["density"] == 1.0
        return
    per_layer = {"wide": 4, "parallel": 4 * 2, "factorized": 4 * 2, "doped": 4}[fam]
    assert stats["total"]["sparse_tensors"] == 4 * per_layer
    for t in stats["tensors"]:
        assert t["density"] == pytest.approx(1 - stats["sparsity"], abs=1e-3), t
        assert t["nonzero_outside_mask"] == 0 and t["nonzero_weights"] <= t["nnz"]
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == world["ours"].eod


@pytest.mark.slow
@pytest.mark.parametrize("fam", list(FAMILIES))
def test_sharded_export_equals_megatron(world, fam, tmp_path):
    """Beyond max_shard_size the export is transformers' sharded layout (shards written one at a time + an
    index): from_pretrained loads it to megatron's logits, and it holds exactly the one-file export's tensors
    and sparsity stats."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from sift_megatron.convert.hf import export_hf

    d = export_hf(world["runs"][fam], tmp_path / "hf", max_shard_size="64KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in d.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and sorted(set(index["weight_map"].values())) == shards
    assert not (d / "model.safetensors").exists()
    one = load_file(world["exports"][fam] / "model.safetensors")
    sharded = {k: v for s in shards for k, v in load_file(d / s).items()}
    assert sharded.keys() == one.keys() == index["weight_map"].keys()
    assert all(torch.equal(sharded[k], one[k]) for k in one)
    stats = json.loads((d / "sparsity_stats.json").read_text())
    assert stats == json.loads((world["exports"][fam] / "sparsity_stats.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    vocab = world["ours"].vocab_size
    with torch.no_grad():
        hf = model(torch.tensor([world["passage"]])).logits[0]
    err = (hf - _ref(world, fam, 0)[:, :vocab]).abs().max().item()
    assert err <= 1e-4, f"{fam}: max |logit diff| {err}"


@pytest.mark.slow
def test_autotokenizer_gives_our_ids(world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["exports"]["dense"])
    ours = world["ours"]
    text = SHAKESPEARE.read_text(encoding="utf-8")
    ids = tok(text, add_special_tokens=False)["input_ids"]  # the whole corpus: newlines, runs of spaces
    assert ids == ours.tokenize(text)
    for s in ["  two  spaces\n\n\nand\ttabs  ", "unicode é 中文 😀", "</s> literal <s> specials", " ", "\n", "x"]:
        assert tok(s, add_special_tokens=False)["input_ids"] == ours.tokenize(s), s
        assert tok.decode(ours.tokenize(s)) == s
    assert tok.eos_token_id == ours.eod and len(tok) == ours.vocab_size
    assert tok.model_max_length == 64


@pytest.mark.slow
def test_trust_remote_code_without_our_package(world):
    """The export carries modeling_sift.py + auto_map: loadable where sift_megatron is not installed."""
    fam = "parallel"
    code = (
        "import sys, json, torch; sys.modules['sift_megatron'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(world['exports'][fam])!r}, trust_remote_code=True)\n"
        "assert 'transformers_modules' in type(m).__module__, type(m).__module__\n"
        f"ids = torch.tensor([{world['passage']!r}])\n"
        "with torch.no_grad():\n"
        "    logits = m(ids).logits[0]\n"
        "    gen = m.generate(ids[:, :8], max_new_tokens=4, do_sample=False)\n"
        "print(json.dumps({'logits': logits.tolist(), 'gen': gen[0].tolist()}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/",
                          env={**os.environ, **world["env"]})
    assert proc.returncode == 0, proc.stderr[-3000:]
    import torch

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = _ref(world, fam, 0)[:, : world["ours"].vocab_size]
    assert (torch.tensor(out["logits"]) - ref).abs().max().item() <= 1e-4
    assert len(out["gen"]) == 12 and out["gen"][:8] == world["passage"][:8]


def _dense_run_with_config(world, run: Path, edit) -> None:
    """`run` = the dense run's final (sharded) checkpoint with its config.yaml changed by edit(cfg)."""
    import shutil

    import yaml

    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(_final_checkpoint(world["runs"]["dense"]), run)
    cfg = yaml.safe_load((world["runs"]["dense"] / "config.yaml").read_text())
    edit(cfg)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))


def _final_checkpoint(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


@pytest.mark.slow
def test_export_of_a_mock_data_run_has_no_tokenizer(world, tmp_path):
    """A mock-data run has no tokenizer: the model still exports (EOD 0), without tokenizer files."""
    from sift_megatron.convert.hf import export_hf

    run = tmp_path / "mock_run"
    _dense_run_with_config(world, run, lambda cfg: cfg["data"].update(mock=True, tokenizer=None))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "sparsity_stats.json").write_text("{}")  # an earlier export: replaced as a whole
    (tmp_path / "hf" / "stale.txt").write_text("old")
    out = export_hf(run, tmp_path / "hf")
    assert not (out / "tokenizer.json").exists() and (out / "model.safetensors").exists()
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 0
    err = _one_line_error(["eval", str(out), "--tasks", "sift_offline_mc"], world["env"])
    assert "has no tokenizer" in err


@pytest.mark.slow
def test_sift_eval_of_a_corrupt_export_is_one_line(world, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(world["exports"]["dense"], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 3])
    err = _one_line_error(["eval", str(bad), "--tasks", "sift_offline_mc", "--limit", "1"], world["env"])
    assert "cannot load the model" in err, err


# --------------------------------------------------------------------------------------------- sift eval
@pytest.mark.slow
def test_sift_eval_loglikelihoods_equal_megatron(world):
    import torch

    out = world["tmp"] / "eval.json"
    proc = run_sift(["eval", str(world["exports"][EVAL_FAMILY]), "--tasks", "sift_offline_mc", "--limit",
                     str(EVAL_LIMIT), "--batch-size", "4", "--output", str(out)], env=world["env"], timeout=300)
    assert "sift_offline_mc" in proc.stdout and "acc" in proc.stdout
    res = json.loads(out.read_text())
    samples = sorted(res["samples"]["sift_offline_mc"], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(EVAL_LIMIT))
    got = [(tuple(a), r[0]) for s in samples for a, r in zip(s["arguments"], s["filtered_resps"])]
    pairs, vocab = world["pairs"], world["ours"].vocab_size
    assert [a for a, _ in got] == [(ctx, cont) for ctx, cont, _, _ in pairs]
    for i, ((_, ll), (_, _, ctx_ids, cont_ids)) in enumerate(zip(got, pairs)):
        logp = torch.log_softmax(_ref(world, EVAL_FAMILY, i + 1)[:, :vocab].double(), dim=-1)
        pos = torch.arange(len(ctx_ids) - 1, len(ctx_ids) - 1 + len(cont_ids))
        ours = logp[pos, torch.tensor(cont_ids)].sum().item()
        assert abs(ours - ll) <= 1e-3, (i, ours, ll)
    acc = res["results"]["sift_offline_mc"]["acc,none"]
    lls = [ll for _, ll in got]
    labels = [json.loads(line)["label"] for line in TASK_FILE.read_text().splitlines()[:EVAL_LIMIT]]
    picks = [max(range(4), key=lambda c, d=d: lls[4 * d + c]) for d in range(EVAL_LIMIT)]
    assert acc == pytest.approx(sum(p == y for p, y in zip(picks, labels)) / EVAL_LIMIT)


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.slow
def test_config_shape_mismatch_is_one_line(world, tmp_path):
    run = tmp_path / "run"
    _dense_run_with_config(world, run, lambda cfg: cfg["model"].update(hidden_size=96))  # another model's config
    err = _one_line_error(["convert", str(run), "--to", "hf", "--out", str(tmp_path / "o")], world["env"])
    assert "does not match" in err and "expected" in err, err
    _dense_run_with_config(world, run, lambda cfg: cfg["sparsity"].update(family="parallel", s=0.5))  # wrong family
    err = _one_line_error(["convert", str(run), "--out", str(tmp_path / "o")], world["env"])
    assert "does not match" in err and "missing tensor" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_truncated_checkpoint_is_one_line(world, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(_final_checkpoint(world["runs"]["wide"]), run)
    for name in ("__0_0.distcp", "dcp.json"):  # the data file, and its index
        data = (run / name).read_bytes()
        for cut in (len(data) // 2, 6):  # lost the tail; lost even the first record
            (run / name).write_bytes(data[:cut])
            err = _one_line_error(["convert", str(run), "--to", "hf", "--out", str(tmp_path / "o")], world["env"])
            assert "corrupt or truncated" in err and name in err, err
        (run / name).write_bytes(data)
    data = (run / "__0_0.distcp").read_bytes()  # whole length, damaged records
    (run / "__0_0.distcp").write_bytes(bytes(len(data)))
    err = _one_line_error(["convert", str(run), "--to", "hf", "--out", str(tmp_path / "o")], world["env"])
    assert "corrupt" in err and "__0_0.distcp" in err, err
    assert not (tmp_path / "o").exists()


def test_missing_checkpoint_and_unknown_format_are_one_line(tmp_path):
    env = _env(tmp_path)
    err = _one_line_error(["convert", str(tmp_path / "nope"), "--to", "hf", "--out", str(tmp_path / "o")], env)
    assert "not found" in err
    (tmp_path / "empty_run").mkdir()
    err = _one_line_error(["convert", str(tmp_path / "empty_run"), "--out", str(tmp_path / "o")], env)
    assert "has no model.safetensors" in err
    err = _one_line_error(["convert", str(tmp_path / "empty_run"), "--to", "onnx", "--out", str(tmp_path / "o")], env)
    assert "unknown target format 'onnx'" in err
    err = _one_line_error(["eval", str(tmp_path / "nope"), "--tasks", "sift_offline_mc"], env)
    assert "not found" in err
    (tmp_path / "not_export").mkdir()
    (tmp_path / "not_export" / "keep.txt").write_text("mine")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "model.safetensors").write_bytes(b"")
    err = _one_line_error(["convert", str(tmp_path / "r"), "--out", str(tmp_path / "not_export")], env)
    assert "not a sift export" in err
    assert (tmp_path / "not_export" / "keep.txt").read_text() == "mine"


def test_cli_imports_nothing_heavy_and_registration_is_deferred():
    """`sift --help` stays instant; importing transformers later still registers sift_gpt."""
    code = ("import sys, argparse\n"
            "import sift_megatron.convert.cli as c\n"
            "c.register(argparse.ArgumentParser().add_subparsers())\n"
            "heavy = {'torch', 'transformers', 'lm_eval', 'megatron', 'safetensors'} & set(sys.modules)\n"
            "assert not heavy, heavy\n"
            "from transformers import AutoConfig, AutoModelForCausalLM\n"
            "cfg = AutoConfig.for_model('sift_gpt', family='parallel', branches=2, n_layer=1, n_embd=8, n_head=2,"
            " vocab_size=16, bos_token_id=0, eos_token_id=0)\n"
            "m = AutoModelForCausalLM.from_config(cfg)\n"
            "assert type(m).__name__ == 'SiftGPTForCausalLM', type(m)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
