"""Checks that run before a command changes anything on disk, each failing with one line that names the bad
value and what is allowed: output paths, Megatron .bin/.idx files and the splits training reads from them,
the checkpoint a run resumes from, and the state of the run directory. Then `claim_run_dir` is the one
place a training run takes a directory over. No torch import: `sift check` and `sift train` run these
before the heavy imports, so a bad launch fails in about a second.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sift_megatron.config import (
    BatchSchedule,
    Config,
    deepspeed_overrides,
    effective_zero_stage,
    resolve_rampup,
    save_resolved,
    split_weights,
)
from sift_megatron.errors import SiftError
from sift_megatron.shards import INDEX_FILE, ShardedCheckpoint

LATEST = "latest"
# What makes a directory a run: written by `sift train` (a bare data_cache/ is not a run).
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints")
# What train.overwrite=true removes (nothing else in the directory is touched).
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "checkpoints", "tensorboard", "model.safetensors",
               "sparse_masks.safetensors", "logits.safetensors")


# ----------------------------------------------------------------------------------------------------------
# Output paths


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """`path` is (or can be created as) a directory we can write into. Probes with a real temp file in the
    nearest existing ancestor: os.access says yes to root even on read-only file systems."""
    path = Path(path).expanduser()
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            raise SiftError(f"{what} '{path}': '{probe}' is a dangling link; give a writable directory")
        probe = probe.parent
    if not probe.is_dir():
        raise SiftError(f"{what} '{path}': '{probe}' is a file, not a directory; give a writable directory path")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".sift-write-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise SiftError(f"{what} '{path}': directory '{probe}' is not writable ({e.strerror}); give a writable "
                        "directory") from None
    return path


def check_writable_file(path: str | os.PathLike, what: str) -> Path:
    """`path` names a file (not a directory) whose directory is writable."""
    path = Path(path).expanduser()
    if path.is_dir() or str(path).endswith(os.sep):
        raise SiftError(f"{what} '{path}' is a directory; give a file name")
    check_writable_dir(path.parent, what)
    return path


# ----------------------------------------------------------------------------------------------------------
# Megatron IndexedDataset files

_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron DType codes -> item size


@dataclass
class IndexInfo:
    sequences: int
    documents: int  # document boundaries (sequences + 1 for `sift data preprocess` output)
    tokens: int


def read_index(prefix: str) -> IndexInfo:
    """Validate PREFIX.idx (header, counts, offsets) against PREFIX.bin; reads only the index."""
    import numpy as np

    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    for f in (bin_, idx):
        if not f.is_file():
            raise SiftError(f"data prefix '{prefix}': missing {f} (run `sift data preprocess`)")
    where = f"data prefix '{prefix}'"
    size = idx.stat().st_size
    with open(idx, "rb") as fh:
        head = fh.read(_HEADER.size)
    if len(head) < len(_MAGIC) or head[: len(_MAGIC)] != _MAGIC:
        raise SiftError(f"{where}: {idx} is not a Megatron index file (bad header); rebuild it with "
                        "`sift data preprocess`")
    if len(head) < _HEADER.size:
        raise SiftError(f"{where}: {idx} is truncated ({size} bytes, the header alone needs {_HEADER.size}); "
                        "rebuild it with `sift data preprocess`")
    _, version, code, n_seq, n_doc = _HEADER.unpack(head)
    if version != 1 or code not in _DTYPE_SIZES:
        raise SiftError(f"{where}: {idx} has version {version} / dtype code {code}; allowed: version 1, dtype "
                        f"codes {sorted(_DTYPE_SIZES)}")
    want = _HEADER.size + 4 * n_seq + 8 * n_seq + 8 * n_doc
    if size != want:
        raise SiftError(f"{where}: {idx} is {size} bytes but its header ({n_seq} sequences, {n_doc} document "
                        f"indices) needs {want}: truncated or corrupt; rebuild it with `sift data preprocess`")
    mm = np.memmap(idx, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(mm, dtype=np.int32, count=n_seq, offset=_HEADER.size)
    pointers = np.frombuffer(mm, dtype=np.int64, count=n_seq, offset=_HEADER.size + 4 * n_seq)
    docs = np.frombuffer(mm, dtype=np.int64, count=n_doc, offset=_HEADER.size + 12 * n_seq)
    item = _DTYPE_SIZES[code]
    tokens = int(lengths.sum(dtype=np.int64))
    bad = (n_seq and (lengths.min() < 0 or pointers[0] != 0
                      or np.any(pointers[1:] != pointers[:-1] + lengths[:-1].astype(np.int64) * item))) or \
          (n_doc and (docs[0] != 0 or docs[-1] != n_seq or np.any(np.diff(docs) < 0)))
    if bad:
        raise SiftError(f"{where}: {idx} has inconsistent lengths, pointers or document indices (corrupt); "
                        "rebuild it with `sift data preprocess`")
    have = bin_.stat().st_size
    if have != tokens * item:
        raise SiftError(f"{where}: {bin_} is {have} bytes but {idx} describes {tokens} tokens x {item} bytes = "
                        f"{tokens * item}: truncated or from another run; rebuild both with `sift data preprocess`")
    return IndexInfo(n_seq, n_doc, tokens)


def _blend(prefixes: list, key: str) -> list[str]:
    if not prefixes:
        raise SiftError(f"{key} is empty: give Megatron .bin/.idx prefixes or set data.mock=true")
    if len(prefixes) > 1 and all(isinstance(x, (int, float)) for x in prefixes[0::2]):
        if len(prefixes) % 2:
            raise SiftError(f"{key} blend must alternate weight, prefix; got {prefixes}")
        if any(w <= 0 for w in prefixes[0::2]):
            raise SiftError(f"{key} blend weights must be > 0, got {prefixes[0::2]}")
        return [str(p) for p in prefixes[1::2]]
    return [str(p) for p in prefixes]


def check_data(cfg: Config) -> None:
    """Every prefix valid, and every split megatron will build gets at least one sequence: an empty split makes
    GPTDataset._get_num_epochs loop forever (megatron splits a prefix by sequence, rounding the bookends)."""
    d = cfg.data
    if d.mock:
        return
    if d.tokenizer is not None:
        from data_prep.hf_tokenizer import resolve

        resolve(d.tokenizer)  # ours, a sentencepiece model or a Hugging Face tokenizer (never downloaded)
    elif cfg.model.vocab_size is None:
        raise SiftError("set data.tokenizer (the tokenizer the data was made with: a `sift data tokenizer` or "
                        "Hugging Face tokenizer directory, or a name in the local Hugging Face cache), "
                        "model.vocab_size or data.mock=true")
    if d.cache_dir:
        check_writable_dir(d.cache_dir, "data.cache_dir")
    infos = {p: read_index(p) for p in _blend(d.prefixes, "data.prefixes")}
    if d.valid_prefixes:
        for p in _blend(d.valid_prefixes, "data.valid_prefixes"):
            if read_index(p).sequences == 0:
                raise SiftError(f"data.valid_prefixes: '{p}' has no documents; give a prefix with at least one")
        for p, info in infos.items():
            if info.sequences == 0:
                raise SiftError(f"data.prefixes: '{p}' has no documents; give a prefix with at least one")
        return
    weights = split_weights(d.split)
    bookends = [0.0]
    for w in weights:
        bookends.append(bookends[-1] + w)
    names = ("train", "valid", "test")
    for p, info in infos.items():
        n = info.sequences
        for i, name in enumerate(names):
            if weights[i] == 0:
                continue  # megatron builds no dataset for a zero-weight split
            got = int(round(bookends[i + 1] * n)) - int(round(bookends[i] * n))
            if got <= 0:
                raise SiftError(f"data.split {d.split!r} leaves the {name} split of '{p}' without documents "
                                f"({n} in the file); allowed: weights that give each non-zero split at least one "
                                f"document, a zero weight for {name} (e.g. data.split=100,0,0), data.valid_prefixes "
                                "or more documents")


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def layout_of(cfg: Config, dp: int) -> dict:
    """The parallel layout a run with `dp` data-parallel replicas saves in meta.json."""
    p = cfg.parallel
    return {"tp": p.tensor, "pp": p.pipeline, "vp": p.virtual_pipeline, "dp": dp,
            "zero": effective_zero_stage(cfg, dp)}


def _tag_step(p: Path) -> int:
    try:
        return int(p.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def complete_checkpoints(root: Path) -> list[Path]:
    """step_* directories under `root` holding an index and meta.json, by step."""
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / INDEX_FILE).is_file()
             and (p / "meta.json").is_file()]
    return sorted(found, key=_tag_step)


def resolve_resume(cfg: Config) -> Path | None:
    """`auto` -> <out_dir>/checkpoints/latest (None when the run has none yet); else a checkpoint directory or a
    checkpoints root / run directory holding `latest`."""
    spec = cfg.train.resume
    if spec is None:
        return None
    if spec == "auto":
        root = Path(cfg.train.out_dir) / "checkpoints"
        if not (root / LATEST).is_file():
            if complete_checkpoints(root):
                raise SiftError(f"train.resume=auto: {root} has checkpoints but no '{LATEST}' file; allowed: "
                                f"train.resume=<a checkpoint directory>, e.g. {complete_checkpoints(root)[-1]}")
            return None
        path = root / (root / LATEST).read_text().strip()
        if not path.is_dir():
            newest = complete_checkpoints(root)
            hint = f"; the newest complete one is {newest[-1]}: set train.resume={newest[-1]}" if newest else ""
            raise SiftError(f"train.resume=auto: {root / LATEST} names {path.name}, which does not exist{hint}")
        return path
    path = Path(spec)
    for root in (path, path / "checkpoints"):
        if (root / LATEST).is_file():
            path = root / (root / LATEST).read_text().strip()
            break
    if not path.is_dir():
        raise SiftError(f"train.resume: checkpoint {spec!r} does not exist (allowed: auto, a checkpoint directory "
                        "or a run directory)")
    return path


def expected_model_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Logical tensor shapes of the model this config builds (what model.safetensors must hold)."""
    from sift_megatron.ift.flops import padded_vocab_size
    from sift_megatron.ift.sizes import expected_shapes, transformed_shape

    if cfg.model.vocab_size:
        vocab = cfg.model.vocab_size
    elif cfg.data.mock or not cfg.data.tokenizer:
        vocab = cfg.data.mock_vocab_size
    else:
        from data_prep.hf_tokenizer import vocab_size

        vocab = vocab_size(cfg.data.tokenizer)
    padded = padded_vocab_size(vocab, cfg.parallel.tensor, cfg.model.make_vocab_size_divisible_by)
    return expected_shapes(cfg, transformed_shape(cfg), padded)


