"""Structured masks (sparsity.pattern block / N:M): tile and group bookkeeping on shards, block and N:M DST
updates against brute-force references, and the one-line errors. Multi-rank equality across TP / PP layouts is
in tests/test_sparse_families.py, ZeRO state at masked tiles in tests/test_dst.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sift_megatron.config import load_config
from sift_megatron.dst.algorithms import block_update, nm_update
from sift_megatron.errors import SiftError
from sift_megatron.pattern import Pattern, parse_pattern
from sift_megatron.sparse.masks import derive_seed, hash_scores, nnz_for, shard_global_index
from sift_megatron.sparse.structure import (
    block_ids,
    block_mask,
    block_norms,
    expand_blocks,
    nm_groups,
    nm_top,
)
from tests.conftest import REPO

TINY = REPO / "configs" / "tiny" / "dense.yaml"


# ----------------------------------------------------------------------------------------------------------
# Settings


def test_parse_pattern():
    assert parse_pattern("unstructured") == Pattern("unstructured")
    assert parse_pattern("block", 1) == Pattern("unstructured")  # 1x1 tiles are elements
    assert parse_pattern("block", 32) == Pattern("block", block=32)
    assert parse_pattern("2:4") == Pattern("nm", n=2, m=4)
    assert parse_pattern("1:8") == Pattern("nm", n=1, m=8)


@pytest.mark.parametrize("pattern, block, msg", [
    ("blocks", 1, "sparsity.pattern must be unstructured, block or N:M with 0 < N < M (e.g. 2:4), got 'blocks'"),
    ("4:2", 1, "got '4:2'"),
    ("0:4", 1, "got '0:4'"),
    ("2:4:8", 1, "got '2:4:8'"),
    ("unstructured", 16, "sparsity.block=16 needs sparsity.pattern=block, got 'unstructured'"),
    ("2:4", 16, "sparsity.block=16 needs sparsity.pattern=block, got '2:4'"),
    ("block", 0, "sparsity.block must be a positive integer"),
    ("block", True, "sparsity.block must be a positive integer"),
])
def test_pattern_errors_are_one_line(pattern, block, msg):
    with pytest.raises(SiftError, match=msg.replace("(", r"\(").replace(")", r"\)")) as e:
        parse_pattern(pattern, block)
    assert "\n" not in str(e.value)


def test_config_keeps_n_m_a_string_and_validates():
    """YAML 1.1 reads 2:4 as the base-60 integer 124: the config loader keeps it a string, in overrides, files and
    the resolved config written back."""
    cfg = load_config(TINY, ["sparsity.pattern=2:4", "sparsity.s=0.5"])
    assert cfg.sparsity.pattern == "2:4"
    assert load_config(TINY, ["sparsity.pattern=block", "sparsity.block=16"]).sparsity.block == 16
    assert load_config(TINY, ["train.steps=120"]).train.steps == 120  # plain numbers unchanged
    with pytest.raises(SiftError, match="sparsity.block=16 needs sparsity.pattern=block"):
        load_config(TINY, ["sparsity.block=16"])
    with pytest.raises(SiftError, match="got '3:2'"):
        load_config(TINY, ["sparsity.pattern=3:2"])


def test_n_m_density_and_distribution_errors():
    from sift_megatron.sparse.layers import _check_nm_density

    _check_nm_density(Pattern("nm", n=2, m=4), 0.5, "uniform")
    with pytest.raises(SiftError, match=r"sparsity.pattern=2:4 keeps density 2/4: the sparsity used must be 0.5, "
                                        r"got 0.75 \(set sparsity.s=0.5"):
        _check_nm_density(Pattern("nm", n=2, m=4), 0.75, "uniform")
    with pytest.raises(SiftError, match="needs sparsity.distribution=uniform"):
        _check_nm_density(Pattern("nm", n=1, m=4), 0.75, "erk")


# ----------------------------------------------------------------------------------------------------------
# Tiles and groups on shards


def logical_tiles(rows: int, cols: int, b: int) -> torch.Tensor:
    return torch.arange(rows // b * (cols // b)).view(rows // b, cols // b)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("dim", [0, 1])
def test_block_ids_of_every_shard_are_its_slice_of_the_logical_tile_grid(tp, dim):
    rows, cols, b = 64, 128, 16
    ref = logical_tiles(rows, cols, b)
    for rank in range(tp):
        gi = shard_global_index((rows, cols), dim, rank, tp)
        part = (rows if dim == 0 else cols) // tp // b
        assert torch.equal(block_ids(gi, cols, b), ref.narrow(dim, rank * part, part))


def test_block_ids_of_interleaved_rows_and_errors():
    """A fused weight's shard holds interleaved row blocks (megatron QKV): whole tiles are fine in any order,
    a shard or a row block that splits a tile is an error."""
    rows, cols, b = 64, 32, 8
    full = torch.arange(rows * cols).view(rows, cols)
    take = torch.cat([torch.arange(16, 24), torch.arange(48, 64)])
    assert torch.equal(block_ids(full[take], cols, b), logical_tiles(rows, cols, b)[torch.tensor([2, 6, 7])])
    with pytest.raises(ValueError, match="not a whole number of 8x8 blocks"):
        block_ids(shard_global_index((rows, cols), 1, 0, 8), cols, b)  # 4 local columns
    with pytest.raises(ValueError, match="splits 8x8 blocks"):
        block_ids(full[4:12], cols, b)  # 8 rows, but across a tile boundary
    with pytest.raises(ValueError, match="splits 8x8 blocks"):
        block_ids(full[torch.cat([torch.arange(0, 4), torch.arange(12, 16)])], cols, b)


def test_tiles_norms_and_expand():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 12, generator=g)
    tiles = torch.rand(2, 3, generator=g) < 0.5
    mask = expand_blocks(tiles, 4)
    assert torch.equal(block_mask(mask, 4), tiles)
    norms = block_norms(w, 4, mask)
    for i in range(2):
        for j in range(3):
            ref = float(np.sqrt((w[4 * i:4 * i + 4, 4 * j:4 * j + 4].double() ** 2).sum())) if tiles[i, j] else 0.0
            assert norms[i, j].item() == pytest.approx(ref, rel=1e-6)
    mask[0, 0] = ~mask[0, 0]
    with pytest.raises(ValueError, match="not made of whole 4x4 blocks"):
        block_mask(mask, 4)


def test_nm_groups_on_shards():
    rows, cols = 8, 32
    for tp in (1, 2, 4):
        for rank in range(tp):
            nm_groups(shard_global_index((rows, cols), 1, rank, tp), cols, 4)
    with pytest.raises(ValueError, match="not a whole number of groups of 4 columns"):
        nm_groups(shard_global_index((rows, 12), 1, 0, 2), 12, 4)  # 6 local columns
    with pytest.raises(ValueError, match="splits groups of 4 columns"):
        nm_groups(torch.arange(rows * cols).view(rows, cols)[:, 2:10], cols, 4)


def test_nm_top_exact_counts_ties_and_exclude():
    s = torch.tensor([[3.0, 1.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0]])
    assert nm_top(s, 2, 4).tolist() == [[True, False, True, False, True, True, False, False]]  # ties: smaller col
    ex = torch.tensor([[True, False, False, False, False, False, True, True]])
    got = nm_top(s, torch.tensor([1, 2]), 4, exclude=ex)
    assert got.tolist() == [[False, False, True, False, True, True, False, False]]
    keys = hash_scores(7, "w", torch.arange(64 * 32)).view(64, 32)
    m = nm_top(keys, 2, 4)
    assert (m.view(-1, 4).sum(1) == 2).all()
    ref = keys.view(-1, 4).topk(2, dim=1).indices  # unique keys: the top 2 of each group
    assert torch.equal(m.view(-1, 4), torch.zeros(m.numel() // 4, 4, dtype=torch.bool).scatter_(1, ref, True))


# ----------------------------------------------------------------------------------------------------------
# Block and N:M DST against brute force


def brute_force(active: list[bool], w: list[float], grow: list, gi: list[int], f: float) -> set[int]:
    """Sort-based RigL / SET on a flat list (scores as Python numbers, ties by global index)."""
    nnz = sum(active)
    n_drop = nnz_for(nnz, f)
    order = sorted((i for i in range(len(active)) if active[i]), key=lambda i: (-w[i], gi[i]))
    kept = set(order[:nnz - n_drop])
    cands = sorted((i for i in range(len(active)) if i not in kept), key=lambda i: (-grow[i], gi[i]))
    return kept | set(cands[:n_drop])


@st.composite
def tile_cases(draw):
    b = draw(st.sampled_from([1, 2, 4]))
    tr, tc = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    n = tr * tc
    tiles = torch.zeros(n, dtype=torch.bool)
    tiles[torch.randperm(n, generator=g)[:draw(st.integers(0, n))]] = True
    mask = expand_blocks(tiles.view(tr, tc), b)
    levels = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])  # ties between tile norms happen
    weight = levels[torch.randint(5, mask.shape, generator=g)] * mask
    grad = levels[torch.randint(5, mask.shape, generator=g)]
    f = draw(st.sampled_from([0.0, 0.3, 0.5, 1.0]) | st.floats(0.0, 1.0))
    return b, mask, weight, grad, f, seed


@settings(max_examples=120, deadline=None)
@given(tile_cases(), st.booleans())
def test_block_update_matches_brute_force_on_tiles(case, rigl):
    """Drop by the tile L2 norm of the masked weights, grow by the tile L2 norm of the dense gradient (RigL) or
    the hash of the tile index (SET); exact tile count, whole tiles, dropped / grown consistent."""
    b, mask, weight, grad, f, seed = case
    tr, tc = mask.shape[0] // b, mask.shape[1] // b
    kw = {"grads": [grad]} if rigl else {"names": ["w"], "seed": seed, "step": 4}
    res = block_update("rigl" if rigl else "set", [weight], [mask], f, b, **kw)[0]
    tiles = [(i, j) for i in range(tr) for j in range(tc)]

    def norm(t, i, j):
        return float(torch.tensor(math.sqrt(float((t[i * b:(i + 1) * b, j * b:(j + 1) * b].double() ** 2).sum())),
                                  dtype=torch.float32))

    active = [bool(mask[i * b, j * b]) for i, j in tiles]
    w = [norm(weight, i, j) for i, j in tiles]
    if rigl:
        grow = [norm(grad, i, j) for i, j in tiles]
    else:
        grow = hash_scores(derive_seed(seed, "set", 4), "w", torch.arange(len(tiles))).tolist()
    new = brute_force(active, w, grow, list(range(len(tiles))), f)
    ref = torch.zeros(len(tiles), dtype=torch.bool)
    ref[sorted(new)] = True
    assert torch.equal(res.mask, expand_blocks(ref.view(tr, tc), b))
    assert int(block_mask(res.mask, b).sum()) == sum(active)
    assert torch.equal(res.dropped, mask & ~res.mask) and torch.equal(res.grown, res.mask & ~mask)


def test_block_update_follows_global_tile_index_not_local_layout():
    """The same logical tensor held with its tile rows in another local order (as a fused weight's shard holds
    them) gives the same logical mask: scores and ties follow the global tile index."""
    b, rows, cols = 4, 16, 8
    g = torch.Generator().manual_seed(3)
    tiles = torch.tensor([[1, 0], [1, 1], [0, 1], [1, 0]], dtype=torch.bool)
    mask = expand_blocks(tiles, b)
    weight = torch.randn(rows, cols, generator=g) * mask
    grad = torch.randn(rows, cols, generator=g)
    grad[4:8] = grad[12:16]  # two tiles with equal gradient norms: the smaller tile index wins
    order = torch.cat([torch.arange(8, 16), torch.arange(0, 8)])
    gi = torch.arange(rows * cols).view(rows, cols)
    for alg, kw in (("rigl", {}), ("set", {"names": ["x"], "seed": 1, "step": 2})):
        full = block_update(alg, [weight], [mask], 0.5, b, grads=[grad], **kw)[0]
        local = block_update(alg, [weight[order]], [mask[order]], 0.5, b, grads=[grad[order]],
                             global_index=[gi[order]], cols=[cols], **kw)[0]
        assert torch.equal(local.mask, full.mask[order]), alg


@st.composite
def nm_cases(draw):
    n, m = draw(st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 8)]))
    rows, groups = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    keys = hash_scores(seed, "w", torch.arange(rows * groups * m)).view(rows, groups * m)
    mask = nm_top(keys, n, m)
    levels = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    weight = levels[torch.randint(5, mask.shape, generator=g)] * mask
    grad = levels[torch.randint(5, mask.shape, generator=g)]
    return n, m, mask, weight, grad, draw(st.floats(0.0, 1.0)), seed


@settings(max_examples=120, deadline=None)
@given(nm_cases(), st.booleans())
def test_nm_update_keeps_n_of_every_m_and_matches_reference(case, rigl):
    """Drop the nnz_for(nnz, f) active entries of smallest |W| over the tensor (ties: larger index dropped), grow
    back in each group as many as it lost, by |dense grad| (RigL) or the SET hash, ties to the smaller column."""
    n, m, mask, weight, grad, f, seed = case
    kw = {"grads": [grad]} if rigl else {"names": ["w"], "seed": seed, "step": 6}
    res = nm_update("rigl" if rigl else "set", [weight], [mask], f, n, m, **kw)[0]
    assert (res.mask.view(-1, m).sum(1) == n).all()
    assert torch.equal(res.dropped, mask & ~res.mask) and torch.equal(res.grown, res.mask & ~mask)
    flat_m, flat_w = mask.reshape(-1).tolist(), weight.reshape(-1).abs().tolist()
    nnz = sum(flat_m)
    order = sorted((i for i in range(len(flat_m)) if flat_m[i]), key=lambda i: (-flat_w[i], i))
    kept = set(order[:nnz - nnz_for(nnz, f)])
    if rigl:
        grow = grad.reshape(-1).abs().tolist()
    else:
        grow = hash_scores(derive_seed(seed, "set", 6), "w", torch.arange(mask.numel())).tolist()
    new = set(kept)
    for start in range(0, len(flat_m), m):
        group = range(start, start + m)
        lost = n - sum(i in kept for i in group)
        new |= set(sorted((i for i in group if i not in kept), key=lambda i: (-grow[i], i))[:lost])
    ref = torch.zeros(mask.numel(), dtype=torch.bool)
    ref[sorted(new)] = True
    assert torch.equal(res.mask.reshape(-1), ref)


def test_nm_update_layout_and_errors():
    n, m = 2, 4
    keys = hash_scores(5, "w", torch.arange(6 * 16)).view(6, 16)
    mask = nm_top(keys, n, m)
    g = torch.Generator().manual_seed(1)
    weight, grad = torch.randn(6, 16, generator=g) * mask, torch.randn(6, 16, generator=g)
    order = torch.tensor([3, 5, 0, 1, 4, 2])  # rows in another local order, with their global indices
    full = nm_update("rigl", [weight], [mask], 0.4, n, m, grads=[grad])[0]
    local = nm_update("rigl", [weight[order]], [mask[order]], 0.4, n, m, grads=[grad[order]],
                      global_index=[torch.arange(96).view(6, 16)[order]])[0]
    assert torch.equal(local.mask, full.mask[order])
    # n_drop = 19 left the kept set; some regrew in their group (counted as neither dropped nor grown)
    assert 0 < int(full.dropped.sum()) == full.n_changed <= nnz_for(int(mask.sum()), 0.4) == 19
    bad = mask.clone()
    bad[0, :4] = True
    with pytest.raises(ValueError, match="does not keep exactly 2 of every 4 columns"):
        nm_update("rigl", [weight], [bad], 0.4, n, m, grads=[grad])
    assert torch.equal(nm_update("static", [weight], [mask], 0.4, n, m)[0].mask, mask)


def test_resume_with_another_mask_structure_is_a_one_line_error(tmp_path):
    """Unstructured masks loaded into a block run would break its first DST update: refused before loading."""
    import json

    from sift_megatron.config import load_config, save_resolved
    from sift_megatron.errors import SiftError
    from sift_megatron.preflight import check_checkpoint
    from tests.conftest import REPO

    tiny = REPO / "configs" / "tiny" / "dense.yaml"
    over = ["sparsity.family=wide", "sparsity.s=0.5", "dst.algorithm=rigl"]
    ck = tmp_path / "step_2"
    ck.mkdir()
    save_resolved(load_config(tiny, over), ck / "config.yaml")
    (ck / "meta.json").write_text(json.dumps({"step": 2, "layout": {"tp": 1, "dp": 1}}))
    (ck / "dcp.json").write_text(json.dumps({"format": "sift-dcp-1", "tensors": {}, "storage": []}))
    cfg = load_config(tiny, [*over, "sparsity.pattern=block", "sparsity.block=2"])
    with pytest.raises(SiftError, match="does not fit this model"):  # no tensors: shapes are checked first
        check_checkpoint(cfg, ck, 1)
    from sift_megatron.preflight import expected_model_shapes

    index = {"format": "sift-dcp-1", "storage": [], "tensors": {
        f"model/{k}": {"dtype": "torch.float32", "size": list(v), "chunks": []}
        for k, v in expected_model_shapes(cfg).items()}}
    (ck / "dcp.json").write_text(json.dumps(index))
    with pytest.raises(SiftError, match=r"has sparsity.pattern 'unstructured' masks, this run sets sparsity.pattern "
                                        r"'block'"):
        check_checkpoint(cfg, ck, 1)
