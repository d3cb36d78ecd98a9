"""The training loop: read top to bottom.

setup (platform, parallel_state, seeds) -> data -> model chunks -> DeepSpeed engine -> for each step:
forward/backward over the global batch's micro-batches, engine.step(), log, validate.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sift_megatron import comm, preflight
from sift_megatron.config import BatchSchedule, Config, effective_zero_stage
from sift_megatron.errors import SiftError, fault_point
from sift_megatron.ift.sizes import transformed_shape
from sift_megatron.layout import check_layout
from sift_megatron.models.gpt import build_model, shared_embedding_params
from sift_megatron.training import data as D
from sift_megatron.training.checkpoint import CheckpointManager
from sift_megatron.training.engine import build_engine, clip_grads_stage0
from sift_megatron.training.logger import MetricsLogger, wandb_settings
from sift_megatron.training.throughput import Throughput
from sift_megatron.training.watch import StartupWatch

LOGITS_FILE = "logits.safetensors"


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    history: list = field(default_factory=list)


class Trainer:
    def __init__(self, cfg: Config, checked: preflight.Checked | None = None) -> None:
        """`checked`: what preflight.check_train returned in this process (`sift train` runs it before importing
        torch); without it (library use) the checks run here."""
        from sift_megatron import platform

        startup = StartupWatch(cfg.logging.startup_watch_s, int(os.environ.get("RANK", "0")),
                               int(os.environ.get("WORLD_SIZE", "1")))
        platform.setup()  # before any megatron import: silences its import-time warnings, applies CPU shims
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        self.cfg = cfg
        self.plat = platform.init_distributed()
        self.world = comm.world_size()
        # Every check before anything is written: layout, DeepSpeed settings, run dir, data files and splits,
        # the checkpoint to resume from.
        if checked is None or checked.world != self.world:
            checked = preflight.check_train(cfg, self.world)
        self.dp_size, self.accum = check_layout(cfg, self.world)
        self.batches = BatchSchedule(cfg)  # the global batch of each step (fixed, or ramped up at this DP size)
        p = cfg.parallel
        ps.initialize_model_parallel(tensor_model_parallel_size=p.tensor, pipeline_model_parallel_size=p.pipeline,
                                     virtual_pipeline_model_parallel_size=p.virtual_pipeline)
        self.ps = ps
        torch.manual_seed(cfg.train.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
        self.run_dir = Path(cfg.train.out_dir)
        self.dp_rank = ps.get_data_parallel_rank()
        startup(f"distributed: {self.world} rank(s), TP {p.tensor} x PP {p.pipeline} x DP {self.dp_size}, "
                f"{self.plat.device.type}")
        from sift_megatron.sparse.layers import init_model_masks

        self.is_logger = (ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
                          and self.dp_rank == 0)
        # data
        self.tokenizer = D.load_tokenizer(cfg)
        t = cfg.train
        n_train = self.batches.samples_before(t.steps)
        n_valid = max(1, t.eval_iters * t.global_batch_size)
        with startup.phase("building datasets (megatron index caches)"):
            if comm.rank() == 0:  # rank 0 writes the index cache, the others read it
                self.datasets = D.build_datasets(cfg, self.tokenizer, self.run_dir, max(n_train, 1), n_valid)
            comm.barrier()
            if comm.rank() != 0:
                self.datasets = D.build_datasets(cfg, self.tokenizer, self.run_dir, max(n_train, 1), n_valid)
        if cfg.logging.logits and self.datasets.valid is None:  # say so now, not at the end of the run
            raise SiftError("logging.logits needs a validation split (data.split or data.valid_prefixes)")
        self.vocab = D.padded_vocab_size(self.datasets.vocab_size, p.tensor, cfg.model.make_vocab_size_divisible_by)
        startup(f"datasets: {len(self.datasets.train):,} train / "
                f"{len(self.datasets.valid) if self.datasets.valid is not None else 0:,} valid samples, "
                f"vocab {self.datasets.vocab_size:,} (padded {self.vocab:,}), "
                + (f"EOD id {self.datasets.eod}" if self.datasets.eod is not None else
                   "EOD id unknown (no data.tokenizer: `sift convert` will ask for --tokenizer)"))

        # model + engine
        self.shape = transformed_shape(cfg)
        with startup.phase("building the model"):
            self.chunks = build_model(cfg, self.vocab, self.shape)
        startup(_model_line(cfg, self.datasets.vocab_size, self.chunks))
        self.densities = {}
        if self.shape.family != "dense":  # masks before the engine copies weights into ZeRO's fp32 master
            with startup.phase("building the sparse masks"):
                self.densities = init_model_masks(self.chunks, cfg.sparsity.mask_seed or t.seed,
                                                  self.shape.sparsity, cfg.sparsity.distribution,
                                                  ps.get_tensor_model_parallel_group(), cfg.sparsity.pattern,
                                                  cfg.sparsity.block)
            pattern = "" if cfg.sparsity.pattern == "unstructured" else (
                f", {cfg.sparsity.block}x{cfg.sparsity.block} blocks" if cfg.sparsity.pattern == "block"
                else f", {cfg.sparsity.pattern}")
            startup(f"masks: {len(self.densities)} sparse tensors at density {1 - self.shape.sparsity:.3f}{pattern}")
            if cfg.sparsity.kernel == "block":  # same weights and masks; GEMMs over the nonzero tiles only
                from sift_megatron.sparse.block_linear import have_triton
                from sift_megatron.sparse.layers import use_block_kernel

                n = use_block_kernel(self.chunks, cfg.sparsity.block)
                impl = "Triton" if self.plat.is_cuda and have_triton() else "torch reference"
                startup(f"kernel: block-sparse GEMMs ({impl}) in {n} sparse linears")
        self.shared_embeddings = shared_embedding_params(self.chunks)
        self._install_sequence_parallel_hooks()
        with startup.phase("building the DeepSpeed engine"):
            self.engine, self.optimizer, self.scheduler = build_engine(cfg, self.chunks, self.dp_size, self.accum)
        self.zero_stage = effective_zero_stage(cfg, self.dp_size)
        startup(f"engine: DeepSpeed ZeRO stage {self.zero_stage}, {cfg.model.precision}")
        self.params = [p for c in self.chunks for p in c.parameters()]
        self.dst = None
        if self.densities and cfg.dst.algorithm != "static":
            from sift_megatron.dst.schedule import DSTSchedule
            from sift_megatron.dst.updater import DSTUpdater

            self.dst = DSTUpdater(self.chunks, self.engine, DSTSchedule.from_config(cfg.dst, t.steps),
                                  cfg.dst.algorithm, cfg.sparsity.mask_seed or t.seed, cfg.sparsity.pattern,
                                  cfg.sparsity.block)
        self.state = TrainState()
        self.attn_mask = None  # causal: SDPA (is_causal) and megatron's unfused attention need no mask tensor
        self.checkpoints = CheckpointManager(
            cfg, chunks=self.chunks, optimizer=self.optimizer, scheduler=self.scheduler, engine=self.engine,
            state=self.state, dst=self.dst, layout=preflight.layout_of(cfg, self.dp_size),
            vocab_size=self.datasets.vocab_size, padded_vocab_size=self.vocab)
        self.resume_message = None
        if checked.resume is not None:
            with startup.phase(f"loading checkpoint {checked.resume.path}"):
                self.resume_message = self.checkpoints.load(checked.resume)
            startup(f"checkpoint: {checked.resume.path} loaded")
        # Only now, with every check passed and the checkpoint loaded, is the run directory taken over.
        if comm.rank() == 0:
            preflight.claim_run_dir(cfg)
        comm.barrier()
        self._stop_signal = None
        self._install_signal_handlers()

    # ------------------------------------------------------------------------------------------------------
    def _install_sequence_parallel_hooks(self) -> None:
        """Under sequence parallelism, LayerNorm params and row-parallel biases see only this rank's part of
        the sequence; their grads are summed over the TP group as soon as they are computed (megatron's
        finalize_model_grads does this for its own DDP; DeepSpeed does not know about it)."""
        if not self.cfg.parallel.sequence_parallel:
            return
        group = self.ps.get_tensor_model_parallel_group()

        def hook(g: torch.Tensor) -> torch.Tensor:
            g = g.contiguous().clone()
            comm.all_reduce(g, group=group)
            return g

        for m in self.chunks:
            for p in m.parameters():
                if getattr(p, "sequence_parallel", False):
                    p.register_hook(hook)

    def _install_signal_handlers(self) -> None:
        """SIGTERM / SIGUSR1 (SLURM preemption, --signal): finish the current step, checkpoint, exit."""
        import signal

        def handler(signum, frame):
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    def _signal_name(self) -> str:
        """'signal SIGTERM', or where only another rank received it, say so (not 'signal None')."""
        import signal

        if self._stop_signal is None:
            return "stop signal received by another rank"
        return f"signal {signal.Signals(self._stop_signal).name}"

    def _should_stop(self) -> bool:
        """All ranks agree (a signal may reach only some of them)."""
        flag = torch.tensor([1.0 if self._stop_signal is not None else 0.0], device=self.plat.device)
        comm.all_reduce(flag, op=comm.ReduceOp.MAX)
        return bool(flag.item())

    def save(self) -> Path:
        return self.checkpoints.save()

    def _loss(self, loss_mask: torch.Tensor, per_token: torch.Tensor) -> torch.Tensor:
        mask = loss_mask.float()
        return (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)

    def _forward(self, chunk: int, batch: dict, engine_call: bool = True) -> torch.Tensor:
        fn = self.engine if engine_call else self.engine.module
        return fn(chunk, batch["tokens"], batch["position_ids"], self.attn_mask, labels=batch["labels"])

    def _micro_batches(self, it, n: int) -> list[dict]:
        return [next(it) for _ in range(n)]

    def _ramp_accumulation(self) -> int:
        """Micro-batches of this step under a batch ramp-up. PP=1: DeepSpeed scales the loss by 1 / that count;
        PP > 1: megatron's schedule does (its num_microbatches), DeepSpeed sees one step of one micro-batch."""
        batch = self.batches.batch(self.state.step)
        if self.cfg.parallel.pipeline == 1 and batch != self.engine.train_batch_size():
            self.engine.set_train_batch_size(batch)
        return batch // (self.cfg.train.micro_batch_size * self.dp_size)

    def train_step(self, it) -> dict:
        """One optimizer step over the global batch; returns the DP-averaged loss and the global grad norm."""
        cfg = self.cfg
        losses: list[torch.Tensor] = []
        grad_norm = None
        if cfg.parallel.pipeline == 1:
            accum = self._ramp_accumulation() if cfg.train.rampup_batch_size else self.accum
            for i, mb in enumerate(self._micro_batches(it, accum)):
                if cfg.train.rampup_batch_size:  # DeepSpeed's own boundary counter assumes a fixed accumulation
                    self.engine.set_gradient_accumulation_boundary(i == accum - 1)
                loss = self._loss(mb["loss_mask"], self._forward(0, mb))
                self.engine.backward(loss)
                if self.zero_stage == 0 and i == accum - 1:  # boundary: grads are DP-averaged now
                    grad_norm = clip_grads_stage0(self.params, cfg.optimizer.clip_grad)
                self.engine.step()
                losses.append(loss.detach())
        else:
            accum = self._ramp_accumulation() if cfg.train.rampup_batch_size else self.accum
            out = self._schedule(self._pp_forward_step, self._micro_batches(it, accum), forward_only=False)
            for p in self.shared_embeddings:  # tied embedding: first and last stage hold one logical weight
                if p.grad is not None:
                    comm.all_reduce(p.grad, group=self.ps.get_embedding_group())
            self.engine.step()
            losses = [o["lm loss"] for o in out] if out else []
        if self.zero_stage != 0:
            grad_norm = self.engine.get_global_grad_norm()
        return {**self._reduce_loss(losses), "grad_norm": float(grad_norm) if grad_norm is not None else None}

    def _schedule(self, step_func, mbs: list[dict], forward_only: bool) -> list:
        """megatron-core's pipeline schedule (1F1B or interleaved) over these micro-batches; the last stage gets
        the step_func outputs (loss dicts, or the model outputs when step_func returns no loss function)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        n = len(self.chunks)
        return get_forward_backward_func()(
            forward_step_func=step_func, data_iterator=[iter(mbs) for _ in range(n)] if n > 1 else iter(mbs),
            model=list(self.chunks), num_microbatches=len(mbs), seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size, forward_only=forward_only)

    def _pp_forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        chunk = next(i for i, c in enumerate(self.chunks) if c is model)
        return self._forward(chunk, batch), self._loss_func(batch)

    def _loss_func(self, batch: dict):
        """megatron's pipeline loss_func for one micro-batch: (loss, {"lm loss": loss})."""
        def loss_func(per_token):
            loss = self._loss(batch["loss_mask"], per_token)
            return loss, {"lm loss": loss.detach().clone()}

        return loss_func

    def _reduce_loss(self, losses: list[torch.Tensor]) -> dict:
        """Mean over micro-batches and DP ranks, valid on the logging rank (last stage)."""
        val = torch.stack(losses).mean() if losses else torch.zeros((), device=self.plat.device)
        val = val.to(self.plat.device, torch.float32)
        if self.dp_size > 1:
            comm.all_reduce(val, group=self.ps.get_data_parallel_group())
            val /= self.dp_size
        return {"loss": float(val)}

    @torch.no_grad()
    def evaluate(self, it, iters: int) -> float:
        cfg = self.cfg
        self.engine.eval()
        losses = []
        for _ in range(iters):
            mbs = self._micro_batches(it, self.accum)
            if cfg.parallel.pipeline == 1:
                losses += [self._loss(mb["loss_mask"], self._forward(0, mb, engine_call=False)) for mb in mbs]
            else:
                out = self._schedule(self._pp_eval_step, mbs, forward_only=True)
                losses += [o["lm loss"] for o in out] if out else []
        self.engine.train()
        return self._reduce_loss(losses)["loss"]

    def _pp_eval_step(self, data_iterator, model):
        batch = next(data_iterator)
        return model(batch["tokens"], batch["position_ids"], self.attn_mask, labels=batch["labels"]), \
            self._loss_func(batch)

    # ------------------------------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        """Step, log, validate, checkpoint, stop on a signal; then the end-of-run outputs."""
        cfg, t, st = self.cfg, self.cfg.train, self.state
        train_it = D.micro_batches(self.datasets.train, cfg, self.dp_rank, self.dp_size, st.consumed_samples,
                                   self.plat.device)
        log = MetricsLogger(self.run_dir, self.is_logger, t.steps, st.step, tensorboard=cfg.logging.tensorboard,
                            jsonl=cfg.logging.jsonl, progress=cfg.logging.progress, wandb=wandb_settings(cfg))
        throughput = Throughput(cfg, self.datasets.vocab_size, self.world, self.plat.device)
        if self.resume_message:
            log.write(self.resume_message)
        try:
            while st.step < t.steps:
                t0, lr, batch = time.perf_counter(), self.optimizer.param_groups[0]["lr"], self.batches.batch(st.step)
                if self.dst:
                    self.dst.before_step(st.step + 1)
                rec = self.train_step(train_it)
                st.step += 1
                st.consumed_samples += batch
                if self.dst:
                    rec.update(self.dst.after_step(st.step) or {})
                dt = time.perf_counter() - t0
                rec.update(step=st.step, lr=lr, step_time_s=dt, consumed_samples=st.consumed_samples,
                           **throughput.record(dt, batch), **self._periodic_metrics(st.step))
                if st.step % cfg.logging.log_interval == 0 or "val_loss" in rec:
                    log.log(rec)
                st.history.append(rec)
                log.advance()
                fault_point("train_step", st.step)
                if self.checkpoints.due(st.step):
                    log.write(f"checkpoint {self.save()}")
                if self._should_stop():
                    log.write(f"{self._signal_name()}: checkpoint {self.save()}, stopping at step {st.step}")
                    return st.history
            self._finish(log)
        finally:
            log.close()
        return st.history

    def _valid_iter(self):
        """Every validation reads the same first samples: comparable across steps, layouts and resumes."""
        return D.micro_batches(self.datasets.valid, self.cfg, self.dp_rank, self.dp_size, 0, self.plat.device)

    def _periodic_metrics(self, step: int) -> dict:
        """Mask spectra and validation loss at their intervals (collective)."""
        cfg, t, out = self.cfg, self.cfg.train, {}
        if self.densities and cfg.spectral.interval and step % cfg.spectral.interval == 0:
            out.update(self.spectral_scalars())
        if self.datasets.valid is not None and t.eval_interval and step % t.eval_interval == 0:
            out["val_loss"] = self.evaluate(self._valid_iter(), t.eval_iters)
        return out

    def _finish(self, log: MetricsLogger) -> None:
        """The final validation (unless the last step had one), logits, checkpoint and mask export."""
        cfg, t, st = self.cfg, self.cfg.train, self.state
        if self.datasets.valid is not None and t.steps and (not t.eval_interval or t.steps % t.eval_interval):
            rec = {"step": st.step, "val_loss": self.evaluate(self._valid_iter(), t.eval_iters)}
            log.log(rec)
            st.history.append(rec)
        if cfg.logging.logits:
            log.write(f"logits {self.export_logits()}")
        if t.save:
            log.write(f"checkpoint {self.save()}")
        if cfg.spectral.export_masks:
            self.export_masks()

    def spectral_scalars(self) -> dict:
        """Mask-topology metrics (Ramanujan gap, weighted spectral gap) of the logical masks, the same on every
        rank so the logging rank (last pipeline stage) can write them (collective over the whole job)."""
        from sift_megatron.sparse.layers import sparse_modules

        mods = [nm for c in self.chunks for nm in sparse_modules(c)]
        return stream_spectral_scalars(mods, self.ps.get_tensor_model_parallel_group(), self.dp_rank == 0)

    @torch.no_grad()
    def logits(self, batch: dict) -> torch.Tensor | None:
        """Full-vocabulary logits [b, s, padded vocab] of one micro-batch (eval mode), gathered over the TP vocab
        shards, on the last pipeline stage; None on the other stages (collective)."""
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        self.engine.eval()
        try:
            if self.cfg.parallel.pipeline == 1:
                out = self.engine.module(0, batch["tokens"], batch["position_ids"], self.attn_mask, labels=None)
            else:
                def step(data_iterator, model):  # no loss_func: the schedule returns the last stage's output
                    b = next(data_iterator)
                    return model(b["tokens"], b["position_ids"], self.attn_mask, labels=None), None

                n = self.accum if len(self.chunks) > 1 else 1  # the interleaved schedule needs >= PP micro-batches
                outs = self._schedule(step, [batch] * n, forward_only=True)
                out = outs[0] if outs else None
        finally:
            self.engine.train()
        return None if out is None else gather_from_tensor_model_parallel_region(out)

    def export_logits(self, path: Path | None = None) -> Path | None:
        """Logits of the first validation micro-batch (samples 0..micro_batch_size-1 at any layout) and its tokens
        to <run dir>/logits.safetensors: the check that a resharded checkpoint or another TP/PP layout computes
        the same model (collective; the logging rank writes)."""
        from sift_megatron.sparse.export import write_masks
        batch = next(D.micro_batches(self.datasets.valid, self.cfg, 0, 1, 0, self.plat.device))
        out = self.logits(batch)
        if out is None or not self.is_logger:
            return None
        meta = {"vocab_size": self.datasets.vocab_size, "padded_vocab_size": self.vocab,
                "layout": json.dumps(self.checkpoints.layout)}
        return write_masks({"logits": out.cpu(), "tokens": batch["tokens"].cpu()}, path or self.run_dir / LOGITS_FILE,
                           self.state.step, extra=meta)

    def export_masks(self, path: Path | None = None) -> Path | None:
        """Logical masks + weights of all sparse layers to <run dir>/sparse_masks.safetensors, streamed to rank 0
        one tensor at a time (collective; the path on rank 0, None elsewhere)."""
        if not self.densities:
            return None
        from sift_megatron.sparse.export import MASKS_FILE, export_logical_masks

        return export_logical_masks(self.chunks, path or self.run_dir / MASKS_FILE, self.state.step)

    def close(self, destroy_process_group: bool = True) -> None:
        comm.barrier()
        self.ps.destroy_model_parallel()
        if destroy_process_group:
            comm.destroy()


