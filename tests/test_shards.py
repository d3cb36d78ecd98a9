"""Sharded tensors in DCP files without pickle (sift_megatron/shards.py): ZeRO fragments as boxes, resharding
on load, the JSON index (never DCP's pickled .metadata), and one-line errors for damaged files."""

from __future__ import annotations

import json
import random

import pytest
import torch

from sift_megatron import shards
from sift_megatron.errors import SiftError


@pytest.mark.parametrize("shape", [(7,), (5, 9), (1, 13), (6, 1)])
def test_flat_fragment_boxes_tile_the_range_exactly(shape):
    """Any flat range of a row-major shard is at most three boxes whose views hold exactly its elements."""
    rng = random.Random(0)
    n = 1
    for d in shape:
        n *= d
    full = torch.arange(n, dtype=torch.float32).reshape(shape)
    for _ in range(200):
        start = rng.randrange(n)
        end = rng.randrange(start, n + 1)
        flat = full.reshape(-1)[start:end].clone()
        offsets = [3] * len(shape)  # the shard sits at (3, 3) in a bigger logical tensor
        boxes = shards.flat_fragment([d + 3 for d in shape], shape, offsets, start, flat)
        assert len(boxes) <= (1 if len(shape) == 1 else 3)
        covered = torch.zeros(shape, dtype=torch.int64)
        for off, t in boxes:
            assert t.data_ptr() >= flat.data_ptr()  # a view of the fragment, no copy
            local = [o - 3 for o in off]
            idx = tuple(slice(o, o + s) for o, s in zip(local, t.shape))
            assert torch.equal(full[idx], t)
            covered[idx] += 1
        assert int(covered.sum()) == end - start and int(covered.max()) <= 1


def _save_tp2_zero2(path):
    """A [6, 10] row-parallel weight saved as 2 TP shards, each split into 2 ZeRO fragments (4 'ranks'), plus a
    replicated bias saved twice (replicas are written once) and a bool mask."""
    w = torch.randn(6, 10)
    pieces = []
    for r in range(2):
        flat = w[:, r * 5:(r + 1) * 5].contiguous().reshape(-1)
        for s, n in ((0, 13), (13, 17)):
            pieces += shards.flat_fragment((6, 10), (6, 5), (0, r * 5), s, flat[s:s + n].clone())
    b = torch.randn(10)
    mask = torch.rand(6, 10) < 0.5
    shards.save({"w": shards.Pieces((6, 10), pieces), "b": shards.Pieces((10,), [((0,), b), ((0,), b.clone())]),
                 "m": shards.Pieces((6, 10), [((0, 0), mask[:3]), ((3, 0), mask[3:])])}, path)
    return w, b, mask


def test_save_then_load_at_another_sharding(tmp_path):
    w, b, mask = _save_tp2_zero2(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["__0_0.distcp", shards.INDEX_FILE]  # no pickled .metadata
    index = json.loads((tmp_path / shards.INDEX_FILE).read_text())
    assert index["tensors"]["w"]["size"] == [6, 10] and len(index["tensors"]["w"]["chunks"]) >= 4
    assert len(index["tensors"]["b"]["chunks"]) == 1  # the replica was written once
    rows = [torch.zeros(2, 10) for _ in range(3)]  # column-parallel TP=3: rows, across every saved box
    got_b, got_m = torch.zeros(10), torch.zeros(6, 10, dtype=torch.bool)
    shards.load({"w": shards.Pieces((6, 10), [((2 * i, 0), t) for i, t in enumerate(rows)]),
                 "b": shards.Pieces((10,), [((0,), got_b)]), "m": shards.Pieces((6, 10), [((0, 0), got_m)])}, tmp_path)
    assert torch.equal(torch.cat(rows), w) and torch.equal(got_b, b) and torch.equal(got_m, mask)
    assert torch.equal(shards.read_box(tmp_path, "w", (6, 10), torch.float32, (1, 4), (4, 3)), w[1:5, 4:7])


def test_opened_checkpoint_loads_without_reading_its_index_again(tmp_path):
    """A resume parses the index once: preflight opens the checkpoint, the trainer's load reuses it."""
    w, b, _ = _save_tp2_zero2(tmp_path)
    ck = shards.ShardedCheckpoint(tmp_path)
    (tmp_path / shards.INDEX_FILE).unlink()
    got_w, got_b = torch.zeros(6, 10), torch.zeros(10)
    ck.load({"w": shards.Pieces((6, 10), [((0, 0), got_w)]), "b": shards.Pieces((10,), [((0,), got_b)])})
    assert torch.equal(got_w, w) and torch.equal(got_b, b)


def test_damaged_files_are_one_line_errors_naming_them(tmp_path):
    _save_tp2_zero2(tmp_path)
    data = tmp_path / "__0_0.distcp"
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SiftError, match=r"__0_0\.distcp is corrupt or truncated"):
        shards.read_index(tmp_path)
    data.write_bytes(bytes(len(raw)))  # whole length, no valid record
    with pytest.raises(SiftError, match=r"__0_0\.distcp is corrupt or not tensors-only"):
        shards.read_box(tmp_path, "w", (6, 10), torch.float32)
    data.write_bytes(raw)
    index = json.loads((tmp_path / shards.INDEX_FILE).read_text())
    for bad in ({"file": "../escape.distcp"}, {"pos": -1}):
        crafted = {**index, "storage": [{**index["storage"][0], **bad}, *index["storage"][1:]]}
        (tmp_path / shards.INDEX_FILE).write_text(json.dumps(crafted))
        with pytest.raises(SiftError, match=r"dcp\.json is corrupt"):
            shards.read_index(tmp_path)
    crafted = {**index, "tensors": {**index["tensors"], "w": {**index["tensors"]["w"], "dtype": "object"}}}
    (tmp_path / shards.INDEX_FILE).write_text(json.dumps(crafted))
    with pytest.raises(SiftError, match=r"dcp\.json is corrupt"):
        shards.read_index(tmp_path)
    (tmp_path / shards.INDEX_FILE).unlink()
    with pytest.raises(SiftError, match="missing dcp.json"):
        shards.read_index(tmp_path)