def check_checkpoint(cfg: Config, path: Path, world: int) -> ShardedCheckpoint:
    """Everything a resume will read is present, whole and fits this model (names and logical shapes), from
    the JSON files alone: a bad checkpoint is a one-line error before any rank loads a byte of it. Returns it
    opened (its index parsed) for the load."""
    for name in ("meta.json", INDEX_FILE, "config.yaml"):
        if not (path / name).is_file():
            raise SiftError(f"checkpoint {path} is incomplete or corrupt: missing {name} (allowed: a directory written by "
                            "`sift train`)")
    try:
        meta = json.loads((path / "meta.json").read_text())
        meta["layout"]["tp"], int(meta["step"]), int(meta.get("optimizer_step") or 0)
    except (OSError, ValueError, KeyError, TypeError):
        raise SiftError(f"checkpoint {path} is incomplete or corrupt: bad meta.json") from None
    # The ramp is indexed by step: the same step after other samples would shift the batches and the LR schedule.
    saved = meta["layout"]
    step, done, r = int(meta["step"]), meta.get("consumed_samples"), cfg.train.rampup_batch_size
    here = BatchSchedule(cfg).samples_before(step)
    if r and done is not None and int(done) != here:
        raise SiftError(f"checkpoint {path} is at step {step} after {int(done):,} samples, but this run's batch ramp "
                        f"(train.rampup_batch_size {r} at micro_batch_size x DP = {cfg.train.micro_batch_size} x "
                        f"{world // (cfg.parallel.tensor * cfg.parallel.pipeline)}) reaches step {step} after "
                        f"{here:,}: resume with the ramp, global batch and data-parallel size it was saved with "
                        f"(DP {saved.get('dp') if isinstance(saved, dict) else '?'})")
    ckpt = ShardedCheckpoint(path)
    got = {k[len("model/"):]: tuple(v["size"]) for k, v in ckpt.tensors.items() if k.startswith("model/")}
    expected = expected_model_shapes(cfg)
    problem = None
    for k, want in expected.items():
        if got.get(k) != want:
            problem = (f"tensor {k!r} is {list(got[k])} in the checkpoint, this model needs {list(want)}" if k in got
                       else f"the checkpoint has no tensor {k!r}")
            break
    extra = [k for k in got if k not in expected and not (k.endswith(".mask") and k[:-4] + "weight" in expected)]
    if problem is None and extra:
        problem = f"the checkpoint has tensors this model lacks (e.g. {extra[0]!r})"
    if problem:
        raise SiftError(f"checkpoint {path} does not fit this model: {problem}{config_diff(cfg, path)}")
    saved_sp = _saved_config(path).get("sparsity") or {}  # masks of another structure would break DST
    for key, default in (("pattern", "unstructured"), ("block", 1)):
        old = saved_sp.get(key, default)
        if str(old) != str(getattr(cfg.sparsity, key)):
            raise SiftError(f"checkpoint {path} has sparsity.{key} {old!r} masks, this run sets sparsity.{key} "
                            f"{getattr(cfg.sparsity, key)!r}; allowed: resume with the structure it was saved with")
    return ckpt


