"""Checkpoints that never lose work, written shard by shard: every rank saves only what it holds.

Layout under <out_dir>/checkpoints/:
  step_000040/            __<rank>_0.distcp  this rank's boxes of the logical tensors (torch.distributed.checkpoint)
                          dcp.json     their index, as JSON (sift_megatron/shards.py: DCP without its pickle)
                          meta.json    step, consumed samples, layout, optimizer step, DST counters, vocab sizes
                          config.yaml  the resolved config
  latest                  text file naming the newest complete checkpoint
Keys, all at logical (TP=1, PP=1) shapes under global names, so that any layout reads them:
  model/<name>            every parameter in its training dtype; model/<layer>.mask the bool masks
  optim/<name>.exp_avg, .exp_avg_sq   Adam moments, saved from each DP rank's ZeRO fragment (or the whole shard)
  optim/<name>.fp32       fp32 master weights (bf16 runs)
  rng/<rank>/...          each rank's RNG states (restored when the layout is the same)
DCP writes a box held by several ranks (DP replicas) once, balancing the bytes over the ranks; nothing is
gathered. Loading at any TP/PP/VP/DP/ZeRO layout asks for this rank's boxes of the same logical tensors and
DCP reads them from whichever saved boxes overlap: resharding is the load, and it is exact.

A checkpoint is written under .tmp-step_N/, renamed into place when every rank has finished, and only then
is `latest` replaced (atomic write): a kill at any moment leaves the previous checkpoint and `latest` intact;
a leftover .tmp-* directory is ignored and cleaned up by the next save. Nothing loaded runs code: the index
is JSON and DCP reads the data files with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from sift_megatron import comm, shards
from sift_megatron.config import Config, atomic_write_text, save_resolved
from sift_megatron.errors import SiftError, fault_point
from sift_megatron.platform import zero_fragment
from sift_megatron.sharding import global_param_names, placement

LATEST = "latest"
_MOMENTS = ("exp_avg", "exp_avg_sq")
_DST_COUNTERS = ("updates", "skipped", "last_step")


def _rng_state() -> dict[str, torch.Tensor]:
    """This rank's RNG states, as tensors keyed rng/<rank>/..."""
    from megatron.core import tensor_parallel

    key = f"rng/{comm.rank()}"
    state = {f"{key}/torch": torch.get_rng_state()}
    state |= {f"{key}/tracker/{k}": v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()}
    if torch.cuda.is_available():
        state[f"{key}/cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    from megatron.core import tensor_parallel

    key = f"rng/{comm.rank()}"
    torch.set_rng_state(state[f"{key}/torch"])
    tracker = {k[len(f"{key}/tracker/"):]: v for k, v in state.items() if k.startswith(f"{key}/tracker/")}
    tensor_parallel.get_cuda_rng_tracker().set_states(tracker)
    if f"{key}/cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state[f"{key}/cuda"])


def model_state(chunks: list[torch.nn.Module]) -> dict[str, shards.Pieces]:
    """model/<global name> -> this rank's shard of every parameter and mask, in place (save and load)."""
    from sift_megatron.sparse.layers import sparse_modules

    state = {}
    for chunk in chunks:
        for name, p in global_param_names(chunk):
            size, offsets = placement(p)
            state[f"model/{name}"] = shards.Pieces(size, [(offsets, p.data)])
        for name, m in sparse_modules(chunk):
            size, offsets = placement(m.weight)
            state[f"model/{name[: -len('weight')]}mask"] = shards.Pieces(size, [(offsets, m.mask)])
    return state


def _prune(root: Path, keep: int, protect: str) -> None:
    """Keep the `keep` highest steps, and never the checkpoint just written (`protect`) or the one `latest`
    names, even when older runs left higher steps in the directory."""
    keep_tags = {protect}
    if (root / LATEST).is_file():
        keep_tags.add((root / LATEST).read_text().strip())
    tags = sorted((p for p in root.glob("step_*") if p.is_dir()), key=lambda p: p.name)
    others = [p for p in tags if p.name not in keep_tags]
    for p in others[: max(0, len(tags) - keep)]:  # lowest steps first
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _short(lay: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in lay.items() if v is not None)


class CheckpointManager:
    """Saves and restores the explicit parts of a run, and decides when to save (as torchtitan's): the model
    chunks (weights, masks), the optimizer (DeepSpeed's ZeRO / bf16 wrapper or the torch AdamW) with its LR
    scheduler, the DST updater's counters, the train state (step, consumed samples) and this rank's RNG.
    Every method is collective: all ranks call it at the same step."""

    def __init__(self, cfg: Config, *, chunks: list[torch.nn.Module], optimizer, scheduler, engine, state, dst,
                 layout: dict, vocab_size: int, padded_vocab_size: int) -> None:
        self.cfg, self.chunks, self.optimizer, self.scheduler = cfg, chunks, optimizer, scheduler
        self.engine, self.state, self.dst, self.layout = engine, state, dst, layout
        self.vocab = {"vocab_size": vocab_size, "padded_vocab_size": padded_vocab_size}
        self.root = Path(cfg.train.out_dir) / "checkpoints"
        self.base = getattr(optimizer, "optimizer", optimizer)  # the torch AdamW (DeepSpeed's wrap it)
        self.wrapped = self.base is not optimizer  # ZeRO-1/2 or bf16: flat fp32 partitions per DP rank
        self.low_precision = any(p.dtype in (torch.bfloat16, torch.float16) for c in chunks for p in c.parameters())

    def _check_supported(self) -> None:
        if self.layout["zero"] == 3:  # preflight.check_train rejects it first
            raise SiftError("checkpoints of zero.stage 3 runs are not supported; allowed: zero.stage 0, 1 or 2")

    def due(self, step: int) -> bool:
        """train.save_interval steps (the last step saves at the end of fit)."""
        t = self.cfg.train
        return bool(t.save and t.save_interval and step % t.save_interval == 0 and step < t.steps)

    # -------------------------------------------------------------------------------------------- optimizer
    def _optimizer_step(self) -> int:
        return max((int(s["step"]) for s in self.base.state.values() if "step" in s), default=0)

    def _optimizer_state(self) -> dict[str, shards.Pieces]:
        """optim/<name>.<moment> (+ .fp32 masters of bf16 runs) -> the boxes this rank's optimizer holds, in
        place: ZeRO-1/2 and bf16 keep a flat fragment of each parameter per DP rank (shards.flat_fragment),
        stage 0 the whole shard. Call when the state exists (after a step, or _fresh_optimizer_state)."""
        keys = list(_MOMENTS) + (["fp32"] if self.wrapped and self.low_precision else [])
        state = {}
        for chunk in self.chunks:
            for name, p in global_param_names(chunk):
                size, offsets = placement(p)
                frag = zero_fragment(p, self.optimizer) if self.wrapped else None
                for k in keys:
                    if not self.wrapped:
                        pieces = [(offsets, self.base.state[p][k])]
                    elif frag is None:  # no fragment of this parameter in this DP rank's partition
                        pieces = []
                    else:
                        flat = frag.master if k == "fp32" else frag.states[k]
                        pieces = shards.flat_fragment(size, p.shape, offsets, frag.start, flat)
                    state[f"optim/{name}.{k}"] = shards.Pieces(size, pieces)
        return state

    @torch.no_grad()
    def _fresh_optimizer_state(self, step: int) -> None:
        """The torch AdamW state as its first step creates it (zeros, step counter), to be filled by a load."""
        from torch.optim.optimizer import _get_scalar_dtype

        for group in self.base.param_groups:
            on_device = group.get("fused") or group.get("capturable")
            for q in group["params"]:
                self.base.state[q] = {"step": torch.tensor(float(step), dtype=_get_scalar_dtype(),
                                                           device=q.device if on_device else "cpu"),
                                      **{k: torch.zeros_like(q, memory_format=torch.preserve_format) for k in _MOMENTS}}

    @torch.no_grad()
    def _refresh_master_weights(self) -> None:
        """Copy module weights into ZeRO's fp32 master partitions (stages 1/2; stage 0 uses the module's)."""
        for chunk in self.chunks:
            for p in chunk.parameters():
                frag = zero_fragment(p, self.optimizer)
                if frag is not None:
                    frag.master.copy_(p.data.reshape(-1).narrow(0, frag.start, frag.numel).float())

    # ------------------------------------------------------------------------------------------- save, load
    def save(self) -> Path:
        """Every rank writes its own shards; the checkpoint appears (rename) only when all have finished."""
        self._check_supported()
        st = self.state
        tag = f"step_{st.step:06d}"
        tmp, rank = self.root / f".tmp-{tag}", comm.rank()
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        comm.barrier()
        opt_step = self._optimizer_step()
        state = model_state(self.chunks) | _rng_state()
        if opt_step:  # before the first optimizer step there are no moments to save
            state |= self._optimizer_state()
        shards.save(state, tmp, threads=self.cfg.train.checkpoint_threads)
        fault_point("checkpoint_data", st.step)  # after writing the shards, before the rename
        if rank == 0:
            save_resolved(self.cfg, tmp / "config.yaml")
            dst = self.dst.state_dict() if self.dst else None  # counters are layout-independent
            atomic_write_text(tmp / "meta.json", json.dumps({
                "step": st.step, "consumed_samples": st.consumed_samples, "layout": self.layout,
                "optimizer_step": opt_step, "dst": {k: dst[k] for k in _DST_COUNTERS} if dst else None,
                **self.vocab}))
        comm.barrier()
        final = self.root / tag
        if rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(self.root / LATEST, tag + "\n")
            _prune(self.root, self.cfg.train.keep_checkpoints, protect=tag)
        comm.barrier()
        return final

    def load(self, checkpoint: Path | shards.ShardedCheckpoint) -> str:
        """Restore every part from a checkpoint directory, or one preflight.check_checkpoint opened (it checked the
        files and the tensor shapes); returns a one-line description of what was restored."""
        self._check_supported()
        path = getattr(checkpoint, "path", checkpoint)
        try:
            meta = json.loads((path / "meta.json").read_text())
            saved_layout, step = meta["layout"], int(meta["step"])
        except (OSError, ValueError, KeyError, TypeError):
            raise SiftError(f"checkpoint {path} is incomplete or corrupt: bad or missing meta.json") from None
        same = saved_layout == self.layout
        ck = checkpoint if isinstance(checkpoint, shards.ShardedCheckpoint) else shards.ShardedCheckpoint(path)
        saved = ck.tensors
        opt_step = int(meta.get("optimizer_step") or 0)
        state = model_state(self.chunks)
        if opt_step:
            self._fresh_optimizer_state(opt_step)
            state |= self._optimizer_state()
            missing = sorted(k for k in state if k not in saved)
            if missing:
                raise SiftError(f"checkpoint {path} is incomplete or corrupt: no tensor {missing[0]!r}")
        rng = _rng_state() if same else {}
        ck.load(state | rng)
        if not (self.wrapped and self.low_precision):
            self._refresh_master_weights()  # fp32 ZeRO masters are copies of the module's weights
        if rng:
            _set_rng_state(rng)
        self.state.step = step
        self.state.consumed_samples = int(meta.get("consumed_samples", 0))
        for _ in range(step):  # the LR schedule continues where the run was
            self.scheduler.step()
        if self.dst and meta.get("dst"):  # initial masks need no restore: mask init is layout-invariant
            for k in _DST_COUNTERS:
                setattr(self.dst.state, k, meta["dst"][k])
        self.engine.global_steps = step  # DeepSpeed's own step counter, as its load would set it
        opt = (f"Adam moments (optimizer step {opt_step}) loaded" if opt_step
               else "the optimizer state (Adam moments) starts fresh (none saved: before the first optimizer step)")
        if same:
            return f"resumed from {path} at step {step} (model, masks, {opt}, LR, DST, RNG, data)"
        return (f"resharded {path} from layout {_short(saved_layout)} to {_short(self.layout)}: model weights, "
                f"masks and {opt}; step {step}, LR schedule, data position and DST continue; RNG restarts from "
                "train.seed")
