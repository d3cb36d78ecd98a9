"""Read what `sift train` leaves behind and check it before converting: a sharded checkpoint (config.yaml +
meta.json + dcp.json and the per-rank data files, sift_megatron/shards.py) or a whole-model model.safetensors.

Every failure is a one-line SiftError: a missing or truncated checkpoint, or tensors whose names/shapes do
not match the model that config.yaml describes (e.g. a config.yaml copied from another run). The check
runs against shapes computed from the config alone, so it needs neither torch.distributed nor megatron.
Only the index / header is read up front; tensors are read one at a time when used (LazyTensors, DcpTensors),
so a conversion holds about one logical tensor, never the model.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sift_megatron.errors import SiftError, first_line
from sift_megatron.ift.sizes import expected_shapes
from sift_megatron.layout import SLOTS

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
LATEST = "latest"



@dataclass
class Source:
    """A loaded checkpoint: the resolved config, the transformed model shape and the logical tensors."""

    path: Path  # directory holding config.yaml + model.safetensors
    cfg: object  # sift_megatron.config.Config
    shape: object  # sift_megatron.ift.sizes.ModelShape
    tensors: LazyTensors  # name -> torch.Tensor (logical TP=1 shapes), read on access
    step: int
    vocab_size: int  # unpadded: rows kept in the export
    padded_vocab_size: int

    @property
    def max_positions(self) -> int:
        m = self.cfg.model
        return m.max_position_embeddings or m.seq_length

    def layer(self, i: int, slot: str) -> str:
        return f"decoder.layers.{i}.{SLOTS[slot][0]}"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory, a checkpoint directory (both hold config.yaml + model.safetensors), or a checkpoints
    root / run directory whose `latest` pointer names one."""
    p = Path(path)
    if not p.exists():
        raise SiftError(f"checkpoint '{p}' not found")
    if not p.is_dir():
        raise SiftError(f"checkpoint '{p}' is not a directory (give a run or checkpoint directory)")
    from sift_megatron.shards import INDEX_FILE

    if (p / MODEL_FILE).exists() or (p / INDEX_FILE).exists():
        return p
    for root in (p, p / "checkpoints"):
        if (root / LATEST).is_file():
            tag = (root / LATEST).read_text().strip()
            if tag and ((root / tag / MODEL_FILE).exists() or (root / tag / INDEX_FILE).exists()):
                return root / tag
    raise SiftError(f"checkpoint '{p}' has no {MODEL_FILE} nor a sharded checkpoint ({INDEX_FILE}); give a run "
                    "directory or a checkpoint written by `sift train`")


class LazyTensors(Mapping):
    """name -> tensor of one safetensors file, read from disk on each access (float32 unless a uint8 mask),
    so a conversion holds one logical tensor at a time, never the whole model. Each read opens the file
    anew: what an open file keeps (its mapped pages) goes with each read (measured: folding a doped matrix
    block by block through one open file peaked 50 MB higher than with an open per block), and a file
    damaged after the header check is a one-line error."""

    def __init__(self, file: Path, shapes: dict[str, tuple[int, ...]]):
        self.file, self.shapes = file, shapes

    def __getitem__(self, name: str):
        return self.read(name)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __contains__(self, name) -> bool:
        return name in self.shapes

    def read(self, name: str, rows: int | slice | None = None):
        """The tensor, or only its first `rows` rows / the rows of a slice (read as a slice: the rest never
        leaves the disk)."""
        if name not in self.shapes:
            raise KeyError(name)
        _trim_heap()
        with _reading(self.file):
            from safetensors import safe_open

            with safe_open(str(self.file), framework="pt") as f:  # closed at once: see the class docstring
                t = (f.get_tensor(name) if rows is None else
                     f.get_slice(name)[rows if isinstance(rows, slice) else slice(rows)])
        return t if name.endswith(".mask") else t.float()


class DcpTensors(LazyTensors):
    """The same, from a sharded checkpoint (a shards.ShardedCheckpoint): each read assembles one logical tensor
    (or rows of it) from the boxes the ranks saved, in this process."""

    def __init__(self, checkpoint):
        self.file, self.checkpoint = checkpoint.path, checkpoint
        self.shapes = {k[len("model/"):]: tuple(v["size"]) for k, v in checkpoint.tensors.items()
                       if k.startswith("model/")}

    def read(self, name: str, rows: int | slice | None = None):
        import torch

        if name not in self.shapes:
            raise KeyError(name)
        _trim_heap()
        size = self.shapes[name]
        r = range(size[0])[rows if isinstance(rows, slice) else slice(rows)]
        if r.step != 1:
            raise ValueError(f"{name}: only contiguous row ranges are read, got {rows}")
        t = self.checkpoint.read("model/" + name, offsets=[r.start] + [0] * (len(size) - 1),
                                 shape=[len(r), *size[1:]])
        return t.to(torch.uint8) if name.endswith(".mask") else t.float()


