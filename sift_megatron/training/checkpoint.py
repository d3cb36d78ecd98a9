"""Checkpoints that never lose work.

Layout under <out_dir>/checkpoints/:
  step_000040/            DeepSpeed files (module incl. mask buffers, ZeRO optimizer partitions, LR
                          scheduler) + client state (step, consumed samples, DST state, RNG states)
                          + model.safetensors (whole model at logical shapes: resharding, export)
                          + optimizer.safetensors (Adam moments, and bf16 runs' fp32 master weights, at
                          logical shapes + the optimizer step: resharding)
                          + sparse_masks.safetensors (spectral analysis) + config.yaml
  latest                  text file naming the newest complete checkpoint
A checkpoint is written under .tmp-step_N/, renamed into place when every rank has finished, and only then
is `latest` replaced (atomic write): a kill at any moment leaves the previous checkpoint and `latest`
intact; a leftover .tmp-* directory is ignored and cleaned up by the next save.

Resume: same TP/PP/DP layout -> everything (exact continuation). A different layout -> the model and masks
are loaded from model.safetensors (layout-independent), step, LR, data position and DST counters from
meta.json, and the Adam state (moments, optimizer step, fp32 master weights) from optimizer.safetensors
through DeepSpeed's safe_set_full_* API (ZeRO 1/2, bf16) or the torch optimizer's state (stage 0). A checkpoint
without optimizer.safetensors (written before any optimizer step) starts the moments fresh and says so.
Before either, check_compatible compares model.safetensors with the model: another model is a one-line error.

Nothing loaded runs code: DeepSpeed's .pt files and the RNG files are read with weights_only=True
(platform.load_tensors, installed into DeepSpeed by platform.setup), the rest is safetensors / JSON / YAML.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from sift_megatron import comm
from sift_megatron.config import atomic_write_text, save_resolved
from sift_megatron.errors import SiftError
from sift_megatron.platform import load_tensors
from sift_megatron.preflight import config_diff

LATEST = "latest"
OPTIMIZER_FILE = "optimizer.safetensors"
_MOMENTS = ("exp_avg", "exp_avg_sq")
_DST_COUNTERS = ("updates", "skipped", "last_step")


def checkpoint_root(trainer) -> Path:
    return Path(trainer.cfg.train.out_dir) / "checkpoints"


def layout(trainer) -> dict:
    """This run's parallel layout as saved in meta.json (a different one on resume means resharding)."""
    from sift_megatron.preflight import layout_of

    return layout_of(trainer.cfg, trainer.dp_size)


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    state = {"torch": torch.get_rng_state(), "tracker": {k: v.clone() for k, v in tracker.get_states().items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(trainer) -> Path:
    """Collective: every rank calls it at the same step."""
    from sift_megatron.sparse.export import MASKS_FILE, gather_full_state, write_masks

    root = checkpoint_root(trainer)
    tag = f"step_{trainer.state.step:06d}"
    tmp = root / f".tmp-{tag}"
    rank = comm.rank()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    comm.barrier()
    client = {"step": trainer.state.step, "consumed_samples": trainer.state.consumed_samples,
              "layout": layout(trainer), "dst": trainer.dst.state_dict() if trainer.dst else None,
              "rng": _rng_state()}
    # RNG differs per rank; DeepSpeed stores client state only once per model-parallel rank, so keep it in
    # a small per-rank file instead.
    torch.save(client["rng"], tmp / f"rng_rank{rank:05d}.pt")
    client.pop("rng")
    trainer.engine.save_checkpoint(str(tmp), tag=tag, client_state=client, save_latest=False)
    if os.environ.get("SIFT_FAULT_KILL_IN_SAVE") == str(trainer.state.step) and rank == 0:
        os.kill(os.getpid(), 9)  # test hook: die like kill -9 after writing, before the rename
    full = gather_full_state(trainer.chunks)
    opt_step, opt_state = _gather_optimizer_state(trainer)
    if full is not None:
        meta = {"vocab_size": trainer.datasets.vocab_size, "padded_vocab_size": trainer.vocab}
        write_masks(full, tmp / tag / "model.safetensors", trainer.state.step, extra=meta)
        masks = {k: v for k, v in full.items() if k.endswith(".mask")}
        masks.update({k[: -len("mask")] + "weight": full[k[: -len("mask")] + "weight"] for k in list(masks)})
        if masks:
            write_masks(masks, tmp / tag / MASKS_FILE, trainer.state.step)
        if opt_state is not None:
            write_masks(opt_state, tmp / tag / OPTIMIZER_FILE, trainer.state.step, extra={"optimizer_step": opt_step})
        save_resolved(trainer.cfg, tmp / tag / "config.yaml")
        dst = client["dst"]  # its counters are layout-independent: a resharded resume continues them
        atomic_write_text(tmp / tag / "meta.json", json.dumps({
            "step": trainer.state.step, "consumed_samples": trainer.state.consumed_samples,
            "layout": layout(trainer), "dst": {k: dst[k] for k in _DST_COUNTERS} if dst else None}))
    comm.barrier()
    final = root / tag
    if rank == 0:
        for f in tmp.glob("rng_rank*.pt"):
            os.replace(f, tmp / tag / f.name)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp / tag, final)
        shutil.rmtree(tmp, ignore_errors=True)
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
    """Restore into a built trainer. Returns a one-line description of what was restored."""
    from safetensors import SafetensorError

    model_file = path / "model.safetensors"
    if not model_file.is_file():
        raise SiftError(f"checkpoint {path} is incomplete or corrupt: missing model.safetensors")
    try:
        meta = json.loads((path / "meta.json").read_text())
        saved_layout = meta["layout"]
    except (OSError, ValueError, KeyError):
        raise SiftError(f"checkpoint {path} is incomplete or corrupt: bad or missing meta.json") from None
    check_compatible(trainer, path)
    if saved_layout == layout(trainer):
        try:
            _, client = trainer.engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True,
                                                       load_optimizer_states=True, load_lr_scheduler_states=True)
        except (OSError, RuntimeError, EOFError, KeyError, ValueError) as e:  # preflight checked the files first
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SiftError(f"checkpoint {path} could not be loaded by DeepSpeed (corrupt or incomplete): "
                            f"{first}") from None
        if client is None:
            raise SiftError(f"checkpoint {path} could not be loaded by DeepSpeed (corrupt or incomplete)")
        trainer.state.step = client["step"]
        trainer.state.consumed_samples = client["consumed_samples"]
        if trainer.dst and client.get("dst"):
            trainer.dst.load_state_dict(client["dst"])
        rng = path / f"rng_rank{comm.rank():05d}.pt"
        if rng.is_file():
            _set_rng_state(load_tensors(rng, map_location="cpu"))
        return f"resumed from {path} at step {trainer.state.step} (model, masks, optimizer, LR, DST, RNG, data)"
    try:
        load_model_weights(trainer.chunks, model_file)
    except SafetensorError as e:
        raise SiftError(f"checkpoint {model_file} is corrupt: {e}") from None
    # The (fresh) optimizer's weights are copies made at engine creation: refresh them from the module.
    _refresh_optimizer_weights(trainer)
    opt_file = path / OPTIMIZER_FILE
    opt_step = None
    if opt_file.is_file():
        try:
            opt_step = load_optimizer_state(trainer, opt_file)
        except SafetensorError as e:
            raise SiftError(f"checkpoint {opt_file} is corrupt: {e}") from None
    trainer.state.step = int(meta.get("step", 0))
    trainer.state.consumed_samples = int(meta.get("consumed_samples", 0))
    for _ in range(trainer.state.step):  # LR schedule continues where the run was
        trainer.scheduler.step()
    if trainer.dst and meta.get("dst"):  # initial masks need no restore: mask init is layout-invariant
        for k in _DST_COUNTERS:
            setattr(trainer.dst.state, k, meta["dst"][k])
    trainer.engine.global_steps = trainer.state.step  # DeepSpeed's own step counter, as its load would set it
    opt = (f"Adam moments (optimizer step {opt_step}) loaded" if opt_step is not None
           else f"the optimizer state (Adam moments) starts fresh (no {OPTIMIZER_FILE})")
    return (f"resharded {path} from layout {_short(saved_layout)} to {_short(layout(trainer))}: model weights, "
            f"masks and {opt}; step {trainer.state.step}, LR schedule, data position and DST continue; RNG restarts "
            f"from train.seed")