def _saved_config(path: Path) -> dict:
    """The checkpoint's config.yaml as a mapping ({} when it cannot be read)."""
    import yaml

    try:
        saved = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return saved if isinstance(saved, dict) else {}


def config_diff(cfg: Config, path: Path) -> str:
    """'; config differs: model.hidden_size 64 -> 128, ...' from the checkpoint's config.yaml (shape-defining
    sections only), or '' when it cannot tell."""
    import dataclasses

    saved = _saved_config(path)
    diffs = []
    for section in ("model", "sparsity"):
        now = dataclasses.asdict(getattr(cfg, section))
        old = saved.get(section) or {}
        diffs += [f"{section}.{k} {old[k]!r} -> {v!r}" for k, v in now.items() if k in old and old[k] != v]
    return f"; config differs: {', '.join(diffs)}" if diffs else ""


# ----------------------------------------------------------------------------------------------------------
# The run directory


def holds_run(out: Path) -> bool:
    return any((out / m).exists() for m in RUN_MARKERS)


def check_run_dir(cfg: Config) -> None:
    out = check_writable_dir(cfg.train.out_dir, "train.out_dir")
    if out.exists() and not out.is_dir():
        raise SiftError(f"train.out_dir '{out}' is a file; give a directory")
    for name in RUN_OUTPUTS:
        p, want_dir = out / name, name in ("checkpoints", "tensorboard")
        if p.exists() and p.is_dir() != want_dir:
            raise SiftError(f"train.out_dir '{out}': {p} is a {'file' if want_dir else 'directory'} where the run "
                            f"writes a {'directory' if want_dir else 'file'}; move it or choose a new train.out_dir")
    if cfg.train.resume is None and not cfg.train.overwrite and holds_run(out):
        raise SiftError(f"train.out_dir '{out}' already holds a run; allowed: train.resume=auto to continue it, "
                        "train.overwrite=true to replace it, or a new train.out_dir")


