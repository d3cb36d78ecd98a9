"""Sharded tensors saved with torch.distributed.checkpoint (DCP), and no pickle anywhere.

Each rank describes the boxes of logical tensors it holds (`Pieces`: a tensor-parallel shard, or the
rectangles a ZeRO partition's flat fragment covers). DCP writes every box once (replicas deduplicated across
ranks, balanced by size), one file per rank, in parallel; on load each rank asks for exactly the boxes it
needs and DCP reads them from whichever saved boxes overlap: that is resharding across TP/PP/DP/ZeRO.

DCP keeps its index in a pickled `.metadata` file; here the index is JSON (`INDEX_FILE`), so loading never
unpickles: the data files are read by DCP with torch.load(weights_only=True), and the index admits tensors
only (no BYTE_IO items, whose load would unpickle). This module knows nothing of models.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sift_megatron.errors import SiftError, first_line

if TYPE_CHECKING:
    import torch

INDEX_FILE = "dcp.json"
DTYPES = ("torch.float64", "torch.float32", "torch.bfloat16", "torch.float16", "torch.int64", "torch.int32",
          "torch.int16", "torch.int8", "torch.uint8", "torch.bool")


class Pieces:
    """The boxes of one logical tensor of global shape `size` that this rank holds: [(offsets, tensor)].
    Implements DCP's checkpointable protocol (as DTensor does), so DCP saves and loads the boxes in place."""

    def __init__(self, size: Sequence[int], pieces: Iterable[tuple[Sequence[int], torch.Tensor]]):
        import torch

        self._size = torch.Size(size)
        self.pieces = {torch.Size(o): t for o, t in pieces if t.numel()}

    def size(self):
        return self._size

    def __create_write_items__(self, fqn: str, obj) -> list:
        from torch.distributed.checkpoint.metadata import (
            ChunkStorageMetadata,
            MetadataIndex,
            TensorProperties,
        )
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        return [WriteItem(index=MetadataIndex(fqn, o), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=o, sizes=t.size()),
                                                      properties=TensorProperties(dtype=t.dtype), size=self._size))
                for o, t in self.pieces.items()]

    def __create_chunk_list__(self) -> list:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        return [ChunkStorageMetadata(offsets=o, sizes=t.size()) for o, t in self.pieces.items()]

    def __get_tensor_shard__(self, index):
        return self.pieces[tuple(index.offset)]


def torch_dtype(name: str):
    """The torch dtype an index entry names ("torch.float32" -> torch.float32); the index admits DTYPES only."""
    import torch

    return getattr(torch, name.split(".")[1])


def flat_fragment(size: Sequence[int], shard_shape: Sequence[int], shard_offsets: Sequence[int],
                  start: int, flat) -> list[tuple[list[int], object]]:
    """Boxes of a flat range [start, start + len(flat)) of a row-major shard (1-D or 2-D) placed at
    `shard_offsets` in the logical tensor: at most three rectangles (a partial row, whole rows, a partial
    row), each a view of `flat`. This is how a ZeRO partition's fragment of a parameter is saved."""
    n = flat.numel()
    if len(shard_shape) == 1:
        return [([shard_offsets[0] + start], flat)] if n else []
    if len(shard_shape) != 2:
        raise ValueError(f"flat_fragment: {len(shard_shape)}-D tensors are not supported (1-D or 2-D)")
    cols = shard_shape[1]
    boxes, pos, end = [], start, start + n
    while pos < end:
        r, c = divmod(pos, cols)
        if c or end - pos < cols:  # a partial row
            rows, width = 1, min(cols - c, end - pos)
        else:
            rows, width = (end - pos) // cols, cols
        view = flat[pos - start: pos - start + rows * width].view(rows, width)
        boxes.append(([shard_offsets[0] + r, shard_offsets[1] + c], view))
        pos += rows * width
    return boxes


# ------------------------------------------------------------------------------------------------ index
def _index_to_json(md) -> dict:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    tensors = {}
    for fqn, m in md.state_dict_metadata.items():
        if not isinstance(m, TensorStorageMetadata):
            raise TypeError(f"{fqn}: only tensors are checkpointed, got {type(m).__name__}")
        tensors[fqn] = {"dtype": str(m.properties.dtype), "size": list(m.size),
                        "chunks": [[list(c.offsets), list(c.sizes)] for c in m.chunks]}
    storage = [{"fqn": i.fqn, "offset": list(i.offset), "file": s.relative_path, "pos": s.offset, "length": s.length}
               for i, s in md.storage_data.items()]
    return {"format": "sift-dcp-1", "version": md.version, "tensors": tensors, "storage": storage}


