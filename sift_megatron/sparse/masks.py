"""Mask initialisation that does not depend on the parallel layout.

A mask is a pure function of (seed, tensor name, global element index): every element's score is a
counter-based hash of its index in the LOGICAL (unsharded) tensor, and the kept set is the exact top-nnz
of those scores over the whole logical tensor (`sparse/topk.py`). A rank only ever touches its own shard,
and TP=1/2/4 or any PP split gives the same logical mask.

Counting rule: a tensor of `numel` elements at density d keeps exactly `nnz_for(numel, d)` elements.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from sift_megatron.errors import SiftError
from sift_megatron.layout import nnz_for
from sift_megatron.sparse.topk import topk_mask_keys

__all__ = [
    "MaskSpec",
    "derive_seed",
    "global_index",
    "hash_scores",
    "init_mask_local",
    "layer_densities",
    "nnz_for",
    "shard_global_index",
    "slices_global_index",
    "uniform_from_keys",
]

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed64(u: int) -> int:
    """uint64 constant -> the int64 with the same bits (torch has no uint64 arithmetic)."""
    u &= _M64
    return u - (1 << 64) if u >= (1 << 63) else u


def _fmix64_py(z: int) -> int:
    """splitmix64 finaliser on Python ints (exact uint64 reference)."""
    z &= _M64
    z = ((z ^ (z >> 30)) * _MIX1) & _M64
    z = ((z ^ (z >> 27)) * _MIX2) & _M64
    return z ^ (z >> 31)


def _name_hash(name: str) -> int:
    # Not Python's hash(): that is salted per process, and every rank must agree.
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


def derive_seed(seed: int, *tags: int | str) -> int:
    """A sub-seed (e.g. per DST update: `derive_seed(seed, "set", step)`) that every rank derives alike."""
    z = _fmix64_py(seed & _M64)
    for tag in tags:
        z = _fmix64_py(z ^ (_name_hash(tag) if isinstance(tag, str) else _fmix64_py((tag & _M64) + _GOLDEN)))
    return z


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic on negative values)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def hash_scores(seed: int, name: str, global_index: torch.Tensor) -> torch.Tensor:
    """int64 keys, element i = splitmix64 output number i+1 of a stream keyed by (seed, name).

    Counter-based, so any shard computes its own elements from their global flat indices. The map
    index -> key is a bijection of 64-bit words (odd multiply, add, xorshift-multiply finaliser), so keys
    within one tensor are all distinct and the top-k needs no tie-break. Only wrapping int64 mul/add and
    masked shifts/xor, so every device computes the same bits (checked on CPU against a Python reference).
    """
    if global_index.dtype != torch.int64:
        raise TypeError(f"global_index must be int64, got {global_index.dtype}")
    key = _fmix64_py(_fmix64_py(seed & _M64) ^ _name_hash(name))
    z = global_index * _signed64(_GOLDEN)  # wraps mod 2^64
    z += _signed64(key + _GOLDEN)
    for shift, mul in ((30, _MIX1), (27, _MIX2), (31, None)):
        t = z >> shift
        t &= (1 << (64 - shift)) - 1  # logical shift: clear the copied sign bits
        z ^= t
        if mul is not None:
            z *= _signed64(mul)
    return z


def uniform_from_keys(keys: torch.Tensor) -> torch.Tensor:
    """float64 in [0, 1) from the top 53 bits of int64 keys (same order as the keys' unsigned order)."""
    return _shr(keys, 11).to(torch.float64) * (2.0 ** -53)


# ----------------------------------------------------------------------------------------------------------
# Counting and per-layer densities


def _raw_probability(shape: tuple[int, ...], distribution: str, erk_power: float) -> float:
    numel = math.prod(shape)
    if distribution == "erk":
        return (sum(shape) / numel) ** erk_power
    if len(shape) < 2:
        raise SiftError(f"ER density needs a tensor with >= 2 dims, got shape {tuple(shape)}")
    n_out, n_in = shape[0], shape[1]
    return (n_in + n_out) / (n_in * n_out)


def layer_densities(layers: Mapping[str, Sequence[int]], sparsity: float, distribution: str = "uniform",
                    dense: Sequence[str] | set[str] = (), erk_power: float = 1.0) -> dict[str, float]:
    """Per-tensor density (1 - sparsity of each tensor) for a target overall sparsity.

    uniform: every tensor not in `dense` at density 1 - s (tensors in `dense` are 1.0 and are not
    compensated: "uniform s per sparsified tensor", as in every released Sparse-IFT config).
    erk / er: cbsparse `erdos_renyi_distribution`: density_l = eps * p_l with p_l = (sum(shape) / numel)^power
    (ERK) or (n_in + n_out) / (n_in * n_out) (ER, first two dims); eps solves sum_l nnz_l = (1 - s) * N over
    all tensors in `layers`, where tensors in `dense` and tensors that would exceed density 1 count as
    dense; the largest-p tensors are made dense one step at a time and eps is re-solved.
    """
    if not (isinstance(sparsity, int | float) and 0.0 <= sparsity < 1.0):
        raise SiftError(f"sparsity must be in [0, 1), got {sparsity}")
    if distribution not in ("uniform", "erk", "er"):
        raise SiftError(f"sparsity distribution must be uniform, erk or er, got {distribution!r}")
    unknown = set(dense) - set(layers)
    if unknown:
        raise ValueError(f"dense names not in layers: {sorted(unknown)}")
    shapes = {name: tuple(int(d) for d in shape) for name, shape in layers.items()}
    if distribution == "uniform" or sparsity == 0.0:
        return {name: 1.0 if name in dense else 1.0 - sparsity for name in shapes}

    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: _raw_probability(shape, distribution, erk_power)
           for name, shape in shapes.items() if name not in dense}
    densified = set(dense)
    while True:
        sparse = [name for name in shapes if name not in densified]
        rhs = (sum((1.0 - sparsity) * numel[n] for n in sparse)
               - sum(sparsity * numel[n] for n in densified))
        if not sparse or rhs <= 0.0:
            raise SiftError(f"{distribution.upper()} is infeasible: overall sparsity {sparsity} cannot be "
                            f"reached with {len(densified)} of {len(shapes)} tensors dense")
        divisor = sum(raw[n] * numel[n] for n in sparse)
        eps = rhs / divisor
        max_p = max(raw[n] for n in sparse)
        if eps * max_p <= 1.0:
            break
        densified.update(n for n in sparse if raw[n] == max_p)
    return {name: 1.0 if name in densified else eps * raw[name] for name in shapes}