def stream_spectral_scalars(mods: list, tp_group, active: bool) -> dict[str, float]:
    """`summary_scalars(analyze_masks(<all logical masks>), per_layer=False)` without gathering the model: the
    `active` ranks (DP rank 0 of each stage) score their stage's layers one at a time, each on one TP rank
    (map_logical_layers, collective over `tp_group`); the records meet on every rank (collective over the job)."""
    from sift_megatron.sparse.export import map_logical_layers
    from sift_megatron.spectral.io import from_flat
    from sift_megatron.spectral.metrics import analyze_layer, model_scalars, one_blas_thread

    def analyse(name: str, mask: torch.Tensor, weight: torch.Tensor) -> dict:
        m, w = from_flat({f"{name}.mask": mask, f"{name}.weight": weight})[name]  # as analyze_masks reads them
        return analyze_layer(m, w, name=name)

    records = []
    if active:
        with one_blas_thread():
            records = map_logical_layers(mods, analyse, tp_group)
    return model_scalars(r for part in comm.all_gather_object(records) for r in part)


def _model_line(cfg: Config, vocab_size: int, chunks) -> str:
    """Parameters on this rank and of the whole model, and forward / training FLOPs per token."""
    from sift_megatron.ift.flops import flop_report

    rep = flop_report(cfg, vocab_size=vocab_size)
    params = rep["params"]["transformed"]
    local = sum(p.numel() for c in chunks for p in c.parameters())
    return (f"model: {cfg.sparsity.family} {params['active'] / 1e6:,.2f}M active / {params['stored'] / 1e6:,.2f}M "
            f"stored parameters ({local / 1e6:,.2f}M on rank 0), {rep['transformed']['total'] / 1e6:,.1f} forward / "
            f"{rep['transformed']['training']['per_token'] / 1e6:,.1f} training MFLOPs per token")


def run(cfg: Config, checked: preflight.Checked | None = None) -> list[dict]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer = Trainer(cfg, checked)
    try:
        return trainer.fit()
    finally:
        trainer.close()
