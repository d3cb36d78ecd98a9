"""Mask init: counter-based hash, exact counts, uniform/ERK/ER densities, shard index helpers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sift_megatron.errors import SiftError
from sift_megatron.sparse.masks import (
    MaskSpec,
    derive_seed,
    global_index,
    hash_scores,
    init_mask_local,
    layer_densities,
    nnz_for,
    shard_global_index,
    slices_global_index,
    uniform_from_keys,
)

M64 = (1 << 64) - 1


def splitmix64_reference(state: int, n: int) -> list[int]:
    """Textbook splitmix64 on Python ints: outputs 1..n of the stream starting at `state`."""
    out = []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out.append(z ^ (z >> 31))
    return out


def as_signed(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


def test_hash_is_splitmix64_stream_of_global_index():
    idx = torch.arange(0, 50, dtype=torch.int64)
    keys = hash_scores(7, "layers.0.fc1.weight", idx).tolist()
    far = torch.tensor([(1 << 32) + 5, (1 << 40) + 3], dtype=torch.int64)
    far_keys = hash_scores(7, "layers.0.fc1.weight", far).tolist()
    from sift_megatron.sparse import masks

    state = masks._fmix64_py(masks._fmix64_py(7) ^ masks._name_hash("layers.0.fc1.weight"))
    ref = [as_signed(z) for z in splitmix64_reference(state, 50)]
    assert keys == ref
    for i, k in zip(far.tolist(), far_keys):
        s = (state + i * 0x9E3779B97F4A7C15) & M64
        assert k == as_signed(splitmix64_reference(s, 1)[0])


def test_hash_golden_values_are_stable():
    # Masks of saved checkpoints depend on these bits: changing the hash changes every mask.
    keys = hash_scores(1234, "decoder.layers.3.mlp.linear_fc1.weight", torch.tensor([0, 1, 99]))
    assert keys.tolist() == [-8788741553368314279, 875536085111911910, -1582241335846084543]


def test_hash_keys_unique_and_name_seed_dependent():
    idx = torch.arange(200_000)
    a = hash_scores(0, "a", idx)
    assert a.unique().numel() == idx.numel()  # bijection of the index: no ties to break
    assert not torch.equal(a, hash_scores(0, "b", idx))
    assert not torch.equal(a, hash_scores(1, "a", idx))
    assert torch.equal(a, hash_scores(0, "a", idx.clone()))
    u = uniform_from_keys(a)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01
    with pytest.raises(TypeError):
        hash_scores(0, "a", torch.arange(3, dtype=torch.int32))


def test_derive_seed_is_deterministic_and_tag_sensitive():
    assert derive_seed(3, "set", 100) == derive_seed(3, "set", 100)
    assert len({derive_seed(3, "set", s) for s in range(100)}) == 100
    assert derive_seed(3, "set", 1) != derive_seed(4, "set", 1)


@pytest.mark.parametrize(("numel", "density", "nnz"), [
    (1000, 1 - 0.9, 100),  # int((1 - 0.9) * 1000) == 99: float noise
    (100, 0.57, 57),  # int(0.57 * 100) == 56
    (10, 0.35, 3), (7, 0.5, 3), (0, 0.5, 0), (5, 0.0, 0), (5, 1.0, 5),
    (1536 * 6144, 0.25, 1536 * 6144 // 4),
])
def test_nnz_for_examples(numel, density, nnz):
    assert nnz_for(numel, density) == nnz


@given(st.integers(1, 10**9), st.integers(0, 10**9))
def test_nnz_for_exact_ratio(numel, c):
    c = c % (numel + 1)
    assert nnz_for(numel, c / numel) == c


@given(st.integers(0, 10**9), st.floats(0.0, 1.0))
def test_nnz_for_is_floor_up_to_noise(numel, d):
    assert abs(nnz_for(numel, d) - d * numel) < 1.0
    assert 0 <= nnz_for(numel, d) <= numel


def test_nnz_for_rejects_bad_density():
    with pytest.raises(ValueError):
        nnz_for(10, 1.5)


GPT = {f"l{i}.{n}": s for i in range(2) for n, s in
       [("qkv", (3 * 64, 64)), ("proj", (64, 64)), ("fc1", (256, 64)), ("fc2", (64, 256))]}


def test_uniform_densities():
    d = layer_densities(GPT, 0.75)
    assert set(d) == set(GPT) and all(v == 0.25 for v in d.values())
    d = layer_densities(GPT, 0.75, "uniform", dense={"l0.qkv"})
    assert d["l0.qkv"] == 1.0 and d["l1.qkv"] == 0.25
    assert all(v == 1.0 for v in layer_densities(GPT, 0.0, "erk").values())


def erk_reference(shapes: dict, s: float, power: float = 1.0) -> dict:
    """Independent restatement: raise eps until no layer exceeds 1, densifying the top raw score."""
    numel = {n: math.prod(v) for n, v in shapes.items()}
    raw = {n: (sum(v) / numel[n]) ** power for n, v in shapes.items()}
    dense: set = set()
    while True:
        free = [n for n in shapes if n not in dense]
        budget = (1 - s) * sum(numel.values()) - sum(numel[n] for n in dense)
        eps = budget / sum(raw[n] * numel[n] for n in free)
        top = max(raw[n] for n in free)
        if eps * top <= 1:
            return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}
        dense |= {n for n in free if raw[n] == top}


@pytest.mark.parametrize("s", [0.5, 0.75, 0.9])
def test_erk_matches_reference_and_budget(s):
    d = layer_densities(GPT, s, "erk")
    ref = erk_reference(GPT, s)
    assert d.keys() == ref.keys()
    for n in d:
        assert d[n] == pytest.approx(ref[n], rel=1e-12)
        assert 0.0 < d[n] <= 1.0
    total = sum(math.prod(v) for v in GPT.values())
    kept = sum(d[n] * math.prod(GPT[n]) for n in GPT)
    assert kept == pytest.approx((1 - s) * total, rel=1e-12)
    # ER equals ERK for 2-D tensors.
    er = layer_densities(GPT, s, "er")
    assert all(er[n] == pytest.approx(d[n]) for n in d)


def test_erk_densifies_layers_over_one():
    shapes = {"tiny": (4, 4), "big": (512, 512), "big2": (256, 1024)}
    d = layer_densities(shapes, 0.5, "erk")
    assert d["tiny"] == 1.0
    kept = sum(d[n] * math.prod(v) for n, v in shapes.items())
    assert kept == pytest.approx(0.5 * sum(math.prod(v) for v in shapes.values()))
    assert d == pytest.approx(erk_reference(shapes, 0.5))


def test_erk_counts_requested_dense_layers_in_budget():
    shapes = {"a": (64, 64), "b": (64, 64), "c": (64, 64)}
    d = layer_densities(shapes, 0.5, "erk", dense={"a"})
    assert d["a"] == 1.0
    assert d["b"] == pytest.approx(0.25) and d["c"] == pytest.approx(0.25)


@pytest.mark.parametrize(("kwargs", "msg"), [
    ({"sparsity": 1.0}, "sparsity must be in [0, 1)"),
    ({"sparsity": -0.1}, "sparsity must be in [0, 1)"),
    ({"sparsity": 0.5, "distribution": "gaussian"}, "uniform, erk or er"),
    ({"sparsity": 0.9, "distribution": "erk", "dense": {"l0.fc1", "l1.fc1", "l0.fc2", "l1.fc2"}}, "infeasible"),
])
def test_density_errors_are_one_line(kwargs, msg):
    with pytest.raises(SiftError) as err:
        layer_densities(GPT, **kwargs)
    assert msg in str(err.value) and "\n" not in str(err.value)


def test_er_needs_two_dims():
    with pytest.raises(SiftError):
        layer_densities({"w": (8, 8), "b": (8,)}, 0.5, "er")


def test_shard_index_helpers():
    shape = (6, 8)
    full = torch.arange(48).view(shape)
    for world in (1, 2, 3):
        for rank in range(world):
            assert torch.equal(shard_global_index(shape, 0, rank, world), full.chunk(world, 0)[rank])
    for world in (1, 2, 4):
        for rank in range(world):
            assert torch.equal(shard_global_index(shape, 1, rank, world), full.chunk(world, 1)[rank])
    # Interleaved fused blocks (e.g. rank 1 of [gate; up] at TP=2: rows 3:6 of gate and of up).
    fused = (12, 4)
    ref = torch.cat([torch.arange(48).view(fused)[1:3], torch.arange(48).view(fused)[7:9]])
    assert torch.equal(slices_global_index(fused, [(0, 1, 2), (0, 7, 2)]), ref)
    coords = [torch.tensor([5, 0]), torch.tensor([7, 1])]
    assert global_index(shape, coords).tolist() == [[47, 41], [7, 1]]
    with pytest.raises(ValueError):
        shard_global_index(shape, 0, 0, 4)
    with pytest.raises(ValueError):
        global_index(shape, [torch.tensor([6]), None])


def full_mask(seed, name, shape, density):
    """Reference: top-nnz of the hash keys of the whole tensor by a plain sort."""
    keys = hash_scores(seed, name, torch.arange(math.prod(shape)))
    order = torch.sort(keys, descending=True, stable=True).indices
    m = torch.zeros(math.prod(shape), dtype=torch.bool)
    m[order[:nnz_for(math.prod(shape), density)]] = True
    return m.view(shape)


def test_init_mask_exact_count_and_reference():
    shapes = {"a": (24, 40), "b": (40, 24), "c": (7, 3), "d": (5, 5)}
    dens = {"a": 0.25, "b": 0.5, "c": 1.0, "d": 0.0}
    specs = [MaskSpec(n, s, dens[n], torch.arange(math.prod(s)).view(s)) for n, s in shapes.items()]
    masks = init_mask_local(specs, seed=11)
    for spec, m in zip(specs, masks):
        assert m.shape == spec.shape and m.dtype == torch.bool
        assert int(m.sum()) == nnz_for(math.prod(spec.shape), spec.density)
        assert torch.equal(m, full_mask(11, spec.name, spec.shape, spec.density))
    # A tensor's mask does not depend on what else is in the batch, nor on the order.
    alone = init_mask_local([specs[1]], seed=11)[0]
    assert torch.equal(alone, masks[1])
    assert not torch.equal(init_mask_local([specs[0]], seed=12)[0], masks[0])


def test_init_mask_local_layout_inside_one_process():
    # With group=None the local tensor is the whole tensor, but its elements may be laid out in any order:
    # a transposed layout with its global indices gives the transposed mask.
    shape = (16, 12)
    gi = torch.arange(192).view(shape)
    m = init_mask_local([MaskSpec("w", shape, 0.3, gi)], seed=5)[0]
    mt = init_mask_local([MaskSpec("w", shape, 0.3, gi.t().contiguous())], seed=5)[0]
    assert torch.equal(mt, m.t())
