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
from sift_megatron.config import atomic_write_text, save_resolved
from sift_megatron.errors import SiftError, fault_point

LATEST = "latest"
_MOMENTS = ("exp_avg", "exp_avg_sq")
_DST_COUNTERS = ("updates", "skipped", "last_step")


def checkpoint_root(trainer) -> Path:
    return Path(trainer.cfg.train.out_dir) / "checkpoints"


def layout(trainer) -> dict:
    """This run's parallel layout as saved in meta.json (a different one on resume means resharding)."""
    from sift_megatron.preflight import layout_of

    return layout_of(trainer.cfg, trainer.dp_size)


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


def _placement(p: torch.Tensor) -> tuple[tuple[int, ...], list[int]]:
    """(logical shape, offsets of this rank's shard in it) of a parameter under megatron's TP sharding."""
    from megatron.core import parallel_state as ps

    from sift_megatron.models.gpt import logical_shape

    offsets = [0] * p.dim()
    if getattr(p, "tensor_model_parallel", False):
        offsets[p.partition_dim] = ps.get_tensor_model_parallel_rank() * p.shape[p.partition_dim]
    return logical_shape(p), offsets


def model_state(chunks: list[torch.nn.Module]) -> dict[str, shards.Pieces]:
    """model/<global name> -> this rank's shard of every parameter and mask, in place (save and load)."""
    from sift_megatron.models.gpt import global_param_names
    from sift_megatron.sparse.layers import sparse_modules

    state = {}
    for chunk in chunks:
        for name, p in global_param_names(chunk):
            size, offsets = _placement(p)
            state[f"model/{name}"] = shards.Pieces(size, [(offsets, p.data)])
        for name, m in sparse_modules(chunk):
            size, offsets = _placement(m.weight)
            state[f"model/{name[: -len('weight')]}mask"] = shards.Pieces(size, [(offsets, m.mask)])
    return state


def _base_optimizer(trainer) -> torch.optim.Optimizer:
    """The torch AdamW: DeepSpeed's ZeRO / bf16 optimizers wrap it (keyed by flat fp32 partitions), stage 0 is it."""
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def _wrapped(trainer) -> bool:
    return _base_optimizer(trainer) is not trainer.optimizer


def _low_precision(trainer) -> bool:
    return any(p.dtype in (torch.bfloat16, torch.float16) for c in trainer.chunks for p in c.parameters())


def _optimizer_step(trainer) -> int:
    return max((int(s["step"]) for s in _base_optimizer(trainer).state.values() if "step" in s), default=0)


def _link_optimizer_state(trainer) -> None:
    """Point each parameter's DeepSpeed fragment at the torch optimizer's current state. ZeRO-1/2 link once,
    after the first step of param group 0 only (DeepSpeed 0.19 steps one group at a time), so parameters of
    the no-decay group lack their moments until linked again."""
    trainer.optimizer._hp_optimizer_states_linked = False
    trainer.optimizer._lazy_init_hp_params_optimizer_state()


def optimizer_state(trainer) -> dict[str, shards.Pieces]:
    """optim/<name>.<moment> (+ .fp32 masters of bf16 runs) -> the boxes this rank's optimizer holds, in place:
    ZeRO-1/2 and bf16 keep a flat fragment of each parameter per DP rank (shards.flat_fragment), stage 0
    the whole shard. Call after the state exists (a step, or _fresh_optimizer_state)."""
    from sift_megatron.models.gpt import global_param_names

    base, wrapped = _base_optimizer(trainer), _wrapped(trainer)
    if wrapped:
        _link_optimizer_state(trainer)
    keys = list(_MOMENTS) + (["fp32"] if wrapped and _low_precision(trainer) else [])
    state = {}
    for chunk in trainer.chunks:
        for name, p in global_param_names(chunk):
            size, offsets = _placement(p)
            hm = getattr(p, "_hp_mapping", None) if wrapped else None
            for k in keys:
                if not wrapped:
                    pieces = [(offsets, base.state[p][k])]
                elif hm is None:  # no fragment of this parameter in this DP rank's partition
                    pieces = []
                else:
                    flat = hm.get_hp_fragment(None if k == "fp32" else k)
                    pieces = shards.flat_fragment(size, p.shape, offsets, hm.lp_fragment_address.start, flat)
                state[f"optim/{name}.{k}"] = shards.Pieces(size, pieces)
    return state


@torch.no_grad()
def _fresh_optimizer_state(trainer, step: int) -> None:
    """The torch AdamW state as its first step creates it (zeros, step counter), to be filled by a load."""
    from torch.optim.optimizer import _get_scalar_dtype

    base = _base_optimizer(trainer)
    for group in base.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for q in group["params"]:
            base.state[q] = {"step": torch.tensor(float(step), dtype=_get_scalar_dtype(),
                                                  device=q.device if on_device else "cpu"),
                             **{k: torch.zeros_like(q, memory_format=torch.preserve_format) for k in _MOMENTS}}


