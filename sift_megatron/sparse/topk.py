"""Exact top-k over logical tensors that are sharded across the ranks of a process group.

Each rank passes its local elements and their global flat indices; the result is, on every rank, the local
part of the one set of k elements that `torch.topk` would pick on the gathered tensor with ties broken by
the smaller global index. No rank gathers a tensor: a radix select on an order-preserving integer key
finds where the k-th key lies with one all-reduce of a [T, 2^w] digit histogram per round, all T tensors
of the call batched together, then every rank keeps its local elements above that point.

Order: by value as float32 (float64 inputs are rounded to float32, so values equal in float32 tie and are
split by index; bf16/fp16 convert exactly), then by global index, smaller first. -0.0 equals +0.0.
Excluded elements are never selected. NaN is not supported (the DST driver skips non-finite updates).

Rounds: float keys are 32 bits, read as digits of 12, 10 and 10 bits; when several elements share the
k-th value and only some of them fit, those are split by global index in at most 3 more rounds (indices
< 2^32). int64 keys (`topk_mask_keys`) take digits 12, 10, 10, 8, 8, 8, 8. A tensor is finished as soon as
its threshold bucket is taken whole and the loop stops when all are, so a call usually needs 2 or 3
rounds. Every decision is made from all-reduced counts, so all ranks run the same collectives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sift_megatron import comm

__all__ = ["float_keys", "kth_value", "topk_mask", "topk_mask_keys"]

_INDEX_LIMIT = 1 << 32
_DIGITS = {32: (12, 10, 10), 64: (12, 10, 10, 8, 8, 8, 8)}

Tensors = Sequence[torch.Tensor]
OptTensors = Sequence[torch.Tensor | None]


def float_keys(values: torch.Tensor, largest: bool = True, magnitude: bool = False) -> torch.Tensor:
    """Flat int32 keys whose signed order is the rank order of `values` (of |values| if magnitude)."""
    x = values.detach().reshape(-1)
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    if magnitude:
        m = x.abs().view(torch.int32)  # non-negative floats order like their bits; abs(-0.0) is +0.0
    else:
        b = x.view(torch.int32)
        sign = b >> 31  # 0 or -1
        m = b & 0x7FFFFFFF
        m ^= sign
        m -= sign  # negative floats -> -(magnitude bits): order reversed, -0.0 -> 0 like +0.0
    if not largest:
        m.bitwise_not_()
    return m


def _key_to_float(key: int) -> float:
    """Inverse of float_keys(largest=True) for one key."""
    return torch.tensor([abs(key)], dtype=torch.int32).view(torch.float32).item() * (-1.0 if key < 0 else 1.0)


def _histogram(d: torch.Tensor, nbins: int) -> torch.Tensor:
    """Counts of the values 0..nbins-1 in d (int64)."""
    if d.device.type == "cuda":
        return torch.bincount(d, minlength=nbins)
    # On CPU bincount also scans for min and max; an index_add_ of a broadcast 1 is twice as fast.
    hist = torch.zeros(nbins, dtype=torch.int64, device=d.device)
    return hist.index_add_(0, d, torch.ones(1, dtype=torch.int64, device=d.device).expand(d.numel()))


def _radix_threshold(keys: Tensors, exclude: OptTensors, k: Sequence[int], nbits: int, group,
                     full: bool = False) -> list[tuple[str, int, int]]:
    """For each tensor of flat signed keys, where its k largest non-excluded keys end.

    Per tensor (mode, threshold, remaining): "none" (k == 0); "ge": the keys >= threshold are exactly k;
    "tie": all keys > threshold plus `remaining` of those == threshold. full=True resolves every tensor
    to its exact k-th key (for kth_value) instead of stopping at a bucket that is taken whole.
    """
    T = len(keys)
    device = keys[0].device if T else torch.device("cpu")
    need = [int(x) for x in k]
    plan: list[tuple[str, int, int] | None] = [("none", 0, 0) if n == 0 else None for n in need]
    active = [t for t in range(T) if plan[t] is None]
    if not active:  # k is the same on every rank, so all ranks skip the collectives together
        return plan  # type: ignore[return-value]
    cands = list(keys)
    prefix = [0] * T
    shift = nbits
    widths = _DIGITS[nbits]
    # Round 0 reads whole tensors: one scratch buffer for all of them instead of a fresh full-size digit
    # tensor each (on CPU every fresh large tensor costs a page fault per 4 KiB, more than the op itself).
    size = max(keys[t].numel() for t in active)
    scratch = torch.empty(size, dtype=keys[active[0]].dtype, device=device)
    scratch_b = torch.empty(size, dtype=torch.bool, device=device)

    def top_digits(t: int, w: int) -> torch.Tensor:
        d = torch.bitwise_right_shift(keys[t], nbits - w, out=scratch[:keys[t].numel()])
        d += 1 << (w - 1)  # signed top digit -> unsigned, so digit order == key order
        if exclude[t] is not None:
            d.masked_fill_(exclude[t], 1 << w)  # an extra bin that is dropped
        return d

    for r, w in enumerate(widths):
        shift -= w
        nb = 1 << w
        hist = torch.zeros(T, nb, dtype=torch.int64, device=device)
        digits: dict[int, torch.Tensor] = {}
        for t in active:
            if r == 0:
                d = top_digits(t, w)
            else:
                d = cands[t] >> shift
                d &= nb - 1
                digits[t] = d
            hist[t] = _histogram(d, nb + 1)[:nb]
        if group is not None:
            comm.all_reduce(hist, op=comm.ReduceOp.SUM, group=group)
        h = hist.cpu()
        if r == 0:
            total = h.sum(1).tolist()
            for t in active:
                if need[t] > total[t]:
                    raise ValueError(f"top-k of tensor {t}: k={need[t]} exceeds its {total[t]} eligible elements")
        ge = h.flip(1).cumsum(1).flip(1)  # ge[t, d] = count of digits >= d (non-increasing in d)
        for t in list(active):
            digit = int((ge[t] >= need[t]).sum()) - 1
            bucket = int(h[t, digit])
            need[t] -= int(ge[t, digit]) - bucket
            prefix[t] = (prefix[t] << w) | digit
            if (bucket == need[t] and not full) or r == len(widths) - 1:
                threshold = (prefix[t] << shift) - (1 << (nbits - 1))
                plan[t] = ("ge", threshold, 0) if bucket == need[t] else ("tie", threshold, need[t])
                active.remove(t)
            elif r == 0:
                d = top_digits(t, w)  # recomputed: the scratch buffer was reused by the other tensors
                cands[t] = keys[t][torch.eq(d, digit, out=scratch_b[:d.numel()])]
            else:
                cands[t] = cands[t][digits[t] == digit]
        if not active:
            break
    return plan  # type: ignore[return-value]


def _select(keys: Tensors, exclude: OptTensors, k: Sequence[int], nbits: int, group,
            global_index: Tensors | None) -> list[torch.Tensor]:
    """Flat local bool masks of the k largest (key, -global index) of each tensor."""
    plan = _radix_threshold(keys, exclude, k, nbits, group)
    out: list[torch.Tensor] = []
    ties: list[int] = []
    for t, (mode, thr, _) in enumerate(plan):
        key = keys[t]
        if mode == "none":
            out.append(torch.zeros_like(key, dtype=torch.bool))
            continue
        sel = key >= thr if mode == "ge" else key > thr
        if exclude[t] is not None:
            torch.gt(sel, exclude[t], out=sel)  # sel & ~exclude in one pass
        out.append(sel)
        if mode == "tie":
            ties.append(t)
    if not ties:
        return out
    # Split the keys tied at a threshold by global index, smaller first: one more radix select on the
    # unique key 2^31 - 1 - index.
    tie_pos, tie_keys = [], []
    for t in ties:
        eq = keys[t] == plan[t][1]
        if exclude[t] is not None:
            torch.gt(eq, exclude[t], out=eq)
        pos = eq.nonzero().reshape(-1)
        if global_index is not None:
            idx = global_index[t].reshape(-1)[pos].to(torch.int64)
        elif group is None:  # the local tensor is the whole logical tensor
            idx = pos
        else:
            raise ValueError("keys tied at the top-k threshold need global_index to break the tie")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= _INDEX_LIMIT):
            raise ValueError("global indices must lie in [0, 2^32)")
        tie_pos.append(pos)
        tie_keys.append((_INDEX_LIMIT // 2 - 1) - idx)
    sub = _radix_threshold(tie_keys, [None] * len(ties), [plan[t][2] for t in ties], 32, group)
    for t, pos, tk, (mode, thr, _) in zip(ties, tie_pos, tie_keys, sub):
        if mode == "tie":
            raise ValueError(f"top-k of tensor {t}: duplicate global indices")
        if mode == "ge":
            out[t][pos[tk >= thr]] = True
    return out


def _flat_exclude(exclude: OptTensors | None, n: int) -> list[torch.Tensor | None]:
    return [None] * n if exclude is None else [None if x is None else x.reshape(-1) for x in exclude]


def _check(values: Tensors, global_index: Tensors | None, k: Sequence[int], exclude: OptTensors | None) -> None:
    n = len(values)
    if len(k) != n or (global_index is not None and len(global_index) != n) or (
            exclude is not None and len(exclude) != n):
        raise ValueError("values, global_index, k and exclude need one entry per tensor")
    for t, (v, kk) in enumerate(zip(values, k)):
        if kk < 0:
            raise ValueError(f"k must be >= 0, got {kk} for tensor {t}")
        if global_index is not None and global_index[t].numel() != v.numel():
            raise ValueError(f"global_index[{t}] has {global_index[t].numel()} entries for {v.numel()} values")
        if exclude is not None and exclude[t] is not None and exclude[t].shape != v.shape:
            raise ValueError(f"exclude[{t}] has shape {tuple(exclude[t].shape)}, values {tuple(v.shape)}")


def topk_mask(values: Tensors, global_index: Tensors | None, k: Sequence[int], group=None,
              largest: bool = True, exclude: OptTensors | None = None,
              magnitude: bool = False) -> list[torch.Tensor]:
    """Local bool masks (shaped like values[t]) of the k[t] largest (smallest) elements of each logical
    tensor t spread over `group`, ranked by value (|value| if magnitude) then smaller global index;
    exclude[t] elements are never selected (k[t] may not exceed the non-excluded count).

    group=None: one process; values[t] is the whole tensor and global_index may be None (= flat position).
    Otherwise every rank of `group` passes the same tensors in the same order with the same k (a rank may
    hold none of a tensor's elements), and global_index[t] holds its elements' logical flat indices.
    """
    _check(values, global_index, k, exclude)
    keys = [float_keys(v, largest, magnitude) for v in values]
    flat = _select(keys, _flat_exclude(exclude, len(values)), k, 32, group, global_index)
    return [m.view(v.shape) for m, v in zip(flat, values)]


def topk_mask_keys(keys: Tensors, k: Sequence[int], group=None, largest: bool = True,
                   exclude: OptTensors | None = None,
                   global_index: Tensors | None = None) -> list[torch.Tensor]:
    """topk_mask on int64 keys, e.g. `masks.hash_scores`, which are unique per tensor so no tie-break is
    needed; with repeated keys pass global_index so ties at the threshold can be split by index."""
    _check(keys, global_index, k, exclude)
    for key in keys:
        if key.dtype != torch.int64:
            raise TypeError(f"keys must be int64, got {key.dtype}")
    flat_keys = [key.reshape(-1) if largest else ~key.reshape(-1) for key in keys]
    flat = _select(flat_keys, _flat_exclude(exclude, len(keys)), k, 64, group, global_index)
    return [m.view(v.shape) for m, v in zip(flat, keys)]


def kth_value(values: Tensors, k: Sequence[int], group=None, largest: bool = True,
              exclude: OptTensors | None = None, magnitude: bool = False) -> list[float | None]:
    """The k-th largest (smallest) value, as float32, of each logical tensor over `group`; None where
    k == 0. For thresholds to log or to compare against; topk_mask is what selects."""
    _check(values, None, k, exclude)
    keys = [float_keys(v, largest, magnitude) for v in values]
    plan = _radix_threshold(keys, _flat_exclude(exclude, len(values)), k, 32, group, full=True)
    return [None if mode == "none" else _key_to_float(thr if largest else ~thr) for mode, thr, _ in plan]
