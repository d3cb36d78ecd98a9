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
import io
import math

import torch

from sift_megatron.config import BatchSchedule, Config, deepspeed_config, effective_zero_stage, lr_units  # noqa: F401
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
