"""Bad inputs and faults, as a new user meets them (issue 16): every case ends in exit code 2 and one stderr line
naming the bad value and what is allowed, with nothing written, lost or left half-written; a kill during any
write leaves the previous output intact. Table-driven; most cases call the checks in-process (`load_config`,
`preflight.check_train`, the writers), a few run the real CLI. One tiny corpus and one 2-step training run are
shared by the whole module.

The cases of issue 16, each failing on b9cbfb0: one-document corpus hang (test_one_document_corpus_default_split_
does_not_hang), checkpoint lost to pruning (test_pruning_keeps_the_new_and_the_latest_checkpoint,
test_cli_existing_run_without_resume_is_refused), config.yaml rewritten by a rejected resume
(test_cli_resume_other_model_keeps_run_config), tracebacks (test_cli_negative_lr_fails_check,
test_cli_log_interval_zero_is_one_line, test_cli_truncated_data_is_one_line, test_cli_bad_deepspeed_file_is_one_line,
test_cli_tokenizer_unwritable_and_colliding, test_cli_convert_unwritable_and_colliding,
test_cli_unwritable_train_out_dir), silently accepted settings (test_config_rejected[warmup_steps / eval_iters],
test_num_workers_is_honoured, test_deepspeed_settings_honoured_or_rejected[zero2.yaml]), cosmetics
(test_signal_name_when_another_rank_got_it, test_train_usage_does_not_list_overrides_as_required)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from sift_megatron import config as C
from sift_megatron.config import load_config
from sift_megatron.errors import SiftError
from tests.conftest import REPO, fault_env

TINY = str(REPO / "configs" / "tiny" / "dense.yaml")
UNWRITABLE = "/sys/sift-robustness"  # mkdir fails there even for root (os.access says yes to root)
QUIET = ["logging.progress=false", "logging.tensorboard=false"]


# ---------------------------------------------------------------------------------------------------- helpers
def _env(**faults) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(fault_env(**faults) if faults else {})}


def sift(*args, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sift_megatron.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=_env(**env), cwd=REPO)


def one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, no traceback, stderr exactly one `sift ...: error: ...` line holding every needle."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("sift ") and ": error: " in lines[0], proc.stderr[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def raises(fn, *needles: str) -> str:
    with pytest.raises(SiftError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and msg.strip(), msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def tree(path: Path) -> dict[str, str]:
    """Every file under `path` (hidden included) -> sha256: compare to prove nothing changed."""
    if not path.exists():
        return {}
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# --------------------------------------------------------------------------------------------------- fixtures
def _text(rng: random.Random, words: int) -> str:
    vocab = ["the", "sparse", "model", "trains", "wide", "layers", "with", "masks", "and", "tokens", "of", "a",
             "megatron", "rank", "step", "loss", "falls", "slowly", "every", "night", "."]
    return " ".join(rng.choice(vocab) for _ in range(words)) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """tok/ (sentencepiece, vocab 300), one.{bin,idx} (a corpus from one text file: one document) and
    many.{bin,idx} (40 documents)."""
    from data_prep.preprocess import preprocess
    from data_prep.trainer import train_tokenizer

    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    (d / "one.txt").write_text(_text(rng, 3000))
    with open(d / "many.jsonl", "w") as f:
        for _ in range(40):
            f.write(json.dumps({"text": _text(rng, 120)}) + "\n")
    train_tokenizer([str(d / "many.jsonl")], 300, d / "tok", seed=0, threads=1)
    preprocess([str(d / "one.txt")], d / "tok", d / "one", progress=False)
    preprocess([str(d / "many.jsonl")], d / "tok", d / "many", progress=False)
    return d


def data_args(corpus: Path, prefix: str = "many") -> list[str]:
    return ["data.mock=false", f"data.prefixes=[{corpus / prefix}]", f"data.tokenizer={corpus / 'tok'}"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A finished 2-step run (mock data) with checkpoints step_000001 and step_000002."""
    out = tmp_path_factory.mktemp("run") / "r"
    proc = sift("train", TINY, f"train.out_dir={out}", "train.steps=2", "train.save_interval=1", *QUIET, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def copy_run(run, tmp_path: Path) -> Path:
    dst = tmp_path / "r"
    shutil.copytree(run[0], dst)
    return dst


def check(overrides: list[str], world: int = 1):
    """What `sift train` does before it writes anything."""
    from sift_megatron.preflight import check_train

    return check_train(load_config(TINY, overrides), world)


# ------------------------------------------------------------------------------------------------- 1. config
CONFIG_CASES = [
    # (overrides, needles: the key, the bad value, what is allowed)
    (["optimizer.lr=-0.001"], ["optimizer.lr", "-0.001", "> 0"]),
    (["optimizer.lr=.nan"], ["optimizer.lr", "nan", "> 0"]),
    (["optimizer.lr=.inf"], ["optimizer.lr", "inf", "> 0"]),
    (["optimizer.min_lr=0.1"], ["optimizer.min_lr", "0.1", "<= optimizer.lr"]),
    (["optimizer.beta1=1.0"], ["optimizer.beta1", "1.0", "in [0, 1)"]),
    (["optimizer.beta2=-0.5"], ["optimizer.beta2", "-0.5", "in [0, 1)"]),
    (["optimizer.eps=0"], ["optimizer.eps", "0", "> 0"]),
    (["optimizer.weight_decay=-0.1"], ["optimizer.weight_decay", "-0.1", ">= 0"]),
    (["lr_schedule.warmup_steps=-3"], ["lr_schedule.warmup_steps", "-3", ">= 0"]),
    (["lr_schedule.decay_steps=0"], ["lr_schedule.decay_steps", "0", ">= 1"]),
    (["train.eval_iters=-1"], ["train.eval_iters", "-1", ">= 1"]),
    (["train.eval_iters=0"], ["train.eval_iters", "0", ">= 1"]),
    (["train.eval_interval=-2"], ["train.eval_interval", "-2", ">= 0"]),
    (["train.save_interval=-1"], ["train.save_interval", "-1", ">= 0"]),
    (["train.keep_checkpoints=0"], ["train.keep_checkpoints", "0", ">= 1"]),
    (["train.seed=-5"], ["train.seed", "-5", "in [0, 4294967295]"]),
    (["train.micro_batch_size=0"], ["train.micro_batch_size", "0", ">= 1"]),
    (["logging.log_interval=0"], ["logging.log_interval", "0", ">= 1"]),
    (["logging.startup_watch_s=-1"], ["logging.startup_watch_s", "-1", ">= 0"]),
    (["model.init_std=0"], ["model.init_std", "0", "> 0"]),
    (["model.layernorm_epsilon=-1e-5"], ["model.layernorm_epsilon", "> 0"]),
    (["model.hidden_dropout=1.0"], ["model.hidden_dropout", "1.0", "in [0, 1)"]),
    (["model.max_position_embeddings=32"], ["model.max_position_embeddings", "32", ">= model.seq_length 64"]),
    (["model.vocab_size=0"], ["model.vocab_size", "0", ">= 1"]),
    (["model.make_vocab_size_divisible_by=0"], ["model.make_vocab_size_divisible_by", "0", ">= 1"]),
    (["parallel.virtual_pipeline=0"], ["parallel.virtual_pipeline", "0", ">= 1"]),
    (["data.num_workers=-1"], ["data.num_workers", "-1", ">= 0"]),
    (["data.mock_vocab_size=1"], ["data.mock_vocab_size", "1", ">= 2"]),
    (["data.mock=false", "data.split=a,b"], ["data.split", "'a,b'", "weights >= 0"]),
    (["data.mock=false", "data.split=0,1,1"], ["data.split", "'0,1,1'", "train split a weight > 0"]),
    (["data.mock=false", "data.split=1,1,1,1"], ["data.split", "up to 3"]),
    (["dst.interval=0"], ["dst.interval", "0", ">= 1"]),
    (["dst.drop_fraction=1.5"], ["dst.drop_fraction", "1.5", "in [0, 1]"]),
    (["dst.end=0"], ["dst.end", "0", "> 0"]),
    (["dst.begin=-1"], ["dst.begin", "-1", ">= 0"]),
    (["dst.exponential_rate=0"], ["dst.exponential_rate", "> 0"]),
    (["sparsity.mask_seed=-1"], ["sparsity.mask_seed", "-1"]),
    (["spectral.interval=-1"], ["spectral.interval", "-1", ">= 0"]),
    (["train.overwrite=true", "train.resume=auto"], ["train.overwrite", "train.resume", "set one of them"]),
]


@pytest.mark.parametrize("overrides, needles", CONFIG_CASES, ids=[c[0][-1] for c in CONFIG_CASES])
def test_config_rejected(overrides, needles):
    raises(lambda: load_config(TINY, overrides), *needles)


def test_every_numeric_field_has_a_range():
    """No int/float config key escapes the range table."""
    missing = []
    for section, cls in typing.get_type_hints(C.Config).items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            args = set(typing.get_args(hints[f.name])) or {hints[f.name]}
            if args & {int, float} and f"{section}.{f.name}" not in C.RANGES:
                missing.append(f"{section}.{f.name}")
    assert missing == []


def test_cli_log_interval_zero_is_one_line(tmp_path):
    """Used to pass `sift check` and die with ZeroDivisionError after step 1."""
    proc = sift("check", TINY, f"train.out_dir={tmp_path / 'r'}", "logging.log_interval=0")
    one_line(proc, "logging.log_interval must be >= 1, got 0")


def test_cli_negative_lr_fails_check(tmp_path):
    """Used to pass `sift check`, then AdamW raised a traceback."""
    one_line(sift("check", TINY, f"train.out_dir={tmp_path / 'r'}", "optimizer.lr=-1e-3"),
             "optimizer.lr must be > 0, got -0.001")
    assert not (tmp_path / "r").exists()


ZERO_CASES = [
    ("zero2.yaml", "zero_optimization:\n  stage: 2\n", ["zero.stage=1"],
     ["zero_optimization.stage 2", "zero.stage is 1", "zero.stage=2"]),
    ("batch.json", json.dumps({"train_batch_size": 64}), [], ["train_batch_size", "train.global_batch_size"]),
    ("clip.yaml", "gradient_clipping: 0.5\n", [], ["gradient_clipping", "optimizer.clip_grad"]),
    ("bad.json", "{not json", [], ["is not valid JSON"]),
    ("list.yaml", "- 1\n- 2\n", [], ["must hold a mapping"]),
    (None, None, ["zero.config_file=/nonexistent/ds.yaml"], ["zero.config_file not found", "/nonexistent/ds.yaml"]),
    (None, None, ["zero.extra={zero_optimization: {stage: 3}}"], ["zero.extra", "stage 3", "zero.stage is 1"]),
]


@pytest.mark.parametrize("name, text, overrides, needles", ZERO_CASES, ids=[str(c[0] or c[2][0]) for c in ZERO_CASES])
def test_deepspeed_settings_honoured_or_rejected(tmp_path, name, text, overrides, needles):
    if name:
        (tmp_path / name).write_text(text)
        overrides = [f"zero.config_file={tmp_path / name}", *overrides]
    raises(lambda: check([f"train.out_dir={tmp_path / 'r'}", *overrides]), *needles)
    assert not (tmp_path / "r").exists()


def test_shipped_configs_pass():
    """No false rejections: every config in configs/ loads and its DeepSpeed settings are accepted."""
    paths = [p for p in sorted((REPO / "configs").rglob("*.yaml")) if "deepspeed" not in p.parts]
    assert len(paths) > 20
    for p in paths:
        C.deepspeed_overrides(load_config(p))


def test_shipped_deepspeed_files_pass():
    for stage in (0, 1, 2, 3):
        cfg = load_config(TINY, [f"zero.stage={stage}", f"zero.config_file={REPO}/configs/deepspeed/zero{stage}.yaml"])
        assert C.deepspeed_overrides(cfg)["zero_optimization"]["stage"] == stage


# --------------------------------------------------------------------------------------------------- 2. data
def _corrupt_bin_short(p): truncate(Path(str(p) + ".bin"), 0.7)
def _corrupt_bin_long(p): Path(str(p) + ".bin").write_bytes(Path(str(p) + ".bin").read_bytes() + b"\0\0")
def _corrupt_idx_short(p): truncate(Path(str(p) + ".idx"), 0.6)
def _corrupt_idx_header(p): Path(str(p) + ".idx").write_bytes(b"NOTANIDX" + Path(str(p) + ".idx").read_bytes()[8:])
def _corrupt_idx_empty(p): Path(str(p) + ".idx").write_bytes(b"")
def _corrupt_idx_counts(p):
    b = bytearray(Path(str(p) + ".idx").read_bytes())
    b[18:26] = (10**6).to_bytes(8, "little")  # sequence count
    Path(str(p) + ".idx").write_bytes(bytes(b))
def _corrupt_pointers(p):
    b = bytearray(Path(str(p) + ".idx").read_bytes())
    n = int.from_bytes(b[18:26], "little")
    at = 34 + 4 * n + 8  # second sequence pointer
    b[at:at + 8] = (12345).to_bytes(8, "little")
    Path(str(p) + ".idx").write_bytes(bytes(b))
def _remove_bin(p): Path(str(p) + ".bin").unlink()


DATA_CASES = [
    ("bin_truncated", _corrupt_bin_short, [], ["data prefix", ".bin is", "truncated", "sift data preprocess"]),
    ("bin_too_long", _corrupt_bin_long, [], [".bin is", "bytes but"]),
    ("idx_truncated", _corrupt_idx_short, [], [".idx is", "truncated or corrupt"]),
    ("idx_bad_header", _corrupt_idx_header, [], ["not a Megatron index file"]),
    ("idx_empty", _corrupt_idx_empty, [], ["not a Megatron index file"]),
    ("idx_bad_counts", _corrupt_idx_counts, [], ["1000000 sequences", "truncated or corrupt"]),
    ("idx_bad_pointers", _corrupt_pointers, [], ["inconsistent lengths, pointers"]),
    ("bin_missing", _remove_bin, [], ["missing", ".bin"]),
    ("blend_odd", None, ["data.prefixes=[1.0, A, 2.0]"], ["alternate weight, prefix"]),
    ("blend_negative", None, ["data.prefixes=[-1.0, A, 1.0, A]"], ["blend weights must be > 0"]),
    ("valid_prefix_truncated", _corrupt_bin_short, ["data.valid_prefixes=[A]"], [".bin is", "truncated"]),
    ("tokenizer_missing", None, ["data.tokenizer=/nonexistent/tok"], ["tokenizer '/nonexistent/tok' not found"]),
    ("cache_dir_under_file", None, ["data.cache_dir=FILE/cache"], ["data.cache_dir", "is a file, not a directory"]),
]


@pytest.mark.parametrize("name, corrupt, extra, needles", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_rejected_before_any_write(corpus, tmp_path, name, corrupt, extra, needles):
    for ext in (".bin", ".idx"):
        shutil.copy(corpus / f"many{ext}", tmp_path / f"A{ext}")
    (tmp_path / "FILE").write_text("x")
    if corrupt:
        corrupt(tmp_path / "A")
    extra = [e.replace("A", str(tmp_path / "A")).replace("FILE", str(tmp_path / "FILE")) for e in extra]
    train = corpus / "many" if any("valid_prefixes" in e for e in extra) else tmp_path / "A"
    before = tree(tmp_path)
    raises(lambda: check([*data_args(corpus), f"data.prefixes=[{train}]", *extra,
                          f"train.out_dir={tmp_path / 'r'}"]), *needles)
    assert tree(tmp_path) == before  # nothing written, no run directory


@pytest.mark.parametrize("what", ["bin", "idx"])
def test_cli_truncated_data_is_one_line(corpus, tmp_path, what):
    for ext in (".bin", ".idx"):
        shutil.copy(corpus / f"many{ext}", tmp_path / f"A{ext}")
    truncate(tmp_path / f"A.{what}", 0.5)
    proc = sift("train", TINY, *data_args(corpus), f"data.prefixes=[{tmp_path / 'A'}]",
                f"train.out_dir={tmp_path / 'r'}", timeout=60)
    one_line(proc, f"A.{what}", "truncated")
    assert not (tmp_path / "r").exists()


def test_one_document_corpus_default_split_does_not_hang(corpus, tmp_path):
    """A corpus from one text file is one document: data.split=98,1,1 gives valid/test nothing and megatron's
    GPTDataset looped forever in _get_num_epochs, printing nothing."""
    proc = sift("train", TINY, *data_args(corpus, "one"), f"train.out_dir={tmp_path / 'r'}", timeout=60)
    one_line(proc, "data.split '98,1,1'", "valid split", "(1 in the file)", "data.split=100,0,0",
             "data.valid_prefixes")
    assert not (tmp_path / "r").exists()


def test_one_document_corpus_with_a_train_only_split_passes(corpus, tmp_path):
    check([*data_args(corpus, "one"), "data.split=100,0,0", f"train.out_dir={tmp_path / 'r'}"])
    check([*data_args(corpus, "one"), f"data.valid_prefixes=[{corpus / 'many'}]", f"train.out_dir={tmp_path / 'r'}"])
    assert not (tmp_path / "r").exists()


def test_split_check_agrees_with_megatron(corpus):
    """The split arithmetic is megatron's (sequences, rounded bookends). 40 documents at the default 98,1,1 leave
    the test split empty (megatron builds it even for 0 samples, and loops forever); 99.5,0.25,0.25 leaves valid
    empty. Splits that pass build every split in megatron."""
    import warnings

    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from data_prep.tokenizer import load_tokenizer
    from sift_megatron.preflight import check_data

    raises(lambda: check_data(load_config(TINY, [*data_args(corpus), "data.split=98,1,1"])), "test split",
           "(40 in the file)")
    raises(lambda: check_data(load_config(TINY, [*data_args(corpus), "data.split=99.5,0.25,0.25"])),
           "valid split")
    for split in ("90,5,5", "1,1,1", "98,2,0"):
        check_data(load_config(TINY, [*data_args(corpus), f"data.split={split}"]))
        dcfg = GPTDatasetConfig(random_seed=1, sequence_length=64, blend=([str(corpus / "many")], None), split=split,
                                tokenizer=load_tokenizer(corpus / "tok"), reset_position_ids=False,
                                reset_attention_mask=False, eod_mask_loss=False, path_to_cache=None,
                                mid_level_dataset_surplus=0.005)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = BlendedMegatronDatasetBuilder(GPTDataset, [8, 8, 0], lambda: True, dcfg).build()
        assert [d is not None and len(d) > 0 for d in built[:2]] == [True, True]


# -------------------------------------------------------------------------------------------- 3. checkpoints
def _ckpt(run_dir: Path, step: int = 2) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


CKPT_CASES = [
    ("data_file_truncated", lambda c: truncate(c / "__0_0.distcp"), ["__0_0.distcp", "corrupt or truncated"]),
    ("data_file_missing", lambda c: (c / "__0_0.distcp").unlink(), ["missing data file __0_0.distcp"]),
    ("index_truncated", lambda c: truncate(c / "dcp.json"), ["dcp.json", "corrupt or truncated"]),
    ("index_garbled", lambda c: (c / "dcp.json").write_text('{"format": "sift-dcp-1", "tensors": {"x": {}}}'),
     ["dcp.json", "corrupt"]),
    ("index_missing", lambda c: (c / "dcp.json").unlink(), ["missing dcp.json"]),
    ("meta_garbled", lambda c: (c / "meta.json").write_text("{step"), ["bad meta.json"]),
    ("meta_missing", lambda c: (c / "meta.json").unlink(), ["missing meta.json"]),
    ("config_missing", lambda c: (c / "config.yaml").unlink(), ["missing config.yaml"]),
]


@pytest.mark.parametrize("name, corrupt, needles", CKPT_CASES, ids=[c[0] for c in CKPT_CASES])
def test_bad_checkpoint_rejected_before_any_write(run, tmp_path, name, corrupt, needles):
    r = copy_run(run, tmp_path)
    corrupt(_ckpt(r))
    before = tree(r)
    raises(lambda: check([f"train.out_dir={r}", "train.resume=auto"]), *needles)
    assert tree(r) == before


@pytest.mark.parametrize("name, corrupt", [CKPT_CASES[0][:2], CKPT_CASES[1][:2]], ids=["truncated", "missing"])
def test_cli_bad_data_file_is_one_line(run, tmp_path, name, corrupt):
    r = copy_run(run, tmp_path)
    corrupt(_ckpt(r))
    before = tree(r)
    one_line(sift("train", TINY, f"train.out_dir={r}", "train.resume=auto", *QUIET, timeout=60), "__0_0.distcp")
    assert tree(r) == before


RESUME_CASES = [
    ("other_hidden_size", ["model.hidden_size=128"], ["does not fit this model", "model.hidden_size 64 -> 128"]),
    ("other_family", ["sparsity.family=wide", "sparsity.s=0.5"], ["does not fit this model", "sparsity.family"]),
    ("other_vocab", ["data.mock_vocab_size=512"], ["does not fit this model", "embedding.word_embeddings.weight"]),
    ("missing_path", ["train.resume=/nonexistent/ckpt"], ["'/nonexistent/ckpt' does not exist", "allowed: auto"]),
]


@pytest.mark.parametrize("name, overrides, needles", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_resume_mismatch_rejected(run, tmp_path, name, overrides, needles):
    r = copy_run(run, tmp_path)
    before = tree(r)
    raises(lambda: check([f"train.out_dir={r}", "train.resume=auto", *overrides]), *needles)
    assert tree(r) == before


def test_cli_resume_other_model_keeps_run_config(run, tmp_path):
    """A rejected resume with another model size used to rewrite the run's config.yaml first, breaking
    `sift convert` of that run."""
    r = copy_run(run, tmp_path)
    before = tree(r)
    one_line(sift("train", TINY, f"train.out_dir={r}", "train.resume=auto", "model.hidden_size=128", *QUIET,
                  timeout=60), "model.hidden_size 64 -> 128")
    assert tree(r) == before
    from sift_megatron.convert.source import load_source

    assert load_source(r).cfg.model.hidden_size == 64


def test_latest_naming_a_missing_checkpoint(run, tmp_path):
    r = copy_run(run, tmp_path)
    (r / "checkpoints" / "latest").write_text("step_000009\n")
    raises(lambda: check([f"train.out_dir={r}", "train.resume=auto"]), "names step_000009, which does not exist",
           f"train.resume={_ckpt(r)}")
    (r / "checkpoints" / "latest").unlink()
    raises(lambda: check([f"train.out_dir={r}", "train.resume=auto"]), "no 'latest' file", str(_ckpt(r)))


def test_pruning_keeps_the_new_and_the_latest_checkpoint(tmp_path):
    """Re-running into a directory with higher steps wrote step_000001 and pruning (keep the K highest) deleted
    it at once, leaving `latest` naming a missing directory."""
    from sift_megatron.training.checkpoint import _prune

    root = tmp_path / "checkpoints"
    for s in (1, 6, 7, 8):
        (root / f"step_{s:06d}").mkdir(parents=True)
    (root / ".tmp-step_000009").mkdir()
    (root / "latest").write_text("step_000001\n")
    _prune(root, 2, protect="step_000001")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001", "step_000008"]


# --------------------------------------------------------------------------------------------- 4. run dir
def test_cli_existing_run_without_resume_is_refused(run, tmp_path):
    r = copy_run(run, tmp_path)
    before = tree(r)
    one_line(sift("train", TINY, f"train.out_dir={r}", *QUIET, timeout=60), "already holds a run",
             "train.resume=auto", "train.overwrite=true")
    assert tree(r) == before  # metrics not appended to, checkpoints not overwritten


def test_overwrite_replaces_only_the_runs_outputs(run, tmp_path):
    from sift_megatron.preflight import claim_run_dir

    r = copy_run(run, tmp_path)
    (r / "notes.txt").write_text("mine")
    cfg = load_config(TINY, [f"train.out_dir={r}", "train.overwrite=true", "train.steps=7"])
    check([f"train.out_dir={r}", "train.overwrite=true"])  # accepted
    claim_run_dir(cfg)
    assert sorted(p.name for p in r.iterdir()) == ["config.yaml", "data_cache", "notes.txt"]
    assert load_config(r / "config.yaml").train.steps == 7


def test_an_empty_or_data_cache_only_directory_is_not_a_run(tmp_path):
    (tmp_path / "r" / "data_cache").mkdir(parents=True)
    check([f"train.out_dir={tmp_path / 'r'}"])


RUNDIR_CASES = [
    ("out_dir_is_file", lambda d: (d / "r").write_text("x"), ["train.out_dir", "is a file"]),
    ("out_dir_under_file", lambda d: (d / "f").write_text("x"), ["train.out_dir", "is a file, not a directory"]),
    ("checkpoints_is_file", lambda d: ((d / "r").mkdir(), (d / "r" / "checkpoints").write_text("x")),
     ["checkpoints is a file where the run writes a directory"]),
    ("metrics_is_dir", lambda d: (d / "r" / "metrics.jsonl").mkdir(parents=True),
     ["metrics.jsonl is a directory where the run writes a file"]),
]


@pytest.mark.parametrize("name, setup, needles", RUNDIR_CASES, ids=[c[0] for c in RUNDIR_CASES])
def test_colliding_run_dir(tmp_path, name, setup, needles):
    setup(tmp_path)
    out = tmp_path / ("f/r" if name == "out_dir_under_file" else "r")
    before = tree(tmp_path)
    raises(lambda: check([f"train.out_dir={out}", "train.resume=auto" if "checkpoints" in name else "train.save=true"]),
           *needles)
    assert tree(tmp_path) == before


def test_cli_unwritable_train_out_dir(tmp_path):
    one_line(sift("train", TINY, f"train.out_dir={UNWRITABLE}/r", timeout=60), "train.out_dir", "not writable")


# ------------------------------------------------------------------------------------------ 5. write paths
def test_cli_tokenizer_unwritable_and_colliding(corpus, tmp_path):
    one_line(sift("data", "tokenizer", "--input", corpus / "many.jsonl", "--vocab-size", 300, "--out",
                  f"{UNWRITABLE}/tok"), "--out", "not writable")
    (tmp_path / "f").write_text("x")
    one_line(sift("data", "tokenizer", "--input", corpus / "many.jsonl", "--vocab-size", 300, "--out",
                  tmp_path / "f" / "tok"), "--out", "is a file, not a directory")
    assert tree(tmp_path) == {"f": hashlib.sha256(b"x").hexdigest()}


def test_preprocess_unwritable_and_colliding(corpus, tmp_path):
    from data_prep.preprocess import preprocess

    raises(lambda: preprocess([str(corpus / "many.jsonl")], corpus / "tok", "/sys/corpus", progress=False),
           "--out", "/sys", "not writable")
    (tmp_path / "c.bin").mkdir()
    raises(lambda: preprocess([str(corpus / "many.jsonl")], corpus / "tok", tmp_path / "c", progress=False),
           "c.bin is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.bin"]


def test_cli_convert_unwritable_and_colliding(run, tmp_path):
    one_line(sift("convert", run[0], "--out", f"{UNWRITABLE}/hf"), "--out", "not writable")
    (tmp_path / "f").write_text("x")
    one_line(sift("convert", run[0], "--out", tmp_path / "f" / "hf"), "--out", "is a file, not a directory")


def test_spectral_unwritable_and_colliding(tmp_path):
    from sift_megatron.spectral.report import run as spectral

    (tmp_path / "f").write_text("x")
    (tmp_path / "d.json").mkdir()
    for kw, needles in ((dict(json_out=f"{UNWRITABLE}/m.json"), ["--json", "not writable"]),
                        (dict(csv_out=str(tmp_path / "f" / "m.csv")), ["--csv", "is a file, not a directory"]),
                        (dict(json_out=str(tmp_path / "d.json")), ["--json", "is a directory"])):
        raises(lambda kw=kw: spectral([str(tmp_path / "nothing")], **kw), *needles)


def test_oserror_anywhere_is_one_line(tmp_path, monkeypatch, capsys):
    """The CLI's safety net for a write path without its own check."""
    from sift_megatron import cli

    def boom(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setattr(cli, "build_parser", lambda: _parser_with(boom))
    assert cli.main(["boom"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Permission denied" in err[0] and str(tmp_path / "x") in err[0]


def _parser_with(func):
    import argparse

    p = argparse.ArgumentParser(prog="sift")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("boom").set_defaults(func=func)
    return p


# ------------------------------------------------------------------------------ 6. kill during every write
def killed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), (proc.returncode, proc.stderr[-2000:])


def visible(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if not p.name.startswith("."))


def test_kill_while_publishing_tokenizer_keeps_the_previous_one(corpus, tmp_path):
    shutil.copytree(corpus / "tok", tmp_path / "tok")
    before = tree(tmp_path / "tok")
    killed(sift("data", "tokenizer", "--input", corpus / "many.jsonl", "--vocab-size", 290, "--out", tmp_path / "tok",
                "--threads", 1, SIFT_FAULT_KILL_AT="publish_dir"))
    assert tree(tmp_path / "tok") == before and visible(tmp_path) == ["tok"]
    from data_prep.atomic import remove_stale_temps

    assert remove_stale_temps(tmp_path / "tok")  # the next run clears the dead run's temp directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_kill_while_publishing_preprocess_keeps_the_previous_output(corpus, tmp_path):
    for ext in (".bin", ".idx"):
        shutil.copy(corpus / f"many{ext}", tmp_path / f"c{ext}")
    before = tree(tmp_path)
    killed(sift("data", "preprocess", "--input", corpus / "one.txt", "--tokenizer", corpus / "tok", "--out",
                tmp_path / "c", "--no-progress", SIFT_FAULT_KILL_AT="publish_files"))
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith(".")} == before
    from sift_megatron.preflight import read_index

    assert read_index(str(tmp_path / "c")).sequences == 40


def test_kill_while_exporting_leaves_no_partial_export(run, tmp_path):
    killed(sift("convert", run[0], "--out", tmp_path / "hf", SIFT_FAULT_KILL_AT="publish_dir", timeout=180))
    assert visible(tmp_path) == []


def test_kill_while_writing_spectral_report_keeps_the_previous(tmp_path):
    """Spectral reports are written through one atomic writer: a kill there leaves the old file."""
    code = ("import sys; from sift_megatron.spectral.report import atomic_write; "
            "atomic_write(sys.argv[1], lambda p: p.write_text('new'))")
    (tmp_path / "m.json").write_text("old")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.json")], env=_env(
        SIFT_FAULT_KILL_AT="spectral_write"), capture_output=True, text=True, timeout=60, cwd=REPO)
    killed(proc)
    assert (tmp_path / "m.json").read_text() == "old" and visible(tmp_path) == ["m.json"]


@pytest.mark.parametrize("point", ["checkpoint_data", "atomic_write_text"])
def test_kill_while_checkpointing_keeps_previous_checkpoint_and_latest(run, tmp_path, point):
    """Resume the 2-step run and die inside the first write of that kind (the shards of the step-3
    checkpoint / the run's config.yaml at claim): step 2 and `latest` stay intact and loadable."""
    r = copy_run(run, tmp_path)
    before = tree(r / "checkpoints")
    config_before = (r / "config.yaml").read_bytes()
    killed(sift("train", TINY, f"train.out_dir={r}", "train.resume=auto", "train.steps=4", "train.save_interval=1",
                *QUIET, SIFT_FAULT_KILL_AT=point, timeout=180))
    if point == "atomic_write_text":  # the first such write of a resumed run is its config.yaml, at claim
        assert (r / "config.yaml").read_bytes() == config_before
    after = tree(r / "checkpoints")
    assert (r / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert {k: v for k, v in after.items() if k in before} == before
    assert not (r / "checkpoints" / "step_000003").exists()
    check([f"train.out_dir={r}", "train.resume=auto", "train.steps=3"])  # the previous checkpoint still loads


# --------------------------------------------------------------------------------------- 7. CLI and signals
def test_train_usage_does_not_list_overrides_as_required():
    proc = sift("train")
    assert proc.returncode == 2 and "required: config\n" in proc.stderr and "a.b=c\n" not in proc.stderr


def test_check_world_size_must_be_positive(tmp_path):
    proc = sift("check", TINY, "--world-size", "0")
    assert proc.returncode == 2 and "0 must be >= 1" in proc.stderr and "Traceback" not in proc.stderr


def test_signal_name_when_another_rank_got_it():
    from sift_megatron.training.trainer import Trainer

    t = object.__new__(Trainer)
    t._stop_signal = None
    assert t._signal_name() == "stop signal received by another rank"
    t._stop_signal = signal.SIGUSR1
    assert t._signal_name() == "signal SIGUSR1"


def test_sigterm_checkpoints_and_stops(tmp_path):
    """SIGTERM mid-run: the step finishes, a checkpoint is written, the log names the signal. The run has the
    start-up watch at 10 ms, so its start-up phases also say what they are doing."""
    out = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "sift_megatron.cli", "train", TINY, f"train.out_dir={out}",
                             "train.steps=200", "logging.tensorboard=false", "logging.progress=true",
                             "logging.startup_watch_s=0.01"],
                            env=_env(SIFT_STEP_DELAY_S="0.2"), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").is_file():
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "signal SIGTERM: checkpoint" in stdout + stderr and "signal None" not in stdout + stderr
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert (out / "checkpoints" / latest / "dcp.json").is_file()
    assert "[sift train] still building datasets (megatron index caches) after" in stderr
    assert "[sift train] done building the DeepSpeed engine in" in stderr


# ----------------------------------------------------------------------------- 8. honoured settings, watch
class _PidDataset:
    """Sample i = i in every field, and the reading process's pid in labels."""

    def __len__(self) -> int:
        return 13

    def __getitem__(self, i: int) -> dict:
        import numpy as np

        return {"tokens": np.full(4, i), "labels": np.full(4, os.getpid()), "loss_mask": np.ones(4),
                "position_ids": np.arange(4)}


def test_num_workers_is_honoured():
    """data.num_workers used to be read by nothing: now a DataLoader reads the same micro-batches in that many
    worker processes."""
    import torch

    from sift_megatron.training.data import micro_batches

    got, pids = {}, {}
    for workers in (0, 2):
        cfg = load_config(TINY, ["train.micro_batch_size=3", f"data.num_workers={workers}"])
        it = micro_batches(_PidDataset(), cfg, 1, 2, 5, torch.device("cpu"))
        batches = [next(it) for _ in range(4)]
        got[workers] = [b["tokens"][:, 0].tolist() for b in batches]
        pids[workers] = {int(p) for b in batches for p in b["labels"][:, 0]}
    assert got[0] == got[2] == [[8, 9, 10], [1, 2, 3], [7, 8, 9], [0, 1, 2]]
    assert pids[0] == {os.getpid()} and os.getpid() not in pids[2] and len(pids[2]) == 2


def test_startup_watch_prints_progress_lines():
    import io

    from sift_megatron.training.watch import StartupWatch

    buf = io.StringIO()
    with StartupWatch(0.05, rank=1, world=2, stream=buf).phase("building datasets"):
        deadline = time.time() + 30  # a phase that makes no progress until the watch has spoken 3 times
        while buf.getvalue().count("still") < 3 and time.time() < deadline:
            time.sleep(0.01)
    lines = buf.getvalue().splitlines()
    assert len([ln for ln in lines if "rank 1: still building datasets after" in ln]) >= 3
    assert lines[-1].startswith("[sift train] rank 1: done building datasets in")
    fast = io.StringIO()
    with StartupWatch(10, stream=fast).phase("building the model"):
        pass
    assert fast.getvalue() == ""  # a phase quicker than the limit stays silent
    quiet = io.StringIO()
    with StartupWatch(0, stream=quiet).phase("anything"):
        time.sleep(0.05)
    assert quiet.getvalue() == ""
