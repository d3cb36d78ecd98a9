"""Write the logical (TP=1) masks and weights of every sparse linear as one safetensors file, streamed.

File contract (read by `sift spectral` and the tests): keys `<global weight name>.mask` (uint8 0/1) and
`<global weight name>.weight` (float32), logical shapes [out, in]; metadata {"step": "<int>"}. Laid out as
safetensors' save_file lays it out (same bytes for the same tensors), but written one tensor at a time: the
header first (names, shapes and dtypes are known before any data moves), then each tensor's bytes as it arrives,
so no process holds more than one logical tensor (house rule: memory per rank proportional to its shard).
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from sift_megatron import comm
from sift_megatron.config import atomic_write
from sift_megatron.sparse.layers import sparse_modules

MASKS_FILE = "sparse_masks.safetensors"


def map_logical_layers(mods: list[tuple[str, torch.nn.Module]], fn: Callable[[str, torch.Tensor, torch.Tensor], object],
                       group=None) -> list:
    """Collective over `group` (a stage's TP group; every rank passes the same `mods` in the same order).
    Layer i's logical uint8 mask and float32 weight (CPU) are assembled on group rank i % size only, passed to
    `fn(layer name, mask, weight)` and dropped before the next layer, so no rank holds more than one layer's
    logical tensors.
    Returns this rank's [fn(...)] in layer order."""
    size, me = comm.world_size(group), comm.rank(group)
    out = []
    for i, (name, m) in enumerate(mods):
        owner = i % size
        mask, weight = _logical(m, "mask", owner, group), _logical(m, "weight", owner, group)
        if me == owner:
            out.append(fn(name[: -len(".weight")], mask.cpu(), weight.cpu()))
        del mask, weight
    return out


def _logical(m: torch.nn.Module, kind: str, owner: int, group) -> torch.Tensor | None:
    """Sparse linear `m`'s logical (TP=1) uint8 mask or float32 weight (kind "mask" / "weight"), joined on group
    rank `owner` from every TP rank's shard (None elsewhere; collective over `group`)."""
    local = m.weight.float() if kind == "weight" else m.mask.to(torch.uint8)
    parts = comm.gather(local, owner, group)
    del local
    return None if parts is None else torch.cat(parts, m.partition_dim)


def write_masks(tensors: dict[str, torch.Tensor], path: str | os.PathLike, step: int,
                extra: dict | None = None) -> Path:
    """Atomic: temp file then rename. Metadata: step (+ extra key/values as strings)."""
    from safetensors.torch import save_file

    meta = {"step": str(step), **{k: str(v) for k, v in (extra or {}).items()}}
    return atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                                    metadata=meta), "write_masks")


# safetensors dtype names of the tensors we write
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def save_order(specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]) -> list:
    """(key, dtype, shape) specs in the order safetensors' save_file lays tensors out: larger dtype first (its
    alignment), then by name."""
    return sorted(specs, key=lambda s: (-s[1].itemsize, s[0]))


def write_streamed(path: str | os.PathLike, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                   tensors: Iterable[torch.Tensor], metadata: dict[str, str] | None = None,
                   fault: str = "write_masks") -> Path:
    """A safetensors file whose tensors come one at a time: `tensors` yields them in `specs` order (key, dtype,
    shape each), so the caller holds one at a time. Header: 8-byte little-endian length, compact JSON
    {"__metadata__", key: {dtype, shape, data_offsets}} in data order, space-padded to 8 bytes (as save_file).
    Atomic (temp file then rename): a failure mid-write leaves no file at `path`."""
    if sys.byteorder != "little":
        raise RuntimeError("write_streamed: safetensors data is little-endian; this host is big-endian")
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, dtype, shape in specs:
        if dtype not in _DTYPES:
            raise ValueError(f"write_streamed: {key}: dtype {dtype} is not one of {sorted(map(str, _DTYPES))}")
        if key in header:
            raise ValueError(f"write_streamed: key {key!r} appears twice")
        n = dtype.itemsize
        for d in shape:
            n *= int(d)
        header[key] = {"dtype": _DTYPES[dtype], "shape": [int(d) for d in shape], "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)

    def write(tmp: Path) -> None:
        it = iter(tensors)
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            for key, dtype, shape in specs:
                t = next(it, None)
                if t is None:
                    raise ValueError(f"write_streamed: no tensor for {key}")
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise ValueError(f"write_streamed: {key} is {t.dtype} {tuple(t.shape)}, the header says "
                                     f"{dtype} {tuple(shape)}")
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
                del t
            if next(it, None) is not None:
                raise ValueError("write_streamed: more tensors than specs")
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write, fault)


def export_logical_masks(chunks: list[torch.nn.Module], path: str | os.PathLike, step: int) -> Path | None:
    """Collective over the whole job: every sparse layer's logical mask and float32 weight into one safetensors
    file written by global rank 0 (returns its path there, None elsewhere). Only DP rank 0 ranks move data: for
    each tensor in file order, its stage's TP group gathers it to its TP rank 0, which sends it to rank 0 (unless
    it is rank 0), so every rank holds at most one logical tensor (+ its TP parts) at a time."""
    from megatron.core import parallel_state as ps

    mods = dict(nm for chunk in chunks for nm in sparse_modules(chunk))
    active = ps.get_data_parallel_rank() == 0
    lead = active and ps.get_tensor_model_parallel_rank() == 0  # assembles its stage's tensors
    mine = [(name, tuple(m.logical_shape())) for name, m in mods.items()] if lead else None
    stage = ps.get_pipeline_model_parallel_rank()
    owners: dict[str, tuple[int, int]] = {}  # weight name -> (global rank of its stage's lead, its stage)
    shapes: dict[str, tuple[int, ...]] = {}
    for src, part in enumerate(comm.all_gather_object((stage, mine) if lead else None)):
        if part is None:
            continue
        for name, shape in part[1]:
            if name in owners:
                raise RuntimeError(f"export_logical_masks: {name} is on stages {owners[name][1]} and {part[0]}")
            owners[name], shapes[name] = (src, part[0]), shape
    if not active:
        return None
    specs = save_order([(name[: -len(".weight")] + suffix, dtype, shapes[name]) for name in owners
                        for suffix, dtype in ((".weight", torch.float32), (".mask", torch.uint8))])
    tp_group, me = ps.get_tensor_model_parallel_group(), comm.rank()

    def tensors():
        for key, dtype, shape in specs:
            name = key[: key.rindex(".")] + ".weight"
            owner, owner_stage = owners[name]
            if owner_stage != stage:
                if me == 0:
                    yield comm.recv(shape, dtype, owner)
                continue
            full = _logical(mods[name], key[key.rindex(".") + 1:], 0, tp_group)
            if full is None:
                continue
            if me == 0:
                yield full.cpu()
            else:
                comm.send(full, 0)
            del full

    if me != 0:
        for _ in tensors():  # the assembling and sending; nothing is yielded off rank 0
            pass
        return None
    return write_streamed(path, specs, tensors(), {"step": str(step)})