@functools.cache
def _malloc_trim():
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS before the next tensor. glibc serves blocks below its mmap
    threshold (which grows to 32 MB as big blocks are freed) from the heap and keeps them there once freed,
    so without this a conversion's RSS creeps up and varies from run to run (measured converting a 286 MB
    checkpoint with 32 MB shards: 58-75 MB peak growth without it, a steady 56 MB with it)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@contextmanager
def _reading(file: Path):
    """A truncated or garbled file is a one-line error, never a traceback. safetensors never unpickles:
    loading cannot execute code."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SiftError(f"checkpoint file '{file}' is corrupt or truncated ({first_line(e)})") from None


def _read_header(file: Path) -> tuple[dict, dict]:
    """Shapes of all tensors + metadata, from the header alone (safetensors checks on open that the file
    covers every tensor's bytes, so a lost tail is caught here, before anything is converted)."""
    from safetensors import safe_open

    with _reading(file), safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return shapes, meta


def _meta_int(meta: dict, key: str, file: Path) -> int:
    try:
        return int(meta[key])
    except (KeyError, ValueError):
        raise SiftError(f"checkpoint file '{file}' lacks metadata '{key}' (not written by `sift train`?)") from None


def check_tensors(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], file: Path,
                  what: str) -> None:
    """Names and shapes must be exactly those of the configured model; masks (uint8, optional) must sit
    beside a weight of the same shape."""
    def fmt(s) -> str:
        return "[" + ", ".join(str(x) for x in s) + "]"

    for name, want in expected.items():
        if name not in shapes:
            raise SiftError(f"{file} does not match {what}: missing tensor '{name}' {fmt(want)}")
        got = tuple(shapes[name])
        if got != want:
            raise SiftError(f"{file} does not match {what}: '{name}' has shape {fmt(got)}, expected {fmt(want)}")
    for name, got in shapes.items():
        if name in expected:
            continue
        weight = name[: -len("mask")] + "weight" if name.endswith(".mask") else None
        if weight is None or weight not in expected:
            raise SiftError(f"{file} does not match {what}: unexpected tensor '{name}'")
        if tuple(got) != expected[weight]:
            raise SiftError(f"{file} does not match {what}: mask '{name}' has shape {fmt(got)}, expected "
                            f"{fmt(expected[weight])}")


def load_source(path: str | os.PathLike, tokenizer: str | None = None) -> Source:
    """Resolve and validate a checkpoint from its header; tensors are read lazily, as float32 CPU tensors."""
    from sift_megatron.config import load_config
    from sift_megatron.ift.sizes import transformed_shape

    d = resolve_checkpoint(path)
    cfg_file = d / CONFIG_FILE
    if not cfg_file.is_file():
        raise SiftError(f"checkpoint '{d}' has no {CONFIG_FILE} (the resolved training config)")
    cfg = load_config(cfg_file)
    if tokenizer is not None:
        cfg.data.tokenizer = str(tokenizer)
    shape = transformed_shape(cfg)  # at the training TP: the shapes that were saved
    file = d / MODEL_FILE
    if file.exists():
        shapes, meta = _read_header(file)
    else:  # a sharded checkpoint
        import json

        from sift_megatron.shards import ShardedCheckpoint

        file = d / "meta.json"
        try:
            meta = json.loads(file.read_text())
        except (OSError, ValueError):
            raise SiftError(f"checkpoint '{d}' has no readable meta.json") from None
        tensors = DcpTensors(ShardedCheckpoint(d))
        shapes = tensors.shapes
    step = _meta_int(meta, "step", file)
    vocab = _meta_int(meta, "vocab_size", file)
    padded = _meta_int(meta, "padded_vocab_size", file)
    if not 0 < vocab <= padded:
        raise SiftError(f"checkpoint file '{file}': vocab_size {vocab} / padded_vocab_size {padded} are inconsistent")
    what = f"{cfg_file} (family {shape.family}, hidden {shape.hidden_size}, {cfg.model.num_layers} layers)"
    check_tensors(shapes, expected_shapes(cfg, shape, padded), file, what)
    lazy = LazyTensors(file, shapes) if file.name == MODEL_FILE else tensors
    return Source(d, cfg, shape, lazy, step, vocab, padded)


def single_rank_config(cfg):
    """The same model laid out on one rank (TP=PP=1, no VP/SP): what conversion and the reference build."""
    c = dataclasses.replace(cfg)
    c.parallel = dataclasses.replace(cfg.parallel, tensor=1, pipeline=1, virtual_pipeline=None,
                                     sequence_parallel=False)
    return c
