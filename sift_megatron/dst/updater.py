"""The collective DST driver: moves TP-sharded masks with RigL / SET under DeepSpeed ZeRO.

Per update step (after engine.step()):
1. Dense gradients were captured by the sparse layers' grad hooks during this step's backward (summed over
   micro-batches, already scaled by 1/accumulation); they are averaged over the data-parallel group here,
   so every DP replica scores with the same gradient and computes the same mask.
2. Drop and grow are exact top-k selections per logical tensor over the TP group (sparse.topk), batched
   over all sparse tensors of the rank: the result is the same at any TP degree. The Q, K and V rows of a
   fused QKV weight are three tensors here (sparse.layers.budget_parts): each keeps its own exact nnz.
   Pipeline stages update their own layers independently (no cross-stage communication).
3. Optimizer-state surgery: every tensor of the weight's shape (module weight, the fp32 master of ZeRO 1/2
   or of DeepSpeed's BF16_Optimizer, Adam moments) is multiplied by the new mask. Grown positions were masked
   before, so their value and moments are already exactly 0 (their gradient was always masked to 0): they
   start at 0 with zero state. Under bf16 the drop criterion reads the fp32 master, not the bf16 copy.
4. If any captured gradient is not finite, the update is skipped on every rank and logged.
5. Structured masks (`sparsity.pattern`): block masks run the same selection on each part's tile grid (tile
   score = L2 norm of its masked weights / of its dense gradient, SET = hash of the global tile index:
   `dst.algorithms.block_update`); N:M masks drop over the whole part and regrow within each group of M
   (`nm_update`). Tiles and groups never straddle a TP shard, so both stay layout-free; step 3 is unchanged.

Layout independence: the selection itself is exact and layout-free (same inputs -> same mask at any TP/DP).
Its inputs are not bit-identical across TP degrees, though: row-parallel layers sum partial products in a
different order, so weights and gradients differ in the last bits, and Adam turns that into visible
differences for near-zero gradients (update ~ lr * sign(g)). Elements whose scores lie within that noise of
the drop/grow threshold can therefore flip between TP=1 and TP=2 (measured: 2 of 196,608 after the first
update of a tiny model). Layouts with the same TP degree (e.g. TP=2 vs TP=2 x DP=2) are bit-identical.
With model.precision=fp64 that noise is ~1e-16 and TP=1, TP=2 and TP=2 x DP=2 select identical masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sift_megatron import comm
from sift_megatron.dst.algorithms import block_update, nm_update, rigl_update, set_update
from sift_megatron.dst.schedule import DSTSchedule
from sift_megatron.platform import zero_fragment
from sift_megatron.sparse.layers import budget_parts, join_parts, sparse_modules


@dataclass
class DSTState:
    updates: int = 0
    skipped: int = 0
    last_step: int = -1
    history: list = field(default_factory=list)


class DSTUpdater:
    def __init__(self, chunks: list[torch.nn.Module], engine, schedule: DSTSchedule, algorithm: str,
                 seed: int, pattern: str = "unstructured", block: int = 1) -> None:
        from megatron.core import parallel_state as ps

        from sift_megatron.pattern import parse_pattern

        self.ps = ps
        self.engine = engine
        self.schedule = schedule
        self.algorithm = algorithm
        self.seed = seed
        self.pattern = parse_pattern(pattern, block)
        self.mods = [nm for chunk in chunks for nm in sparse_modules(chunk)]
        self.parts = budget_parts(self.mods)
        self.state = DSTState()
        self.initial = [m.mask.clone() for _, m in self.mods]  # for "fraction of the initial mask still active"

    @property
    def active(self) -> bool:
        return self.algorithm != "static" and bool(self.mods)

    def before_step(self, step: int) -> None:
        """Call before the forward/backward of optimizer step `step` (1-based)."""
        capture = self.active and self.schedule.is_update_step(step)
        for _, m in self.mods:
            m.capture_dense_grad = capture
            m.dense_grad = None

    @torch.no_grad()
    def after_step(self, step: int) -> dict | None:
        """Call after engine.step() of optimizer step `step`; returns log fields when an update ran."""
        if not (self.active and self.schedule.is_update_step(step)):
            return None
        grads = [m.dense_grad if m.dense_grad is not None else torch.zeros_like(m.weight, dtype=torch.float32)
                 for _, m in self.mods]
        for _, m in self.mods:
            m.capture_dense_grad = False
            m.dense_grad = None
        if not self._all_finite(grads):
            self.state.skipped += 1
            return {"dst/skipped": 1, "dst/skipped_total": self.state.skipped}
        dp = self.ps.get_data_parallel_world_size()
        if dp > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            comm.all_reduce(flat, group=self.ps.get_data_parallel_group())
            flat /= dp
            grads = [t.view_as(g) for t, g in zip(flat.split([g.numel() for g in grads]), grads)]
        fraction = self.schedule.drop_fraction(step)
        weights = self._master_weights()
        masks = [m.mask for _, m in self.mods]
        idx = [m.global_index() for _, m in self.mods]
        group = self.ps.get_tensor_model_parallel_group() if self.ps.get_tensor_model_parallel_world_size() > 1 else None
        parts = self.parts  # the top-k runs per part: Q, K and V of a fused QKV weight keep their own nnz
        w, msk, gi = ([p.take(t[p.module]) for p in parts] for t in (weights, masks, idx))
        g = [p.take(grads[p.module]) for p in parts] if self.algorithm == "rigl" else None
        names = [self.mods[p.module][0] for p in parts]  # SET: hash stream of the whole weight, by global index
        pat = self.pattern
        if pat.kind == "block":  # the same selection on the tile grid (sparse/structure.py)
            cols = [self.mods[p.module][1].logical_shape()[1] for p in parts]
            result = block_update(self.algorithm, w, msk, fraction, pat.block, grads=g, names=names, seed=self.seed,
                                  step=step, global_index=gi, cols=cols, group=group)
        elif pat.kind == "nm":  # drop over the tensor, grow back within each N:M group
            result = nm_update(self.algorithm, w, msk, fraction, pat.n, pat.m, grads=g, names=names, seed=self.seed,
                               step=step, global_index=gi, group=group)
        elif self.algorithm == "rigl":
            result = rigl_update(w, msk, g, fraction, global_index=gi, group=group)
        else:
            result = set_update(w, msk, fraction, seed=self.seed, step=step, names=names, global_index=gi,
                                group=group)
        for (_, m), new in zip(self.mods, join_parts(self.mods, parts, result.masks)):
            m.mask.copy_(new.view_as(m.mask))
        dev = masks[0].device
        changed = torch.zeros(len(self.mods), dtype=torch.float64, device=dev).index_add_(
            0, torch.tensor([p.module for p in parts], device=dev),
            torch.stack([g.sum() for g in result.grown]).to(torch.float64))
        if group is not None:  # per-layer counts over the whole logical tensor
            comm.all_reduce(changed, group=group)
        self._surgery()
        self.state.updates += 1
        self.state.last_step = step
        return self._log(step, fraction, changed)

    # ------------------------------------------------------------------------------------------------------
    def _all_finite(self, grads: list[torch.Tensor]) -> bool:
        bad = torch.tensor([0.0 if all(bool(torch.isfinite(g).all()) for g in grads) else 1.0],
                           device=grads[0].device if grads else None)
        comm.all_reduce(bad, op=comm.ReduceOp.MAX)  # every rank skips together (masks stay consistent)
        return bad.item() == 0.0

    def _master_weights(self) -> list[torch.Tensor]:
        """Post-step weights for the drop criterion. fp32/fp64 modules equal their master; a bf16 module is a
        rounded copy whose ties would decide the drop, so its fp32 master is assembled from the ZeRO
        partitions (one all-reduce over DP for all sparse weights, like DeepSpeed's safe_get_full_fp32_param)."""
        ws = [m.weight.detach() for _, m in self.mods]
        if all(w.dtype in (torch.float32, torch.float64) for w in ws):
            return [w.float() for w in ws]
        parts = []
        for w, (_, m) in zip(ws, self.mods):
            buf = torch.zeros(w.numel(), dtype=torch.float32, device=w.device)
            frag = zero_fragment(m.weight, self.engine.optimizer)
            if frag is not None:
                buf.narrow(0, frag.start, frag.numel).copy_(frag.master)
            parts.append(buf)
        flat = torch.cat(parts)
        if self.ps.get_data_parallel_world_size() > 1:
            comm.all_reduce(flat, group=self.ps.get_data_parallel_group())
        return [t.view_as(w) for t, w in zip(flat.split([w.numel() for w in ws]), ws)]

    def _surgery(self) -> None:
        """Multiply every param-shaped tensor of each sparse weight by its mask: the module weight, and the
        master + optimizer state of ZeRO 0, ZeRO 1/2 or DeepSpeed's BF16_Optimizer (bf16 at ZeRO-1)."""
        zopt = self.engine.optimizer
        inner = getattr(zopt, "optimizer", zopt)
        stage0 = self.engine.zero_optimization_stage() == 0
        for _, m in self.mods:
            p, mask = m.weight, m.mask
            p.data.mul_(mask)
            frag = zero_fragment(p, zopt)
            if stage0 and frag is None:  # the torch optimizer owns p itself
                for v in inner.state.get(p, {}).values():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        v.mul_(mask)
                continue
            if frag is None:  # no part of this weight lives in this DP rank's partition
                continue
            frag_mask = mask.reshape(-1).narrow(0, frag.start, frag.numel).to(torch.float32)
            frag.master.mul_(frag_mask)
            for v in frag.states.values():
                v.mul_(frag_mask.to(v.dtype))

    def _log(self, step: int, fraction: float, changed: torch.Tensor) -> dict:
        """Model totals (summed over TP shards and pipeline stages) and per-layer counts of this stage."""
        still = sum(int((m.mask & init).sum()) for (_, m), init in zip(self.mods, self.initial))
        total = sum(int(init.sum()) for init in self.initial)
        nnz = sum(int(m.mask.sum()) for _, m in self.mods)
        tp = self.ps.get_tensor_model_parallel_world_size()
        stats = torch.tensor([float(changed.sum()) / tp, float(still), float(total), float(nnz)])
        if comm.is_initialized():
            # Sum over TP shards and pipeline stages (one DP replica's view; replicas are identical).
            comm.all_reduce(stats, group=self.ps.get_model_parallel_group())
        rec = {"dst/update": self.state.updates, "dst/drop_fraction": fraction,
               "dst/changed": int(stats[0]), "dst/initial_still_active": float(stats[1] / max(stats[2], 1.0)),
               "dst/nnz": int(stats[3])}
        per_layer = {f"dst/changed/{n}": int(c) for (n, _), c in zip(self.mods, changed.tolist())}
        self.state.history.append({"step": step, **rec})
        return {**rec, **per_layer}

    def state_dict(self) -> dict:
        return {"updates": self.state.updates, "skipped": self.state.skipped, "last_step": self.state.last_step,
                "initial": [t.clone() for t in self.initial]}

    def load_state_dict(self, sd: dict) -> None:
        self.state.updates, self.state.skipped, self.state.last_step = sd["updates"], sd["skipped"], sd["last_step"]
        self.initial = [t.clone() for t in sd["initial"]]
