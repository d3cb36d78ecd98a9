"""Run under torchrun (gloo): distributed top-k, mask init and DST updates over random shardings must give,
on every rank, exactly the local part of the single-process result on the gathered tensors.

Every rank draws the same logical tensors from the same seeds, keeps the elements its shard owns, runs the
collective version and compares with the single-process version computed on the whole tensor.
Prints TOPK_CHECK_OK world=N on rank 0 when all cases pass.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from sift_megatron.dst.algorithms import rigl_update, rigl_update_tensor, set_update, set_update_tensor
from sift_megatron.sparse.masks import MaskSpec, init_mask_local, slices_global_index
from sift_megatron.sparse.topk import kth_value, topk_mask, topk_mask_keys

POOL = torch.tensor([-2.0, -0.5, -0.0, 0.0, 0.5, 1.0, 3.0])


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(f"rank {dist.get_rank()}: {what}")


def shard(shape: tuple[int, int], g: torch.Generator, rank: int, world: int) -> torch.Tensor:
    """Global flat indices this rank holds, in its local order, under a random sharding of `shape`."""
    rows, cols = shape
    full = torch.arange(rows * cols).view(rows, cols)
    mode = int(torch.randint(4, (), generator=g))
    if mode in (0, 1):  # contiguous blocks along dim 0 / dim 1, random (possibly empty) sizes
        size = shape[mode]
        cuts = torch.sort(torch.randint(0, size + 1, (world - 1,), generator=g)).values.tolist()
        bounds = [0, *cuts, size]
        return full.narrow(mode, bounds[rank], bounds[rank + 1] - bounds[rank]).contiguous()
    if mode == 2:  # every element to a random owner, in a random local order
        owner = torch.randint(world, (rows * cols,), generator=g)
        perm = torch.randperm(rows * cols, generator=g)
        return perm[owner[perm] == rank]
    owner = int(torch.randint(world, (), generator=g))  # one rank holds it all
    return full.reshape(-1) if rank == owner else torch.zeros(0, dtype=torch.int64)


def random_values(shape, g: torch.Generator) -> torch.Tensor:
    if bool(torch.randint(2, (), generator=g)):
        return POOL[torch.randint(len(POOL), shape, generator=g)]
    return torch.randn(shape, generator=g).to(torch.bfloat16).float()  # bf16-rounded: many ties


def topk_cases(group, rank: int, world: int, n_cases: int) -> None:
    for case in range(n_cases):
        g = torch.Generator().manual_seed(1000 + case)
        T = int(torch.randint(1, 4, (), generator=g))
        largest = bool(torch.randint(2, (), generator=g))
        magnitude = bool(torch.randint(2, (), generator=g))
        full_v, full_x, ks, loc_v, loc_x, loc_i = [], [], [], [], [], []
        for _ in range(T):
            big = case % 10 == 0
            shape = (int(torch.randint(1, 300 if big else 30, (), generator=g)),
                     int(torch.randint(1, 200 if big else 30, (), generator=g)))
            v = random_values(shape, g)
            x = torch.rand(shape, generator=g) < 0.25
            n_elig = int((~x).sum())
            k = int(torch.randint(0, n_elig + 1, (), generator=g)) if case % 7 else [0, n_elig][case % 2]
            gi = shard(shape, g, rank, world)
            full_v.append(v), full_x.append(x), ks.append(k)
            loc_v.append(v.reshape(-1)[gi]), loc_x.append(x.reshape(-1)[gi]), loc_i.append(gi)
        ref = topk_mask(full_v, None, ks, largest=largest, exclude=full_x, magnitude=magnitude)
        got = topk_mask(loc_v, loc_i, ks, group=group, largest=largest, exclude=loc_x, magnitude=magnitude)
        for t in range(T):
            check(torch.equal(got[t], ref[t].reshape(-1)[loc_i[t]]), f"topk case {case} tensor {t}")
        kv_ref = kth_value(full_v, ks, largest=largest, exclude=full_x, magnitude=magnitude)
        kv = kth_value(loc_v, ks, group=group, largest=largest, exclude=loc_x, magnitude=magnitude)
        check(kv == kv_ref, f"kth_value case {case}: {kv} != {kv_ref}")
        # int64 keys with many duplicates: ties at the threshold split by global index.
        keys = [torch.randint(-5, 5, v.shape, generator=g) for v in full_v]
        ref = topk_mask_keys(keys, ks, largest=largest, exclude=full_x)
        got = topk_mask_keys([kk.reshape(-1)[gi] for kk, gi in zip(keys, loc_i)], ks, group=group,
                             largest=largest, exclude=loc_x, global_index=loc_i)
        for t in range(T):
            check(torch.equal(got[t], ref[t].reshape(-1)[loc_i[t]]), f"keys case {case} tensor {t}")


def tp_shards(rank: int, world: int) -> list[tuple[str, tuple[int, int], list[tuple[int, int, int]]]]:
    """Megatron-like TP layouts: column-parallel (dim 0), row-parallel (dim 1), fused QKV blocks."""
    rows = 24
    part = rows // world
    return [
        ("fc1", (48, 36), [(0, rank * 48 // world, 48 // world)]),
        ("fc2", (36, 48), [(1, rank * 48 // world, 48 // world)]),
        ("qkv", (3 * rows, 36), [(0, j * rows + rank * part, part) for j in range(3)]),
        ("proj", (24, 24), [(1, rank * part, part)]),
    ]


def mask_and_dst_cases(group, rank: int, world: int) -> None:
    layout = tp_shards(rank, world)
    density = {"fc1": 0.25, "fc2": 0.25, "qkv": 0.5, "proj": 0.1}
    full_specs = [MaskSpec(n, s, density[n], torch.arange(s[0] * s[1]).view(s)) for n, s, _ in layout]
    idx = [slices_global_index(s, sl) for _, s, sl in layout]
    loc_specs = [MaskSpec(n, s, density[n], gi) for (n, s, _), gi in zip(layout, idx)]
    for seed in (0, 1, 2):
        ref = init_mask_local(full_specs, seed=seed)
        got = init_mask_local(loc_specs, seed=seed, group=group)
        for (name, _, _), r, m, gi in zip(layout, ref, got, idx):
            check(torch.equal(m, r.reshape(-1)[gi]), f"init mask {name} seed {seed}")

    masks = init_mask_local(full_specs, seed=7)
    for step, f in ((100, 0.3), (200, 0.5), (300, 1.0), (400, 0.0)):
        g = torch.Generator().manual_seed(step)
        weights = [random_values(m.shape, g) * m for m in masks]  # masked weights are 0
        grads = [random_values(m.shape, g) for m in masks]
        names = [n for n, _, _ in layout]
        ref_r = [rigl_update_tensor(m, w, gr, f) for m, w, gr in zip(masks, weights, grads)]
        ref_s = [set_update_tensor(m, w, f, name=n, seed=7, step=step) for m, w, n in zip(masks, weights, names)]
        local = [[x.reshape(-1)[gi] for x, gi in zip(xs, idx)] for xs in (masks, weights, grads)]
        got_r = rigl_update(local[1], local[0], local[2], f, global_index=idx, group=group)
        got_s = set_update(local[1], local[0], f, seed=7, step=step, names=names, global_index=idx, group=group)
        for kind, refs, gots in (("rigl", ref_r, got_r), ("set", ref_s, got_s)):
            for t, (name, r, gi) in enumerate(zip(names, refs, idx)):
                u = gots[t]
                for field in ("mask", "dropped", "grown"):
                    check(torch.equal(getattr(u, field), getattr(r, field).reshape(-1)[gi]),
                          f"{kind} step {step} {name} {field}")
        masks = [r.mask for r in ref_r]


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    world_group = dist.group.WORLD
    n_cases = int(os.environ.get("TOPK_CHECK_CASES", "60"))
    topk_cases(world_group, rank, world, n_cases)
    mask_and_dst_cases(world_group, rank, world)
    # A subgroup that is not the whole world (like a TP group inside TP x DP): ranks 0 and 1.
    sub = dist.new_group([0, 1])
    if rank < 2:
        topk_cases(sub, rank, 2, 10)
        mask_and_dst_cases(sub, rank, 2)
    dist.barrier()
    if rank == 0:
        print(f"TOPK_CHECK_OK world={world}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except AssertionError as err:
        print(err, file=sys.stderr, flush=True)
        sys.exit(1)
