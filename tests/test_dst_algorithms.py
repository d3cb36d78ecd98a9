"""Static / SET / RigL updates against a brute-force single-tensor reference (property-based, with ties)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sift_megatron.dst.algorithms import (
    rigl_update,
    rigl_update_tensor,
    set_update_tensor,
    static_update,
    static_update_tensor,
    update,
)
from sift_megatron.sparse.masks import derive_seed, hash_scores, nnz_for

LEVELS = torch.tensor([-1.0, -0.25, 0.0, 0.25, 0.5, 1.0])


def brute_force(mask: torch.Tensor, weight: torch.Tensor, grow_score: np.ndarray, f: float,
                gidx: np.ndarray | None = None):
    """Sort-based reference on one whole tensor: scores compared as Python numbers, ties by global index."""
    m = mask.reshape(-1).tolist()
    w = [abs(float(x)) for x in weight.reshape(-1).to(torch.float32)]
    gi = list(range(len(m))) if gidx is None else gidx.reshape(-1).tolist()
    s = grow_score.reshape(-1).tolist()
    nnz = sum(m)
    n_drop = nnz_for(nnz, f)
    active = sorted((i for i in range(len(m)) if m[i]), key=lambda i: (-w[i], gi[i]))
    kept = set(active[:nnz - n_drop])
    candidates = sorted((i for i in range(len(m)) if i not in kept), key=lambda i: (-s[i], gi[i]))
    new = kept | set(candidates[:n_drop])
    out = torch.zeros(len(m), dtype=torch.bool)
    out[sorted(new)] = True
    return out.view(mask.shape)


def set_scores(seed: int, step: int, name: str, gidx: torch.Tensor) -> np.ndarray:
    """SET's grow scores: the documented hash stream, as exact Python ints (ranked in int64 order)."""
    return np.array(hash_scores(derive_seed(seed, "set", step), name, gidx).tolist(), dtype=object)


@st.composite
def tensors(draw):
    rows, cols = draw(st.integers(1, 8)), draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    n = rows * cols
    nnz = draw(st.integers(0, n))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[:nnz]] = True
    mask = mask.view(rows, cols)
    weight = LEVELS[torch.randint(len(LEVELS), (rows, cols), generator=g)] * mask  # masked weights are 0
    grad = LEVELS[torch.randint(len(LEVELS), (rows, cols), generator=g)]
    f = draw(st.sampled_from([0.0, 0.1, 0.3, 0.5, 1.0]) | st.floats(0.0, 1.0))
    return mask, weight, grad, f, seed


def check_invariants(mask, res):
    assert res.mask.dtype == torch.bool and res.mask.shape == mask.shape
    assert int(res.mask.sum()) == int(mask.sum())  # nnz exact
    assert torch.equal(res.dropped, mask & ~res.mask)
    assert torch.equal(res.grown, res.mask & ~mask)
    assert int(res.dropped.sum()) == int(res.grown.sum()) == res.n_changed


@settings(max_examples=200, deadline=None)
@given(tensors())
def test_rigl_matches_brute_force(case):
    mask, weight, grad, f, _ = case
    res = rigl_update_tensor(mask, weight, grad, f)
    check_invariants(mask, res)
    assert torch.equal(res.mask, brute_force(mask, weight, grad.abs().numpy(), f))


@settings(max_examples=200, deadline=None)
@given(tensors(), st.integers(0, 10**6))
def test_set_matches_brute_force(case, step):
    mask, weight, _, f, seed = case
    res = set_update_tensor(mask, weight, f, name="blk.fc1", seed=seed, step=step)
    check_invariants(mask, res)
    gidx = torch.arange(mask.numel()).view(mask.shape)
    assert torch.equal(res.mask, brute_force(mask, weight, set_scores(seed, step, "blk.fc1", gidx), f))


@settings(max_examples=50, deadline=None)
@given(st.lists(tensors(), min_size=1, max_size=4), st.booleans())
def test_batched_path_equals_single_tensor_path(cases, rigl):
    masks, weights, grads, fs, seeds = zip(*cases)
    f = fs[0]
    names = [f"t{i}" for i in range(len(cases))]
    gidx = [torch.arange(m.numel()) for m in masks]  # flat, as megatron layers produce them
    batch = update("rigl" if rigl else "set", list(weights), list(masks), f, grads=list(grads),
                   global_index=gidx, names=names, seed=seeds[0], step=5)
    for i, (m, w, g) in enumerate(zip(masks, weights, grads)):
        single = rigl_update_tensor(m, w, g, f) if rigl else set_update_tensor(m, w, f, name=names[i], seed=seeds[0], step=5)
        for field in ("mask", "dropped", "grown"):
            assert torch.equal(getattr(batch[i], field), getattr(single, field))