def _index_from_json(d: dict):
    """DCP's Metadata from the JSON index: tensors only, data files inside the checkpoint directory."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    _check_index(d)
    sdm = {fqn: TensorStorageMetadata(
        properties=TensorProperties(dtype=torch_dtype(t["dtype"])), size=torch.Size(t["size"]),
        chunks=[ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s in t["chunks"]])
        for fqn, t in d["tensors"].items()}
    storage = {MetadataIndex(s["fqn"], s["offset"]): _StorageInfo(s["file"], int(s["pos"]), int(s["length"]))
               for s in d["storage"]}
    return Metadata(state_dict_metadata=sdm, storage_data=storage, version=d.get("version"))


def _check_index(d: dict) -> None:
    """Types and names of the JSON index (what a crafted one could abuse), or ValueError."""
    if not isinstance(d, dict) or d.get("format") != "sift-dcp-1":
        raise ValueError("not a sift-dcp-1 index")
    for fqn, t in d["tensors"].items():
        if t["dtype"] not in DTYPES or not all(isinstance(x, int) and x >= 0 for x in t["size"]):
            raise ValueError(f"tensor {fqn!r}: bad dtype or size")
    for s in d["storage"]:
        if not isinstance(s["file"], str) or Path(s["file"]).name != s["file"] or s["file"].startswith("."):
            raise ValueError(f"data file {s['file']!r} is not a plain file name")
        if not all(isinstance(s[k], int) and s[k] >= 0 for k in ("pos", "length")):
            raise ValueError(f"bad storage entry for {s['fqn']!r}")


def read_index(path: str | os.PathLike) -> dict:
    """The JSON index of a checkpoint directory: {"tensors": {fqn: {dtype, size, chunks}}, "storage": [...]},
    checked (well-formed, each data file present and long enough), without torch. A one-line SiftError
    otherwise."""
    path = Path(path)
    file = path / INDEX_FILE
    try:
        d = json.loads(file.read_text())
        _check_index(d)
    except FileNotFoundError:
        raise SiftError(f"checkpoint {path} is incomplete or corrupt: missing {INDEX_FILE}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SiftError(f"checkpoint file {file} is corrupt or truncated ({type(e).__name__}: {e})") from None
    need: dict[str, int] = {}
    for s in d["storage"]:
        need[s["file"]] = max(need.get(s["file"], 0), s["pos"] + s["length"])
    for name, n in sorted(need.items()):
        f = path / name
        if not f.is_file():
            raise SiftError(f"checkpoint {path} is incomplete or corrupt: missing data file {name}")
        if f.stat().st_size < n:
            raise SiftError(f"checkpoint file {f} is corrupt or truncated ({f.stat().st_size} bytes, its index needs {n})")
    return d


@functools.cache
def _io():
    """(writer class, reader class): DCP's file storage with the JSON index instead of the pickle."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter

    class _Writer(FileSystemWriter):
        """DCP's file writer, with the index written as JSON (temp + rename) instead of a pickle."""

        def finish(self, metadata, results) -> None:
            from sift_megatron.config import atomic_write_text

            metadata.storage_data = {wr.index: wr.storage_data for wrs in results for wr in wrs}
            atomic_write_text(Path(self.path) / INDEX_FILE, json.dumps(_index_to_json(metadata)))


    class _Reader(FileSystemReader):
        """DCP's file reader, with the JSON index (or `metadata`, the index already parsed); a damaged data
        file is an error naming it."""

        metadata = None

        def read_metadata(self, *args, **kwargs):
            return self.metadata or _index_from_json(json.loads((Path(self.path) / INDEX_FILE).read_text()))

        def _slice_file(self, file, sinfo):
            self._current = sinfo.relative_path
            return super()._slice_file(file, sinfo)

        def read_data(self, plan, planner):
            try:
                return super().read_data(plan, planner)
            except Exception as e:  # noqa: BLE001 - torch.load / zip / unpickler raise many types
                raise SiftError(f"checkpoint file {Path(self.path) / getattr(self, '_current', '?')} is corrupt or "
                                f"not tensors-only ({type(e).__name__}: {first_line(e)[:200]})") from None

    return _Writer, _Reader


