"""Read the masks of a checkpoint: `sparse_masks.safetensors` (contract in sift_megatron/sparse/export.py).

Keys `<layer>.mask` (uint8 0/1 or bool, logical [out, in], already gathered across TP shards) and optional
`<layer>.weight` (float32, same shape); metadata {"step": "<int>"}. A `model.safetensors` (whole model with
masks) reads the same way, so it is accepted where no sparse_masks file exists. A sharded checkpoint directory
(dcp.json: `model/<layer>.mask` and `model/<layer>.weight`, sift_megatron/shards.py) is read layer by layer,
each assembled from the ranks' boxes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from sift_megatron.errors import SiftError
from sift_megatron.shards import INDEX_FILE  # torch-free at import

MASKS_FILE = "sparse_masks.safetensors"  # same name as sparse.export.MASKS_FILE (that module imports torch)
FALLBACK_FILE = "model.safetensors"
LATEST = "latest"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _follow_latest(d: Path) -> Path | None:
    """The checkpoint a `latest` pointer file in d names, or None when d has no pointer."""
    pointer = d / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    target = d / tag
    if not tag or not target.is_dir():
        raise SiftError(f"{pointer} names {tag!r}, which is not a checkpoint directory in {d}")
    return target


def resolve_masks_file(path: str | os.PathLike) -> Path:
    """A .safetensors file itself, a checkpoint directory, a checkpoints root with `latest`, or a run
    directory (its own sparse_masks.safetensors, else checkpoints/latest)."""
    p = Path(path)
    if not p.exists():
        raise SiftError(f"{p}: no such file or directory")
    if p.is_file():
        return p
    seen: list[Path] = []
    d: Path | None = p
    while d is not None and d not in seen and len(seen) < 4:
        seen.append(d)
        for name in (MASKS_FILE, FALLBACK_FILE):
            if (d / name).is_file():
                return d / name
        if (d / INDEX_FILE).is_file():
            return d
        d = _follow_latest(d) or (_follow_latest(d / "checkpoints") if (d / "checkpoints").is_dir() else None)
    raise SiftError(f"{p}: checkpoint has no {MASKS_FILE} (a dense model, or saved before masks were exported)")


class LazyMasks(Mapping):
    """{layer: (mask bool [out, in], weight float32 or None)} that reads a layer only when asked for it."""

    def __init__(self, path: Path, names: list[str], weights: set[str], checkpoint=None):
        self.path, self._names, self._weights = path, names, weights
        self.checkpoint = checkpoint  # a shards.ShardedCheckpoint, else `path` is a safetensors file

    def __getitem__(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        if name not in self._names:
            raise KeyError(name)
        try:
            mask = self._load(f"{name}.mask")
            weight = self._load(f"{name}.weight") if name in self._weights else None
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
            raise SiftError(f"{self.path}: cannot read layer {name!r}: {_one_line(e)}") from None
        if mask.ndim < 2:
            raise SiftError(f"{self.path}: {name}.mask has shape {list(mask.shape)}; expected [out, in]")
        if weight is not None and weight.shape != mask.shape:
            raise SiftError(f"{self.path}: {name}.weight shape {list(weight.shape)} != mask shape {list(mask.shape)}")
        mask = mask if mask.dtype == np.bool_ else mask != 0
        if weight is not None and weight.dtype != np.float32:
            weight = weight.astype(np.float32)
        return mask, weight

    def _load(self, key: str) -> np.ndarray:
        if self.checkpoint is None:
            return _load(self.path, key)
        import torch

        out = self.checkpoint.read("model/" + key)
        return out.numpy() if out.dtype == torch.bool else out.float().numpy()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _load(path: Path, key: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        if f.get_slice(key).get_dtype() not in ("BF16", "F8_E4M3", "F8_E5M2"):
            return f.get_tensor(key)
    with safe_open(str(path), framework="pt") as f:  # no numpy dtype: via torch, only then
        return f.get_tensor(key).float().numpy()


def open_masks(path: str | os.PathLike) -> tuple[int | None, LazyMasks]:
    """(step, lazy {layer: (mask, weight | None)}) after checking the file's header."""
    file = resolve_masks_file(path)
    if file.is_dir():
        return _open_sharded(file)
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="np") as f:
            keys = list(f.keys())
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001
        raise SiftError(f"{file}: not a readable safetensors file ({_one_line(e)})") from None
    names = [k[: -len(".mask")] for k in keys if k.endswith(".mask")]
    if not names:
        raise SiftError(f"{file}: no '<layer>.mask' tensors (a dense model?)")
    keyset = set(keys)
    weights = {n for n in names if f"{n}.weight" in keyset}
    step = meta.get("step")
    try:
        step = int(step) if step is not None else None
    except ValueError:
        raise SiftError(f"{file}: metadata step {step!r} is not an integer") from None
    return step, LazyMasks(file, names, weights)


def _open_sharded(d: Path) -> tuple[int | None, LazyMasks]:
    import json

    from sift_megatron.shards import ShardedCheckpoint

    ck = ShardedCheckpoint(d)
    keys = {k[len("model/"):] for k in ck.tensors if k.startswith("model/")}
    names = sorted(k[: -len(".mask")] for k in keys if k.endswith(".mask"))
    if not names:
        raise SiftError(f"{d}: no '<layer>.mask' tensors (a dense model?)")
    try:
        step = int(json.loads((d / "meta.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        step = None
    return step, LazyMasks(d, names, {n for n in names if f"{n}.weight" in keys}, checkpoint=ck)


def read_masks(path: str | os.PathLike, lazy: bool = False) -> tuple[int | None, Mapping[str, tuple[np.ndarray, np.ndarray | None]]]:
    """(step or None, {layer: (mask bool, weight float32 or None)}) from a checkpoint dir or the file.
    lazy=True returns a Mapping that reads each layer on access (bounded memory for big models)."""
    step, masks = open_masks(path)
    if lazy:
        return step, masks
    return step, {name: masks[name] for name in masks}


def from_flat(tensors: Mapping[str, object]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """{layer: (mask, weight | None)} from the flat `<layer>.mask` / `<layer>.weight` dict the training code
    gathers (torch tensors or numpy arrays), for analysis during training without writing a file."""

    def arr(t, weight: bool) -> np.ndarray:
        if hasattr(t, "detach"):  # a torch tensor; torch itself is never imported here
            t = t.detach().cpu()
            t = t.float() if weight else t
            return t.numpy()
        return np.asarray(t, dtype=np.float32) if weight else np.asarray(t)

    out = {}
    for key, t in tensors.items():
        if key.endswith(".mask"):
            name = key[: -len(".mask")]
            w = tensors.get(f"{name}.weight")
            out[name] = (arr(t, False) != 0, None if w is None else arr(w, True))
    return out