# ----------------------------------------------------------------------------------------------------------
# Global flat indices of a local shard


def global_index(logical_shape: Sequence[int], coords: Sequence[torch.Tensor | None],
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Global flat (row-major) indices of the sub-grid coords[0] x coords[1] x ... of a logical tensor.

    coords[d] lists, in local order, the logical positions along dim d held locally (None = all). This
    covers every megatron shard: contiguous TP slices, and fused QKV / [gate, up] weights whose local rows
    are interleaved blocks of the logical rows. The result has the local shard's shape.
    """
    shape = [int(s) for s in logical_shape]
    if len(coords) != len(shape):
        raise ValueError(f"need one coords entry per dim of {tuple(shape)}, got {len(coords)}")
    if device is None:
        device = next((c.device for c in coords if c is not None), torch.device("cpu"))
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    out = torch.zeros((), dtype=torch.int64, device=device)
    for d, (size, c) in enumerate(zip(shape, coords)):
        c = torch.arange(size, device=device) if c is None else c.to(device=device, dtype=torch.int64)
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= size):
            raise ValueError(f"coords for dim {d} out of range [0, {size})")
        view = [1] * len(shape)
        view[d] = c.numel()
        out = out + (c * strides[d]).view(view)
    return out


def slices_global_index(logical_shape: Sequence[int], slices: Sequence[tuple[int, int, int]],
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Global indices of a shard given as (dim, start, length) blocks; blocks of the same dim are
    concatenated in the order given (interleaved fused weights), dims without a block are whole."""
    coords: list[torch.Tensor | None] = [None] * len(logical_shape)
    for dim, start, length in slices:
        block = torch.arange(start, start + length, dtype=torch.int64, device=device)
        prev = coords[dim]
        coords[dim] = block if prev is None else torch.cat([prev, block])
    return global_index(logical_shape, coords, device=device)


def shard_global_index(logical_shape: Sequence[int], dim: int, rank: int, world: int,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """Indices of rank's equal contiguous shard along dim (ColumnParallel: dim 0 of [out, in];
    RowParallel: dim 1)."""
    size = int(logical_shape[dim])
    if size % world:
        raise ValueError(f"dim {dim} of size {size} does not divide by {world}")
    part = size // world
    return slices_global_index(logical_shape, [(dim, rank * part, part)], device=device)


# ----------------------------------------------------------------------------------------------------------
# Mask init


@dataclass(frozen=True)
class MaskSpec:
    """One logical tensor as seen by this rank: its name, logical shape, density and the global flat
    indices of the local elements (shape = local shard shape; may be empty)."""

    name: str
    shape: tuple[int, ...]
    density: float
    global_index: torch.Tensor


def init_mask_local(specs: Sequence[MaskSpec], seed: int, group=None) -> list[torch.Tensor]:
    """Local bool masks: the nnz_for(numel, density) largest hash_scores of each logical tensor.

    Every rank of `group` (the ranks sharing these logical tensors, e.g. the TP group) must pass the same
    tensors in the same order; all tensors are selected together in one batch of radix rounds.
    """
    keys, index, ks = [], [], []
    for spec in specs:
        keys.append(hash_scores(seed, spec.name, spec.global_index))
        index.append(spec.global_index)
        ks.append(nnz_for(math.prod(spec.shape), spec.density))
    return topk_mask_keys(keys, ks, group=group, global_index=index)