def _planners():
    """DCP's default planners (flat keys), taught to find the boxes of a Pieces value."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner

    class SavePlanner(DefaultSavePlanner):
        def lookup_object(self, index):
            obj = self.state_dict[index.fqn]
            return obj.__get_tensor_shard__(index) if isinstance(obj, Pieces) else super().lookup_object(index)

    class LoadPlanner(DefaultLoadPlanner):
        def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
            # flat keys, tensors already allocated: the default's meta-tensor pass would drop Pieces values
            self.original_state_dict = self.state_dict = state_dict
            self.metadata, self.is_coordinator = metadata, is_coordinator

        def lookup_tensor(self, index):
            obj = self.state_dict[index.fqn]
            return obj.__get_tensor_shard__(index) if isinstance(obj, Pieces) else super().lookup_tensor(index)

    return (SavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
            LoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False))


@contextlib.contextmanager
def _quiet():
    """DCP warns on every single-process call that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _distributed() -> bool:
    import torch

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def save(state: dict, path: str | os.PathLike, threads: int = 1) -> None:
    """Collective when torch.distributed is initialised: every rank writes its boxes under `path`."""
    from torch.distributed import checkpoint as dcp

    writer = _io()[0](str(path), single_file_per_rank=True, sync_files=True, thread_count=threads)
    with _quiet():
        dcp.save(state, storage_writer=writer, planner=_planners()[0], no_dist=not _distributed())


def load(state: dict, path: str | os.PathLike) -> None:
    """Fill every tensor / Pieces box of `state` in place from the checkpoint at `path` (collective when
    distributed). Errors are one-line SiftErrors naming the file."""
    _load(state, path, no_dist=not _distributed())


def _load(state: dict, path, no_dist: bool, metadata=None) -> None:
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader = _io()[1](str(path))
    reader.metadata = metadata
    try:
        with _quiet():
            dcp.load(state, storage_reader=reader, planner=_planners()[1], no_dist=no_dist)
    except CheckpointException as e:  # DCP wraps each rank's error
        errors = [getattr(f, "exception", f) for f in e.failures.values()]
        mine = next((x for x in errors if isinstance(x, SiftError)), None)
        if mine is not None:
            raise SiftError(str(mine)) from None
        raise SiftError(f"checkpoint {path} could not be loaded: {first_line(errors[0] if errors else e)[:300]}") \
            from None
    except (RuntimeError, ValueError, KeyError) as e:
        raise SiftError(f"checkpoint {path} could not be loaded: {first_line(e)[:300]}") from None


def read_box(path: str | os.PathLike, fqn: str, size: Sequence[int], dtype,
             offsets: Sequence[int] | None = None, shape: Sequence[int] | None = None, metadata=None):
    """One box of a logical tensor (default: all of it), read in this process alone: offline tools (export,
    spectral analysis) hold one tensor at a time, never the model. `metadata`: the index already parsed."""
    import torch

    offsets = list(offsets or [0] * len(size))
    out = torch.empty(list(shape or size), dtype=dtype)
    _load({fqn: Pieces(size, [(offsets, out)])}, path, no_dist=True, metadata=metadata)
    return out


class ShardedCheckpoint:
    """A sharded checkpoint opened for reading in one process: its index checked and parsed once, then any
    logical tensor (or box of one) read on demand."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._json = read_index(path)
        self.tensors, self._index = self._json["tensors"], None

    def read(self, fqn: str, offsets: Sequence[int] | None = None, shape: Sequence[int] | None = None):
        t = self.tensors[fqn]
        if self._index is None:
            self._index = _index_from_json(self._json)
        return read_box(self.path, fqn, t["size"], torch_dtype(t["dtype"]), offsets, shape, metadata=self._index)

    def load(self, state: dict) -> None:
        """`load(state, path)` with the index parsed here (the metadata is rebuilt from it, not cached: a
        resume's one load should not keep the whole index for the run)."""
        _load(state, self.path, no_dist=not _distributed(), metadata=_index_from_json(self._json))
