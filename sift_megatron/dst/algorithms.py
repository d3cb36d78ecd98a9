"""Static, SET and RigL mask updates as pure tensor functions (spec section 3.1).

One update of a tensor with current mask M (nnz active), weights W and drop fraction f:
  drop:  keep the n_keep = nnz - n_drop active entries of largest |W|, n_drop = nnz_for(nnz, f)
         (= int(f * nnz), guarded against float noise); inactive entries are never kept.
  grow:  n_grow = nnz - n_keep entries among those not kept, by largest |dense grad| (RigL) or by a
         counter-based hash (SET); kept entries are not candidates, just-dropped ones are.
So nnz is unchanged (the target count int((1 - s) * numel) is what the mask was initialised with).
Ties rank by smaller global index. An entry dropped and regrown in the same update stays active and is
reported neither dropped nor grown, so the caller only zeroes weights/state at truly new or gone entries.

`rigl_update` / `set_update` / `static_update` take all sparse tensors of a rank at once, as local shards
of logical tensors spread over `group` (the TP group; None = whole tensors in one process), and run every
selection as one batched distributed top-k: each rank gets its part of the mask that the single-tensor
functions (`*_tensor`) compute on the gathered tensors. SET draws its scores from
`hash_scores(derive_seed(seed, "set", step), name, global index)`, so it too is the same at every layout
and needs no broadcast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sift_megatron import comm
from sift_megatron.sparse.masks import derive_seed, hash_scores, nnz_for
from sift_megatron.sparse.topk import topk_mask, topk_mask_keys

__all__ = [
    "ALGORITHMS", "BatchUpdate", "MaskUpdate", "block_update", "nm_update", "rigl_update", "rigl_update_tensor", "set_update",
    "set_update_tensor", "static_update", "static_update_tensor", "update",
]

ALGORITHMS = ("static", "set", "rigl")


@dataclass
class MaskUpdate:
    """New mask of one tensor, and the entries that left (dropped) or joined (grown) it; mask-shaped."""

    mask: torch.Tensor
    dropped: torch.Tensor
    grown: torch.Tensor

    @property
    def n_changed(self) -> int:
        return int(self.grown.sum())


@dataclass
class BatchUpdate:
    """Per-tensor new local masks and dropped / grown entries, in the order the tensors were given."""

    masks: list[torch.Tensor]
    dropped: list[torch.Tensor]
    grown: list[torch.Tensor]

    def __getitem__(self, t: int) -> MaskUpdate:
        return MaskUpdate(self.masks[t], self.dropped[t], self.grown[t])

    def __len__(self) -> int:
        return len(self.masks)


def update(algorithm: str, weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], drop_fraction: float,
           *, grads: Sequence[torch.Tensor] | None = None, names: Sequence[str] | None = None, seed: int = 0,
           step: int = 0, global_index: Sequence[torch.Tensor] | None = None, group=None,
           nnz: Sequence[int] | None = None) -> BatchUpdate:
    """One DST update of all sparse tensors a rank holds (local shards of logical tensors over `group`).

    weights/masks/grads: per tensor, the local shard (post-step weight, bool mask, dense DP-averaged
    gradient for RigL), all the same shape; global_index: the logical flat indices of the shard's elements
    (any shape with that many entries; None only with group=None). names and (seed, step): the SET hash
    stream. nnz: the logical active counts if known, else one all-reduce finds them. Every rank of `group`
    passes the same tensors in the same order.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown DST algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
    T = len(masks)
    if len(weights) != T:
        raise ValueError("masks and weights need one entry per tensor")
    for m, w in zip(masks, weights):
        if m.dtype != torch.bool:
            raise TypeError(f"masks must be bool, got {m.dtype}")
        if w.shape != m.shape:
            raise ValueError(f"weight shape {tuple(w.shape)} does not match mask {tuple(m.shape)}")
    if algorithm == "static" or T == 0:
        return _unchanged(masks)
    if algorithm == "rigl":
        if grads is None or len(grads) != T:
            raise ValueError("RigL needs one dense gradient per tensor")
        for m, g in zip(masks, grads):
            if g.shape != m.shape:
                raise ValueError(f"gradient shape {tuple(g.shape)} does not match mask {tuple(m.shape)}")
    if algorithm == "set" and (names is None or len(names) != T):
        raise ValueError("SET needs one tensor name per tensor")
    if not 0.0 <= drop_fraction <= 1.0:
        raise ValueError(f"drop_fraction must be in [0, 1], got {drop_fraction}")
    if group is not None and global_index is None:
        raise ValueError("sharded tensors (group given) need their global_index")

    todo, n_drop, gidx, kept = _drop(weights, masks, drop_fraction, global_index, group, nnz)
    out = _unchanged(masks)
    if not todo:
        return out
    # Grow: n_drop entries among the not-kept ones (just-dropped included).
    if algorithm == "rigl":
        grown = topk_mask([grads[t] for t in todo], gidx, [n_drop[t] for t in todo], group=group,
                          exclude=kept, magnitude=True)
    else:
        sub = derive_seed(seed, "set", step)
        keys = [hash_scores(sub, names[t], _index(global_index, t, masks[t])).view(masks[t].shape) for t in todo]
        grown = topk_mask_keys(keys, [n_drop[t] for t in todo], group=group, exclude=kept, global_index=gidx)

    for t, k, g in zip(todo, kept, grown):
        new = k | g
        out.masks[t], out.dropped[t], out.grown[t] = new, masks[t] & ~new, new & ~masks[t]
    return out


