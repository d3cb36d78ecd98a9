"""Block and N:M structure on local shards of 2-D logical tensors (see `sparse/pattern.py`).

Everything is derived from the global flat indices of the local elements, as the unstructured masks are
(`sparse/masks.py`): a tile's identity is its global block index, an N:M group's is its global position, so the
selections made from them are the same at every TP degree. A rank never sees part of a tile or a group: the
helpers check that its shard holds whole, aligned tiles / groups (ValueError otherwise, the caller names the
config values).

Block selections reduce each tensor to its tile grid (one score per tile) and run the unstructured machinery
(`topk_mask_keys` / `topk_mask`, exact and distributed) on that grid; `expand_blocks` maps the tile mask back.
"""

from __future__ import annotations

import torch

__all__ = ["block_ids", "block_mask", "block_norms", "expand_blocks", "nm_groups", "nm_top"]


def block_ids(global_index: torch.Tensor, cols: int, block: int) -> torch.Tensor:
    """Global tile indices [R / b, C / b] of a local [R, C] shard (its elements' flat indices in a logical
    [*, cols] tensor); tile (i, j) of the logical tensor has index i * (cols / b) + j. Raises ValueError unless
    the shard is made of whole b x b tiles, each held as b consecutive local rows x b consecutive columns."""
    if global_index.dim() != 2:
        raise ValueError(f"global_index must be 2-D [rows, cols], got shape {tuple(global_index.shape)}")
    R, C = global_index.shape
    if R % block or C % block or cols % block:
        raise ValueError(f"local shard {R}x{C} of a tensor with {cols} columns is not a whole number of "
                         f"{block}x{block} blocks")
    g = global_index.to(torch.int64).view(R // block, block, C // block, block)
    corner = g[:, :1, :, :1]
    row, col = corner // cols, corner % cols
    ar = torch.arange(block, device=g.device, dtype=torch.int64)
    expected = corner + ar.view(1, block, 1, 1) * cols + ar.view(1, 1, 1, block)
    if bool((row % block).any()) or bool((col % block).any()) or not torch.equal(g, expected):
        raise ValueError(f"local shard {R}x{C} of a tensor with {cols} columns splits {block}x{block} blocks")
    return ((row // block) * (cols // block) + col // block).view(R // block, C // block)


def _tiles(t: torch.Tensor, block: int) -> torch.Tensor:
    """[R, C] -> [R / b, C / b, b * b], each tile's elements contiguous (row-major within the tile)."""
    R, C = t.shape
    return t.reshape(R // block, block, C // block, block).permute(0, 2, 1, 3).reshape(R // block, C // block, -1)


def block_norms(t: torch.Tensor, block: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """float32 L2 norm of each b x b tile of a local [R, C] tensor (of t * mask if given). Summed in float64
    over each tile's contiguous elements, so a tile's norm does not depend on how many tiles the shard holds."""
    x = t.detach().to(torch.float64)
    if mask is not None:
        x = x * mask
    return _tiles(x, block).square().sum(-1).sqrt().to(torch.float32)


def block_mask(mask: torch.Tensor, block: int) -> torch.Tensor:
    """Tile mask [R / b, C / b] of an element mask made of whole tiles (ValueError if a tile is partly on)."""
    tiles = _tiles(mask, block)
    on, full = tiles.any(-1), tiles.all(-1)
    if not torch.equal(on, full):
        raise ValueError(f"mask is not made of whole {block}x{block} blocks")
    return on


def expand_blocks(tiles: torch.Tensor, block: int) -> torch.Tensor:
    """Element tensor [R, C] with every element equal to its tile's value ([R / b, C / b] input)."""
    return tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)


def nm_groups(global_index: torch.Tensor, cols: int, m: int) -> None:
    """Check that a local [R, C] shard (elements' flat indices in a logical [*, cols] tensor) holds whole groups
    of m consecutive columns starting at multiples of m (ValueError otherwise)."""
    R, C = global_index.shape
    if C % m or cols % m:
        raise ValueError(f"local shard {R}x{C} of a tensor with {cols} columns is not a whole number of groups "
                         f"of {m} columns")
    g = global_index.to(torch.int64).reshape(-1, m)
    first = g[:, :1]
    if bool((first % cols % m).any()) or not torch.equal(g, first + torch.arange(m, device=g.device)):
        raise ValueError(f"local shard {R}x{C} of a tensor with {cols} columns splits groups of {m} columns")


def nm_top(scores: torch.Tensor, counts: torch.Tensor | int, m: int,
           exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask shaped like `scores` ([R, C], any dtype with a total order) selecting, in every group of m
    consecutive columns, its `counts` (an int, or one per group in row-major group order) largest scores not
    excluded; ties go to the smaller column. Local: a group never spans ranks."""
    s = scores.reshape(-1, m)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    if exclude is not None:  # excluded entries last, the others keeping their order
        ex = exclude.reshape(-1, m).gather(1, order).to(torch.uint8)
        order = order.gather(1, torch.sort(ex, dim=1, stable=True).indices)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(m, device=s.device).expand_as(order))
    want = counts if isinstance(counts, int) else counts.reshape(-1, 1)
    sel = rank < want
    if exclude is not None:
        sel &= ~exclude.reshape(-1, m)
    return sel.view_as(scores)
