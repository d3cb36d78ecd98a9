"""DeepSpeed engine around megatron-core model chunks: ZeRO owns optimizer state, megatron's parallel_state
is DeepSpeed's mpu so gradients are reduced over the data-parallel group only.

Pipeline parallelism: megatron-core's schedules (1F1B, interleaved) drive the engine. Measured on CPU/gloo
(../shared/docs/deepspeed-on-cpu.md §6 and our tests): schedule + ZeRO-1 with
`managed_gradient_accumulation: false` reproduces PP=1 exactly; ZeRO-2 fails inside DeepSpeed at step()
and ZeRO-0 refuses torch-style backward. DeepSpeed's own PipelineEngine is ZeRO-1-only as well and would
need the model rewritten as a PipelineModule, so megatron's schedules win. With PP=1 we use DeepSpeed's
managed accumulation (engine.backward / engine.step per micro-batch), which supports ZeRO 0-3.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math

import torch

from sift_megatron.config import BatchSchedule, Config, deepspeed_overrides, effective_zero_stage, lr_units
from sift_megatron.errors import SiftError
from sift_megatron.layout import check_layout  # noqa: F401 - where tests and tools look for it


class MpuAdapter:
    """DeepSpeed's "model parallel" view of megatron's parallel_state.

    DeepSpeed counts params that are not TP-sharded only on model-parallel rank 0 when it computes the
    global grad norm, then sums over the model-parallel group. The rank must therefore be the TP rank
    (every pipeline stage counts its own replicated params), while the group spans TP x PP so all stages
    contribute to one norm. Checkpoint file names use the TP x PP rank so pipeline stages do not collide.
    """

    def __init__(self) -> None:
        from megatron.core import parallel_state as ps

        self.ps = ps

    def get_model_parallel_rank(self) -> int:
        from sift_megatron import comm

        return comm.rank(group=self.ps.get_model_parallel_group())

    def get_model_parallel_group(self):
        return self.ps.get_model_parallel_group()

    def get_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size() * self.ps.get_pipeline_model_parallel_world_size()

    def get_tensor_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.ps.get_pipeline_model_parallel_world_size()


class ChunkList(torch.nn.Module):
    """All virtual-pipeline chunks of a rank as one module, so one engine owns every parameter; forward
    dispatches to a chunk so the schedule still goes through the engine (DeepSpeed's forward hooks)."""

    def __init__(self, chunks: list[torch.nn.Module]) -> None:
        super().__init__()
        self.chunks = torch.nn.ModuleList(chunks)

    def forward(self, chunk: int, *args, **kwargs):
        return self.chunks[chunk](*args, **kwargs)


def lr_lambda(cfg: Config):
    """Linear warm-up then cosine/linear decay to optimizer.min_lr, as a multiplier of optimizer.lr. Lengths are in
    samples (`config.lr_units`: steps, tokens or samples all land there), so the schedule is the same function of
    the data consumed whatever the unit; with step units it is exactly the per-step schedule."""
    o, s = cfg.optimizer, cfg.lr_schedule
    sched = BatchSchedule(cfg)  # fixed batch: samples_before(step) = step x global_batch_size
    warm, end = lr_units(cfg)
    decay = end - warm
    floor = o.min_lr / o.lr if o.lr > 0 else 0.0

    def f(step: int) -> float:
        done, gbs = sched.samples_before(step), sched.batch(step)  # samples consumed before this step, its batch
        if done < warm:
            return (done + gbs) / warm
        if s.style == "constant":
            return 1.0
        t = min(1.0, (done - warm) / max(gbs, decay))
        shape = 0.5 * (1.0 + math.cos(math.pi * t)) if s.style == "cosine" else 1.0 - t
        return floor + (1.0 - floor) * shape

    return f


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norm parameters and 1-D tensors (GPT-3 / Megatron rule)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def deepspeed_config(cfg: Config, dp_size: int, accum: int) -> dict:
    t, pp = cfg.train, cfg.parallel.pipeline
    conf = copy.deepcopy(deepspeed_overrides(cfg))  # zero.config_file, checked against the sift config
    conf.setdefault("zero_optimization", {})
    conf["zero_optimization"]["stage"] = effective_zero_stage(cfg, dp_size)
    if pp > 1:
        # The megatron schedule accumulates over micro-batches; step() is the boundary.
        conf.update(train_micro_batch_size_per_gpu=t.micro_batch_size * accum, gradient_accumulation_steps=1,
                    managed_gradient_accumulation=False)
    else:
        conf.update(train_micro_batch_size_per_gpu=t.micro_batch_size, gradient_accumulation_steps=accum)
    conf["train_batch_size"] = t.micro_batch_size * accum * dp_size
    # Stage 0: DeepSpeed clips without recording the norm, so the trainer clips (clip_grads_stage0).
    conf["gradient_clipping"] = cfg.optimizer.clip_grad if conf["zero_optimization"]["stage"] > 0 else 0.0
    if cfg.model.precision == "bf16":
        # bf16 module; DeepSpeed keeps fp32 master weights + Adam state, reduces grads in fp32 and, with PP=1,
        # accumulates them in fp32 (ZeRO-1: BF16_Optimizer). Under megatron's pipeline schedule BF16_Optimizer
        # never moves the grads into its fp32 buffer (torch-style backward skips engine.backward's epilogue:
        # ranks deadlock in the grad-norm all-reduce), so PP runs DeepSpeed's ZeRO-1 with bf16 accumulation.
        conf["bf16"] = {**conf.get("bf16", {}), "enabled": True}
        conf["data_types"] = {**conf.get("data_types", {}), "grad_accum_dtype": "fp32" if pp == 1 else "bf16"}
        conf.setdefault("communication_data_type", "fp32")
    conf.setdefault("steps_per_print", 10**9)
    conf.setdefault("wall_clock_breakdown", False)
    conf["zero_allow_untested_optimizer"] = True
    for key, value in cfg.zero.extra.items():  # merge one level deep: extra.zero_optimization adds keys
        if isinstance(value, dict) and isinstance(conf.get(key), dict):
            conf[key] = {**conf[key], **value}
        else:
            conf[key] = value
    conf["zero_optimization"]["stage"] = effective_zero_stage(cfg, dp_size)  # the sift config decides
    for key in ("bf16", "fp16"):
        if (conf.get(key) or {}).get("enabled") and cfg.model.precision != "bf16":
            raise SiftError(f"DeepSpeed {key} is enabled in zero.extra / zero.config_file but model.precision is "
                            f"{cfg.model.precision}; set model.precision=bf16 instead (megatron must build the "
                            "model in that dtype)")
    return conf


@torch.no_grad()
def clip_grads_stage0(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Global grad norm over TP x PP (TP-replicated params counted once, tied pipeline replicas skipped, as
    DeepSpeed's ZeRO path does), then clip in place. Grads are already averaged over DP at this point."""
    from megatron.core import parallel_state as ps

    from sift_megatron import comm

    tp_rank = ps.get_tensor_model_parallel_rank()
    grads = [p.grad for p in params if p.grad is not None and not getattr(p, "ds_pipe_replicated", False)
             and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0)]
    dev = params[0].device if params else None
    sq = (torch.stack([g.to(torch.promote_types(g.dtype, torch.float32)).pow(2).sum() for g in grads]).sum()
          if grads else torch.zeros((), device=dev))
    comm.all_reduce(sq, group=ps.get_model_parallel_group())  # a no-op without a process group
    norm = float(sq.sqrt())
    if max_norm > 0 and norm + 1e-6 > max_norm:
        coef = max_norm / (norm + 1e-6)
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], coef)
    return norm


def build_engine(cfg: Config, chunks: list[torch.nn.Module], dp_size: int, accum: int):
    import deepspeed

    module = ChunkList(chunks)
    o = cfg.optimizer
    # Fused on CPU too: the for-loop AdamW's torch.sqrt(exp_avg_sq) runs ~8x slower on vectors holding exact
    # zeros (the Adam state of every masked weight), ~4% of a Sparse Wide step (benchmarks/sparse_overhead.py).
    optimizer = torch.optim.AdamW(param_groups(module, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                  eps=o.eps, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    conf = deepspeed_config(cfg, dp_size, accum)
    # BF16_Optimizer print()s memory reports (see_memory_usage(force=True)) for every param group on rank 0.
    quiet = contextlib.redirect_stdout(io.StringIO()) if cfg.model.precision == "bf16" else contextlib.nullcontext()
    with quiet:
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, mpu=MpuAdapter(), config=conf)
    if cfg.model.precision == "fp64":
        from sift_megatron.platform import install_fp64_allreduce

        install_fp64_allreduce(engine)
    return engine, optimizer, scheduler