def _short(lay: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in lay.items() if v is not None)


def check_compatible(trainer, path: Path) -> None:
    """Every tensor of the model must be in model.safetensors at its logical shape and vice versa, checked on
    every rank and agreed collectively, so that a checkpoint of another model fails with one line naming the
    mismatch (and the differing config keys) instead of a traceback from deep inside DeepSpeed or torch."""
    from safetensors import SafetensorError, safe_open

    from sift_megatron.models.gpt import global_param_names, logical_shape
    from sift_megatron.sparse.layers import sparse_modules

    model_file = path / "model.safetensors"
    expected = {}
    for chunk in trainer.chunks:
        expected.update({name: logical_shape(p) for name, p in global_param_names(chunk)})
        expected.update({name[: -len("weight")] + "mask": logical_shape(m.weight) for name, m in sparse_modules(chunk)})
    try:
        with safe_open(str(model_file), framework="pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise SiftError(f"checkpoint {model_file} is corrupt: {e}") from None
    bad = [k for k, v in expected.items() if saved.get(k) != v]
    problem = None
    if bad:
        k = bad[0]
        problem = (f"tensor {k!r} is {list(saved[k])} in the checkpoint, this model needs {list(expected[k])}"
                   if k in saved else f"the checkpoint has no tensor {k!r}")
    gathered = comm.all_gather_object((problem, sorted(expected)))
    problem = next((p for p, _ in gathered if p), None)
    extra = sorted(set(saved) - {k for _, names in gathered for k in names})
    if problem is None and extra:
        problem = f"the checkpoint has tensors this model lacks (e.g. {extra[0]!r})"
    if problem:
        raise SiftError(f"checkpoint {path} does not fit this model: {problem}{config_diff(trainer.cfg, path)}")


@torch.no_grad()
def _refresh_optimizer_weights(trainer) -> None:
    """Copy module weights into ZeRO's fp32 master partitions (stages 1/2; stage 0 uses the module's)."""
    for chunk in trainer.chunks:
        for p in chunk.parameters():
            hm = getattr(p, "_hp_mapping", None)
            if hm is not None:
                lp = hm.lp_fragment_address
                hm.get_hp_fragment().data.copy_(p.data.reshape(-1).narrow(0, lp.start, lp.numel).float())


@torch.no_grad()
def load_model_weights(chunks: list[torch.nn.Module], model_file: Path) -> None:
    """Load logical (layout-independent) weights and masks into this rank's shards, reading only those."""
    from safetensors import safe_open

    from sift_megatron.models.gpt import global_param_names, read_shard
    from sift_megatron.sparse.layers import sparse_modules

    with safe_open(str(model_file), framework="pt") as f:
        for chunk in chunks:
            for name, p in global_param_names(chunk):  # names and shapes: checked by check_compatible
                p.data.copy_(read_shard(f, name, p).to(p.dtype))
            for name, m in sparse_modules(chunk):
                key = name[: -len("weight")] + "mask"
                m.mask.copy_(read_shard(f, key, m.weight).bool())


def _base_optimizer(trainer) -> torch.optim.Optimizer:
    """The torch AdamW: DeepSpeed's ZeRO / bf16 optimizers wrap it (keyed by flat fp32 partitions), stage 0 is it."""
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def _wrapped(trainer) -> bool:
    return _base_optimizer(trainer) is not trainer.optimizer


def _link_optimizer_state(trainer) -> None:
    """Point each parameter's DeepSpeed fragment at the torch optimizer's current state. ZeRO-1/2 link once,
    after the first step of param group 0 only (DeepSpeed 0.19 steps one group at a time), so parameters of
    the no-decay group lack their moments until linked again."""
    trainer.optimizer._hp_optimizer_states_linked = False
    trainer.optimizer._lazy_init_hp_params_optimizer_state()


def _gather_optimizer_state(trainer) -> tuple[int, dict[str, torch.Tensor] | None]:
    """(optimizer step, {'<name>.exp_avg' / '.exp_avg_sq' / '.fp32': logical tensor} on global rank 0) for a
    layout-independent resume (collective). Nothing before the first optimizer step. ZeRO-3 is not supported."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from sift_megatron.sparse.export import gather_full_state

    base = _base_optimizer(trainer)
    step = max((int(s["step"]) for s in base.state.values() if "step" in s), default=0)
    if step == 0 or trainer.zero_stage == 3:
        return step, None
    wrapped = _wrapped(trainer)
    if wrapped:
        _link_optimizer_state(trainer)
    out: dict[str, torch.Tensor] = {}
    for key in _MOMENTS:
        get = (lambda p, k=key: safe_get_full_optimizer_state(p, k)) if wrapped else (lambda p, k=key: base.state[p][k])
        out.update(gather_full_state(trainer.chunks, get, suffix=f".{key}", masks=False) or {})
    low = any(p.dtype in (torch.bfloat16, torch.float16) for c in trainer.chunks for p in c.parameters())
    if wrapped and low:  # the module holds rounded copies: keep the fp32 master weights too
        out.update(gather_full_state(trainer.chunks, safe_get_full_fp32_param, suffix=".fp32", masks=False) or {})
    return step, out or None


@torch.no_grad()
def load_optimizer_state(trainer, opt_file: Path) -> int:
    """Fill the (fresh, stateless) optimizer with this rank's shards of the saved logical Adam state; returns the
    optimizer step. The torch AdamW state is created as its first step would (step counter included)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from safetensors import safe_open
    from torch.optim.optimizer import _get_scalar_dtype

    from sift_megatron.models.gpt import global_param_names, read_shard

    if trainer.zero_stage == 3:
        raise SiftError("resharding the optimizer state of a zero.stage 3 run is not supported")
    base, wrapped = _base_optimizer(trainer), _wrapped(trainer)
    with safe_open(str(opt_file), framework="pt") as f:
        step = int(f.metadata()["optimizer_step"])
        keys = set(f.keys())
        for group in base.param_groups:
            on_device = group.get("fused") or group.get("capturable")
            for q in group["params"]:
                base.state[q] = {"step": torch.tensor(float(step), dtype=_get_scalar_dtype(),
                                                      device=q.device if on_device else "cpu"),
                                 **{k: torch.zeros_like(q, memory_format=torch.preserve_format) for k in _MOMENTS}}
        if wrapped:
            _link_optimizer_state(trainer)
        for chunk in trainer.chunks:
            for name, p in global_param_names(chunk):
                for k in _MOMENTS:
                    if f"{name}.{k}" not in keys:
                        raise SiftError(f"checkpoint {opt_file} has no tensor {name}.{k}")
                    local = read_shard(f, f"{name}.{k}", p)
                    if wrapped:
                        safe_set_full_optimizer_state(p, local.float(), k)
                    else:
                        base.state[p][k].copy_(local)
                if wrapped and f"{name}.fp32" in keys:
                    safe_set_full_fp32_param(p, read_shard(f, f"{name}.fp32", p).float())
    return step