def _drop(weights, masks, drop_fraction: float, global_index, group, nnz):
    """The drop step every update shares: (tensors that drop anything, n_drop per tensor, their global indices,
    their kept masks = the nnz - n_drop largest |W| among active entries, by exact distributed top-k). Tensors
    that drop nothing keep their mask; every rank agrees on which those are (nnz is global: one all-reduce
    finds it when not given)."""
    if nnz is None:
        counts = torch.stack([m.sum() for m in masks]).to(torch.int64)
        if group is not None:
            comm.all_reduce(counts, op=comm.ReduceOp.SUM, group=group)
        nnz = counts.tolist()
    n_drop = [nnz_for(n, drop_fraction) for n in nnz]
    todo = [t for t in range(len(masks)) if n_drop[t] > 0]
    if not todo:
        return todo, n_drop, None, []
    gidx = None if global_index is None else [global_index[t] for t in todo]
    kept = topk_mask([weights[t] for t in todo], gidx, [nnz[t] - n_drop[t] for t in todo], group=group,
                     exclude=[~masks[t] for t in todo], magnitude=True)
    return todo, n_drop, gidx, kept


def _unchanged(masks: Sequence[torch.Tensor]) -> BatchUpdate:
    none = [torch.zeros_like(m, dtype=torch.bool) for m in masks]
    return BatchUpdate([m.clone() for m in masks], none, [n.clone() for n in none])


def _index(global_index: Sequence[torch.Tensor] | None, t: int, like: torch.Tensor) -> torch.Tensor:
    if global_index is not None:
        return global_index[t].to(torch.int64)
    return torch.arange(like.numel(), device=like.device)


def rigl_update(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                drop_fraction: float, *, global_index: Sequence[torch.Tensor] | None = None, group=None,
                nnz: Sequence[int] | None = None) -> BatchUpdate:
    """RigL over all tensors of a rank: drop smallest |W|, grow largest |dense grad| (see `update`)."""
    return update("rigl", weights, masks, drop_fraction, grads=grads, global_index=global_index, group=group,
                  nnz=nnz)


def set_update(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], drop_fraction: float, *,
               seed: int, step: int, names: Sequence[str], global_index: Sequence[torch.Tensor] | None = None,
               group=None, nnz: Sequence[int] | None = None) -> BatchUpdate:
    """SET over all tensors of a rank: drop smallest |W|, grow by hash(seed, step, name, global index)."""
    return update("set", weights, masks, drop_fraction, names=names, seed=seed, step=step,
                  global_index=global_index, group=group, nnz=nnz)


def static_update(masks: Sequence[torch.Tensor]) -> BatchUpdate:
    """Static sparsity: masks never move."""
    return _unchanged(masks)


def rigl_update_tensor(mask: torch.Tensor, weight: torch.Tensor, dense_grad: torch.Tensor,
                       drop_fraction: float) -> MaskUpdate:
    """RigL on one whole logical tensor."""
    _check_single(mask, dense_grad)
    return rigl_update([weight], [mask], [dense_grad], drop_fraction)[0]


def set_update_tensor(mask: torch.Tensor, weight: torch.Tensor, drop_fraction: float, *, name: str, seed: int,
                      step: int) -> MaskUpdate:
    """SET on one whole logical tensor."""
    _check_single(mask)
    return set_update([weight], [mask], drop_fraction, seed=seed, step=step, names=[name])[0]


def static_update_tensor(mask: torch.Tensor) -> MaskUpdate:
    """Static sparsity on one tensor: unchanged."""
    _check_single(mask)
    return static_update([mask])[0]


