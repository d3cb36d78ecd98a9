"""Exact top-k: single-process results against sorting references and torch.topk; the distributed result
against the single-process one under real torchrun (gloo)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sift_megatron.sparse.masks import hash_scores
from sift_megatron.sparse.topk import float_keys, kth_value, topk_mask, topk_mask_keys
from tests.conftest import REPO, run_torchrun

POOL = [-np.inf, -2.0, -1.5, -0.0, 0.0, 0.5, 0.5000001, 2.0, 3.0, np.inf]


def reference(values: torch.Tensor, gidx: torch.Tensor, k: int, largest: bool = True,
              exclude: torch.Tensor | None = None, magnitude: bool = False) -> torch.Tensor:
    """Sort the logical tensor by (value, global index) with numpy and take the first k eligible."""
    v = values.detach().to(torch.float32).reshape(-1).double().numpy()
    if magnitude:
        v = np.abs(v)
    v = v + 0.0  # -0.0 == 0.0
    idx = gidx.reshape(-1).numpy()
    primary = -v if largest else v
    order = np.lexsort((idx, primary))
    if exclude is not None:
        ex = exclude.reshape(-1).numpy()
        order = order[~ex[order]]
    out = np.zeros(v.size, dtype=bool)
    out[order[:k]] = True
    return torch.from_numpy(out).view(values.shape)


@st.composite
def cases(draw):
    n_tensors = draw(st.integers(1, 3))
    out = []
    for _ in range(n_tensors):
        rows, cols = draw(st.integers(0, 6)), draw(st.integers(1, 9))
        n = rows * cols
        seed = draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        if draw(st.booleans()):
            vals = torch.tensor(POOL, dtype=torch.float64)[torch.randint(len(POOL), (rows, cols), generator=g)]
        else:
            vals = torch.randn(rows, cols, generator=g, dtype=torch.float64)
        vals = vals.to(draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])))
        gidx = torch.randperm(n, generator=g).view(rows, cols) * draw(st.sampled_from([1, 7]))
        exclude = (torch.rand(rows, cols, generator=g) < 0.3) if draw(st.booleans()) else None
        eligible = n - (int(exclude.sum()) if exclude is not None else 0)
        k = draw(st.integers(0, eligible))
        out.append((vals, gidx, k, exclude))
    return out, draw(st.booleans()), draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(cases())
def test_topk_mask_matches_sorting_reference(case):
    tensors, largest, magnitude = case
    vals, gidx, ks, excl = zip(*tensors)
    use_excl = list(excl) if any(e is not None for e in excl) else None
    masks = topk_mask(list(vals), list(gidx), list(ks), largest=largest, exclude=use_excl, magnitude=magnitude)
    for v, g, k, e, m in zip(vals, gidx, ks, excl, masks):
        assert m.dtype == torch.bool and m.shape == v.shape
        assert int(m.sum()) == k
        assert torch.equal(m, reference(v, g, k, largest, e, magnitude))
        if k:
            kv = kth_value([v], [k], largest=largest, exclude=[e], magnitude=magnitude)[0]
            ref = reference(v, g, k, largest, e, magnitude)
            x = v.to(torch.float32)
            x = x.abs() if magnitude else x
            assert kv == float(x[ref].min() if largest else x[ref].max())


def test_matches_torch_topk_on_distinct_values():
    g = torch.Generator().manual_seed(0)
    for n, k in [(1, 1), (1000, 1), (1000, 999), (5000, 1234), (4096, 4096)]:
        v = torch.randn(n, generator=g)
        for largest in (True, False):
            m = topk_mask([v], None, [k], largest=largest)[0]
            ref = torch.zeros(n, dtype=torch.bool)
            ref[torch.topk(v, k, largest=largest).indices] = True
            assert torch.equal(m, ref)


def test_ties_broken_by_smaller_global_index():
    g = torch.Generator().manual_seed(1)
    gidx = torch.unique(torch.randint(0, 1 << 32, (5000,), generator=g))  # large, unique, sorted
    ranks = torch.randperm(gidx.numel(), generator=g)
    v = torch.zeros(gidx.numel())
    for k in (0, 1, 17, 2500, gidx.numel()):
        m = topk_mask([v], [gidx[ranks]], [k])[0]
        assert torch.equal(m, ranks < k)  # the k smallest global indices
    # float64 values that round to the same float32 tie, and are split by index.
    v64 = torch.tensor([1.0, 1.0 + 1e-12, 1.0 + 2e-12], dtype=torch.float64)
    assert topk_mask([v64], [torch.tensor([2, 1, 0])], [1])[0].tolist() == [False, False, True]


def test_edge_cases_and_errors():
    v = torch.randn(4, 5)
    assert not topk_mask([v], None, [0])[0].any()
    assert topk_mask([v], None, [20])[0].all()
    assert topk_mask([], None, []) == []
    assert topk_mask([torch.zeros(0, 3)], None, [0])[0].shape == (0, 3)
    ex = torch.zeros(4, 5, dtype=torch.bool)
    ex[0] = True
    m = topk_mask([v], None, [15], exclude=[ex])[0]
    assert torch.equal(m, ~ex)
    with pytest.raises(ValueError, match="exceeds"):
        topk_mask([v], None, [16], exclude=[ex])
    with pytest.raises(ValueError):
        topk_mask([v], None, [-1])
    with pytest.raises(ValueError):
        topk_mask([v], [torch.arange(3)], [1])
    with pytest.raises(ValueError):
        topk_mask([v, v], None, [1])
    with pytest.raises(TypeError):
        topk_mask_keys([torch.arange(5, dtype=torch.int32)], [1])
    assert kth_value([v], [0]) == [None]
    assert kth_value([v], [1])[0] == float(v.max())
    assert kth_value([v], [20], largest=False)[0] == float(v.max())


def test_float_keys_order():
    x = torch.tensor([-np.inf, -3.0, -1e-30, -0.0, 0.0, 1e-30, 2.0, np.inf])
    k = float_keys(x).tolist()
    assert k[3] == k[4]  # -0.0 ties with +0.0
    distinct = k[:4] + k[5:]
    assert all(a < b for a, b in zip(distinct, distinct[1:]))
    assert float_keys(x, largest=False).tolist() == [~a for a in k]
    assert torch.equal(float_keys(x.abs()), float_keys(x, magnitude=True))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300), st.integers(0, 2**31 - 1), st.booleans(), st.integers(1, 40))
def test_topk_mask_keys_with_duplicates(n, seed, largest, spread):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(-spread, spread, (n,), generator=g, dtype=torch.int64)
    keys[0] = torch.iinfo(torch.int64).max if seed % 3 == 0 else torch.iinfo(torch.int64).min
    gidx = torch.randperm(n, generator=g)
    k = int(torch.randint(0, n + 1, (), generator=g))
    m = topk_mask_keys([keys], [k], largest=largest, global_index=[gidx])[0]
    kd = keys.double().numpy()  # order only; +-2^63 stay extreme
    order = np.lexsort((gidx.numpy(), -kd if largest else kd))
    ref = np.zeros(n, dtype=bool)
    ref[order[:k]] = True
    assert m.tolist() == ref.tolist()


def test_topk_mask_keys_on_hash_scores_equals_torch_topk():
    idx = torch.arange(100_000)
    keys = [hash_scores(3, "w", idx), hash_scores(3, "v", idx[:777])]
    masks = topk_mask_keys(keys, [25_000, 700])
    for key, m, k in zip(keys, masks, (25_000, 700)):
        ref = torch.zeros_like(m)
        ref[torch.topk(key, k).indices] = True
        assert torch.equal(m, ref)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_distributed_equals_single_process(nproc):
    proc = run_torchrun(nproc, [str(REPO / "tests" / "dist_scripts" / "topk_check.py")], timeout=300)
    assert f"TOPK_CHECK_OK world={nproc}" in proc.stdout