@settings(max_examples=50, deadline=None)
@given(tensors(), st.booleans())
def test_local_layout_does_not_matter(case, rigl):
    # The same logical tensor laid out in another local order (with its global indices) gives the same
    # logical result: ties and SET scores follow the global index, not the local position.
    mask, weight, grad, f, seed = case
    n = mask.numel()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    gidx = torch.arange(n)[perm]
    kw = {"grads": [grad.reshape(-1)[perm]]} if rigl else {"names": ["w"], "seed": seed, "step": 3}
    res = update("rigl" if rigl else "set", [weight.reshape(-1)[perm]], [mask.reshape(-1)[perm]], f,
                 global_index=[gidx], **kw)[0]
    if rigl:
        ref = rigl_update_tensor(mask, weight, grad, f)
    else:
        ref = set_update_tensor(mask, weight, f, name="w", seed=seed, step=3)
    assert torch.equal(res.mask, ref.mask.reshape(-1)[perm])


def test_just_dropped_may_regrow_and_counts_as_neither():
    mask = torch.tensor([True, True, True, True, False, False, False, False])
    weight = torch.tensor([4.0, 3.0, 2.0, 0.1, 0, 0, 0, 0])  # drop 0.1 (f = 0.25 of 4 -> 1)
    grad = torch.tensor([0.0, 0.0, 0.0, 9.0, 1.0, 2.0, 0.5, 0.0])  # the dropped entry has the top grad
    res = rigl_update_tensor(mask, weight, grad, 0.25)
    assert torch.equal(res.mask, mask)
    assert not res.dropped.any() and not res.grown.any()
    grad[3] = 1.5  # now entry 5 (2.0) beats it
    res = rigl_update_tensor(mask, weight, grad, 0.25)
    assert res.mask.tolist() == [True, True, True, False, False, True, False, False]
    assert res.dropped.nonzero().flatten().tolist() == [3] and res.grown.nonzero().flatten().tolist() == [5]


def test_kept_entries_are_never_grown_even_with_top_gradients():
    mask = torch.tensor([True, True, False, False, False])
    weight = torch.tensor([1.0, 0.5, 0.0, 0.0, 0.0])
    grad = torch.tensor([100.0, 0.0, 0.0, 0.0, 3.0])  # the kept entry has the largest grad
    res = rigl_update_tensor(mask, weight, grad, 0.5)
    assert res.mask.tolist() == [True, False, False, False, True]


def test_zero_ties_break_by_index():
    mask = torch.tensor([True, True, True, True])
    res = rigl_update_tensor(mask, torch.zeros(4), torch.zeros(4), 0.5)  # everything tied
    assert res.mask.all()  # drop {2, 3} (larger indices), regrow them first by index among {2, 3}


def test_edge_fractions_and_static():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 7, generator=g) < 0.4
    w = torch.randn(6, 7, generator=g) * mask
    grad = torch.randn(6, 7, generator=g)
    res = rigl_update_tensor(mask, w, grad, 0.0)
    assert torch.equal(res.mask, mask) and not res.grown.any()
    res = rigl_update_tensor(mask, w, grad, 1.0)  # drop all, regrow the top |grad| anywhere
    ref = torch.zeros(42, dtype=torch.bool)
    ref[torch.topk(grad.abs().reshape(-1), int(mask.sum())).indices] = True
    assert torch.equal(res.mask, ref.view(6, 7))
    st_res = static_update_tensor(mask)
    assert torch.equal(st_res.mask, mask) and not st_res.dropped.any() and not st_res.grown.any()
    out = update("static", [w], [mask], 0.3)
    assert torch.equal(out[0].mask, mask)
    assert torch.equal(static_update([mask]).masks[0], mask)
    empty = torch.zeros(3, 3, dtype=torch.bool)
    assert not rigl_update_tensor(empty, torch.zeros(3, 3), torch.ones(3, 3), 0.5).mask.any()


def test_errors():
    m = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError):
        update("gmp", [m.float()], [m], 0.3)
    with pytest.raises(ValueError):
        update("rigl", [m.float()], [m], 0.3)
    with pytest.raises(ValueError):
        update("set", [m.float()], [m], 0.3)
    with pytest.raises(ValueError):  # sharded without global indices
        rigl_update([m.float()], [m], [m.float()], 0.3, group=object())
    with pytest.raises(ValueError):
        rigl_update_tensor(m, m.float(), m.float(), 1.5)
    with pytest.raises(TypeError):
        rigl_update_tensor(m.float(), m.float(), m.float(), 0.3)
    with pytest.raises(ValueError):
        rigl_update_tensor(m, torch.ones(3), m.float(), 0.3)