def _check_single(mask: torch.Tensor, *others: torch.Tensor) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool, got {mask.dtype}")
    for o in others:
        if o.shape != mask.shape:
            raise ValueError(f"shape {tuple(o.shape)} does not match mask {tuple(mask.shape)}")


# ----------------------------------------------------------------------------------------------------------
# Structured masks (sparse/pattern.py)


def block_update(algorithm: str, weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                 drop_fraction: float, block: int, *, grads: Sequence[torch.Tensor] | None = None,
                 names: Sequence[str] | None = None, seed: int = 0, step: int = 0,
                 global_index: Sequence[torch.Tensor] | None = None, cols: Sequence[int] | None = None,
                 group=None) -> BatchUpdate:
    """`update` on the b x b tile grid of 2-D tensors whose masks are made of whole tiles: a tile's weight score
    is the L2 norm of its (masked) weights, its RigL grow score the L2 norm of its dense gradient, its SET score
    the hash of its global tile index; drop_fraction counts tiles. global_index / cols: the shards' global flat
    element indices and the logical column counts (None with group=None: whole tensors). Returns element masks;
    `dropped` / `grown` are element masks too."""
    from sift_megatron.sparse.structure import block_ids, block_mask, block_norms, expand_blocks

    if group is not None and (global_index is None or cols is None):
        raise ValueError("sharded tensors (group given) need their global_index and logical cols")
    gi = [torch.arange(m.numel(), device=m.device) if global_index is None else global_index[t]
          for t, m in enumerate(masks)]
    cs = [m.shape[1] for m in masks] if cols is None else list(cols)
    tile_index = [block_ids(g.view(m.shape), c, block) for g, m, c in zip(gi, masks, cs)]
    tile_w = [block_norms(w, block, m) for w, m in zip(weights, masks)]
    tile_g = None if grads is None else [block_norms(g, block) for g in grads]
    r = update(algorithm, tile_w, [block_mask(m, block) for m in masks], drop_fraction, grads=tile_g, names=names,
               seed=seed, step=step, global_index=tile_index, group=group)
    return BatchUpdate(*([expand_blocks(t, block) for t in ts] for ts in (r.masks, r.dropped, r.grown)))


def nm_update(algorithm: str, weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], drop_fraction: float,
              n: int, m: int, *, grads: Sequence[torch.Tensor] | None = None, names: Sequence[str] | None = None,
              seed: int = 0, step: int = 0, global_index: Sequence[torch.Tensor] | None = None, group=None,
              nnz: Sequence[int] | None = None) -> BatchUpdate:
    """DST that keeps exactly n of every m consecutive columns (masks that do so; each local shard holds whole
    groups). Drop as `update`: the n_drop = nnz_for(nnz, f) active entries of smallest |W| over the whole
    logical tensor (exact distributed top-k). Grow within each group: as many as it lost, among its not-kept
    entries, by largest |dense grad| (RigL) or SET hash; ties to the smaller column. Grow is local (a group never
    spans ranks), so the result is the same at any TP degree."""
    from sift_megatron.sparse.structure import nm_top
    from sift_megatron.sparse.topk import float_keys

    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown DST algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
    T = len(masks)
    if algorithm == "static" or T == 0:
        return _unchanged(masks)
    if algorithm == "rigl" and (grads is None or len(grads) != T):
        raise ValueError("RigL needs one dense gradient per tensor")
    if algorithm == "set" and (names is None or len(names) != T):
        raise ValueError("SET needs one tensor name per tensor")
    if group is not None and global_index is None:
        raise ValueError("sharded tensors (group given) need their global_index")
    for t, mk in enumerate(masks):
        if mk.dim() != 2 or mk.shape[1] % m or bool((mk.reshape(-1, m).sum(1) != n).any()):
            raise ValueError(f"mask {t} of shape {tuple(mk.shape)} does not keep exactly {n} of every {m} columns")
    todo, n_drop, gidx, kept = _drop(weights, masks, drop_fraction, global_index, group, nnz)
    out = _unchanged(masks)
    if not todo:
        return out
    sub = derive_seed(seed, "set", step)
    for t, k in zip(todo, kept):
        need = n - k.reshape(-1, m).sum(1)
        if algorithm == "rigl":
            scores = float_keys(grads[t], magnitude=True).view(masks[t].shape)
        else:
            scores = hash_scores(sub, names[t], _index(global_index, t, masks[t])).view(masks[t].shape)
        new = k | nm_top(scores, need, m, exclude=k)
        out.masks[t], out.dropped[t], out.grown[t] = new, masks[t] & ~new, new & ~masks[t]
    return out