@torch.no_grad()
def _refresh_optimizer_weights(trainer) -> None:
    """Copy module weights into ZeRO's fp32 master partitions (stages 1/2; stage 0 uses the module's)."""
    for chunk in trainer.chunks:
        for p in chunk.parameters():
            hm = getattr(p, "_hp_mapping", None)
            if hm is not None:
                lp = hm.lp_fragment_address
                hm.get_hp_fragment().data.copy_(p.data.reshape(-1).narrow(0, lp.start, lp.numel).float())


def _check_supported(trainer) -> None:
    if trainer.zero_stage == 3:  # preflight.check_train rejects it first
        raise SiftError("checkpoints of zero.stage 3 runs are not supported; allowed: zero.stage 0, 1 or 2")


def save_checkpoint(trainer) -> Path:
    """Collective: every rank calls it at the same step and writes its own shards."""
    _check_supported(trainer)
    root = checkpoint_root(trainer)
    tag = f"step_{trainer.state.step:06d}"
    tmp = root / f".tmp-{tag}"
    rank = comm.rank()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    comm.barrier()
    opt_step = _optimizer_step(trainer)
    state = model_state(trainer.chunks) | _rng_state()
    if opt_step:  # before the first optimizer step there are no moments to save
        state |= optimizer_state(trainer)
    shards.save(state, tmp, threads=trainer.cfg.train.checkpoint_threads)
    fault_point("checkpoint_data")
    if os.environ.get("SIFT_FAULT_KILL_IN_SAVE") == str(trainer.state.step) and rank == 0:
        os.kill(os.getpid(), 9)  # test hook: die like kill -9 after writing, before the rename
    if rank == 0:
        save_resolved(trainer.cfg, tmp / "config.yaml")
        dst = trainer.dst.state_dict() if trainer.dst else None  # counters are layout-independent
        atomic_write_text(tmp / "meta.json", json.dumps({
            "step": trainer.state.step, "consumed_samples": trainer.state.consumed_samples,
            "layout": layout(trainer), "optimizer_step": opt_step,
            "dst": {k: dst[k] for k in _DST_COUNTERS} if dst else None,
            "vocab_size": trainer.datasets.vocab_size, "padded_vocab_size": trainer.vocab}))
    comm.barrier()
    final = root / tag
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / LATEST, tag + "\n")
        _prune(root, trainer.cfg.train.keep_checkpoints, protect=tag)
    comm.barrier()
    return final


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


def resolve(trainer, spec: str) -> Path | None:
    """`auto` -> <out_dir>/checkpoints/latest (None when there is none yet); else a checkpoint directory or a
    checkpoints root containing `latest` (preflight.resolve_resume)."""
    import dataclasses

    from sift_megatron.preflight import resolve_resume

    cfg = trainer.cfg
    return resolve_resume(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=spec)))


def load_checkpoint(trainer, path: Path) -> str:
    """Restore into a built trainer (preflight.check_checkpoint has checked the files and the tensor shapes).
    Returns a one-line description of what was restored."""
    _check_supported(trainer)
    try:
        meta = json.loads((path / "meta.json").read_text())
        saved_layout, step = meta["layout"], int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError):
        raise SiftError(f"checkpoint {path} is incomplete or corrupt: bad or missing meta.json") from None
    same = saved_layout == layout(trainer)
    saved = shards.read_index(path)["tensors"]
    opt_step = int(meta.get("optimizer_step") or 0)
    state = model_state(trainer.chunks)
    if opt_step:
        _fresh_optimizer_state(trainer, opt_step)
        state |= optimizer_state(trainer)
        missing = sorted(k for k in state if k not in saved)
        if missing:
            raise SiftError(f"checkpoint {path} is incomplete or corrupt: no tensor {missing[0]!r}")
    rng = _rng_state() if same else {}
    shards.load(state | rng, path)
    if not (_wrapped(trainer) and _low_precision(trainer)):
        _refresh_optimizer_weights(trainer)  # fp32 ZeRO masters are copies of the module's weights
    if rng:
        _set_rng_state(rng)
    trainer.state.step = step
    trainer.state.consumed_samples = int(meta.get("consumed_samples", 0))
    for _ in range(step):  # the LR schedule continues where the run was
        trainer.scheduler.step()
    if trainer.dst and meta.get("dst"):  # initial masks need no restore: mask init is layout-invariant
        for k in _DST_COUNTERS:
            setattr(trainer.dst.state, k, meta["dst"][k])
    trainer.engine.global_steps = step  # DeepSpeed's own step counter, as its load would set it
    opt = (f"Adam moments (optimizer step {opt_step}) loaded" if opt_step
           else "the optimizer state (Adam moments) starts fresh (none saved: before the first optimizer step)")
    if same:
        return (f"resumed from {path} at step {step} (model, masks, {opt}, LR, DST, RNG, data)")
    return (f"resharded {path} from layout {_short(saved_layout)} to {_short(layout(trainer))}: model weights, "
            f"masks and {opt}; step {step}, LR schedule, data position and DST continue; RNG restarts from train.seed")


def _short(lay: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in lay.items() if v is not None)
