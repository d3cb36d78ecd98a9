"""Gather logical (TP=1) masks and weights of every sparse linear and write them as one safetensors file.

File contract (read by `sift spectral` and the tests): keys `<global weight name>.mask` (uint8 0/1) and
`<global weight name>.weight` (float32), logical shapes [out, in]; metadata {"step": "<int>"}.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from sift_megatron import comm
from sift_megatron.config import atomic_write
from sift_megatron.sharding import gather_tp
from sift_megatron.sparse.layers import sparse_modules

MASKS_FILE = "sparse_masks.safetensors"


def gather_logical_masks(chunks: list[torch.nn.Module], with_weights: bool = True) -> dict[str, torch.Tensor] | None:
    """Collective over the whole job. Returns {key: tensor} on global rank 0, None elsewhere."""
    local: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        for name, m in sparse_modules(chunk):
            layer = name[: -len(".weight")]
            local[f"{layer}.mask"] = gather_tp(m.mask.to(torch.uint8), m.partition_dim).cpu()
            if with_weights:
                local[f"{layer}.weight"] = gather_tp(m.weight.float(), m.partition_dim).cpu()
    return _gather_pp_to_rank0(local)


def map_logical_layers(mods: list[tuple[str, torch.nn.Module]], fn: Callable[[str, torch.Tensor, torch.Tensor], object],
                       group=None) -> list:
    """Collective over `group` (a stage's TP group; every rank passes the same `mods` in the same order).
    Layer i's logical uint8 mask and float32 weight (CPU) are assembled on group rank i % size only, passed to
    `fn(layer name, mask, weight)` and dropped before the next layer, so no rank holds more than one layer's
    logical tensors (the memory of `gather_logical_masks`, which holds them all, grows with the model).
    Returns this rank's [fn(...)] in layer order."""
    size, me = comm.world_size(group), comm.rank(group)
    out = []
    for i, (name, m) in enumerate(mods):
        owner = i % size
        masks = comm.gather(m.mask.to(torch.uint8), owner, group)
        weights = comm.gather(m.weight.float(), owner, group)
        if me == owner:
            mask = torch.cat(masks, m.partition_dim).cpu()
            del masks
            weight = torch.cat(weights, m.partition_dim).cpu()
            del weights
            out.append(fn(name[: -len(".weight")], mask, weight))
            del mask, weight
    return out


def _gather_pp_to_rank0(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_rank() != 0 or ps.get_data_parallel_rank() != 0:
        return None
    pp = ps.get_pipeline_model_parallel_world_size()
    if pp > 1:
        parts = comm.all_gather_object({k: v.cpu() for k, v in local.items()},
                                       group=ps.get_pipeline_model_parallel_group())
        local = {k: v for part in parts for k, v in part.items()}
        if not ps.is_pipeline_first_stage(ignore_virtual=True):
            return None
    return local


def write_masks(tensors: dict[str, torch.Tensor], path: str | os.PathLike, step: int,
                extra: dict | None = None) -> Path:
    """Atomic: temp file then rename. Metadata: step (+ extra key/values as strings)."""
    from safetensors.torch import save_file

    meta = {"step": str(step), **{k: str(v) for k, v in (extra or {}).items()}}
    return atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                                    metadata=meta), "write_masks")
