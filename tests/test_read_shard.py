"""A resharded resume reads each rank's slice of the logical tensors in model.safetensors / optimizer.safetensors
(models/gpt.read_shard), not the whole tensors: the slice must be megatron's contiguous TP shard, along dim 0
(column-parallel, vocab-parallel) and dim 1 (row-parallel), at every TP rank."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("dim", [0, 1])
def test_read_shard_is_the_tp_slice(tmp_path, monkeypatch, tp, dim):
    from megatron.core import parallel_state as ps

    from sift_megatron.models.gpt import read_shard

    full = torch.randn(8, 12, dtype=torch.float64)
    path = tmp_path / "m.safetensors"
    save_file({"w": full, "b": full[0].clone()}, str(path))
    monkeypatch.setattr(ps, "get_tensor_model_parallel_world_size", lambda: tp)
    for rank in range(tp):
        monkeypatch.setattr(ps, "get_tensor_model_parallel_rank", lambda r=rank: r)
        shard = torch.nn.Parameter(full.chunk(tp, dim)[rank].clone())
        shard.tensor_model_parallel, shard.partition_dim = True, dim
        replicated = torch.nn.Parameter(full[0].clone())
        with safe_open(str(path), framework="pt") as f:
            got = read_shard(f, "w", shard)
            assert got.is_contiguous() and torch.equal(got, full.chunk(tp, dim)[rank])
            assert torch.equal(read_shard(f, "b", replicated), full[0])
    if tp > 1:  # a logical size that is not TP x the shard is refused
        bad = torch.nn.Parameter(torch.zeros(3, 12) if dim == 0 else torch.zeros(8, 5))
        bad.tensor_model_parallel, bad.partition_dim = True, dim
        with safe_open(str(path), framework="pt") as f, pytest.raises(ValueError, match="logical dim"):
            read_shard(f, "w", bad)