@dataclass
class Checked:
    """What check_train passed, for the Trainer of this process: the world size, and the checkpoint to resume
    from (opened: its index is parsed once, here, and the load reuses it) or None."""
    world: int
    resume: ShardedCheckpoint | None


def check_train(cfg: Config, world: int) -> Checked:
    """Everything `sift train` can check before it writes anything, once per process."""
    from sift_megatron.ift.flops import check_pattern_fits
    from sift_megatron.layout import check_layout

    dp, _ = check_layout(cfg, world)
    resolve_rampup(cfg, dp)  # train.rampup_tokens at this layout; steps of a tokens budget follow the ramp
    check_pattern_fits(cfg)  # block / N:M masks: whole tiles / groups on every TP shard
    deepspeed_overrides(cfg)
    tp_pp = cfg.parallel.tensor * cfg.parallel.pipeline
    if cfg.train.save and world % tp_pp == 0 and effective_zero_stage(cfg, world // tp_pp) == 3:
        raise SiftError("train.save: checkpoints of zero.stage 3 runs are not supported (its parameters live in "
                        "DeepSpeed's partitions); allowed: zero.stage 0, 1 or 2, or train.save=false")
    check_run_dir(cfg)
    check_data(cfg)
    path = resolve_resume(cfg)
    return Checked(world, None if path is None else check_checkpoint(cfg, path, world))


def claim_run_dir(cfg: Config) -> None:
    """Take the run directory over (rank 0, after every check has passed): with train.overwrite the previous
    run's outputs go first, then the resolved config is written."""
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.overwrite:
        for name in RUN_OUTPUTS:
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    save_resolved(cfg, out / "config.yaml")
