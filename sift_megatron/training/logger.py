"""Metrics to JSONL + TensorBoard (+ Weights & Biases) + a progress bar, from the one rank that holds the loss."""

from __future__ import annotations

import datetime
import hashlib
import json
import sys
import time
from pathlib import Path


def wandb_settings(cfg) -> dict | None:
    """wandb.init arguments for `logging.wandb_project` (None: off). The run id is a function of the run directory,
    so a resumed or requeued run continues the same W&B run. WANDB_MODE=offline works without network."""
    lg = cfg.logging
    if not lg.wandb_project:
        return None
    from sift_megatron.config import to_dict

    run_dir = Path(cfg.train.out_dir).resolve()
    return {"project": lg.wandb_project, "name": lg.wandb_name or run_dir.name, "dir": str(run_dir),
            "id": hashlib.sha256(str(run_dir).encode()).hexdigest()[:16], "resume": "allow",
            "config": to_dict(cfg)}


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int = 0, *,
                 tensorboard: bool = True, jsonl: bool = True, progress: bool = True,
                 wandb: dict | None = None) -> None:
        self.enabled = enabled
        self._print_lines = progress
        self._jsonl = self._tb = self._bar = self._wandb = None
        self._total, self._start_step, self._t0 = total_steps, start_step, time.monotonic()
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if wandb is not None:
            import wandb as _wandb

            self._wandb = _wandb.init(**wandb)
        if jsonl:
            self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, file=sys.stderr, disable=None)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._jsonl:
            self._jsonl.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        scalars = {k.replace(".", "/"): v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:  # the same scalars, names and steps as TensorBoard
            self._wandb.log(scalars, step=step)
        if self._bar is None or self._bar.disable:  # not a terminal (logs, CI): one plain line per record
            if self._print_lines:
                print(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                               if v is not None) + self._clock(step), flush=True)
        elif "loss" in record:
            extra = {"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record.get('lr', 0):.2e}",
                                  tok_s=f"{record.get('tokens_per_s', 0):.0f}", **extra)

    def _clock(self, step: int) -> str:
        """' time=<UTC> eta=H:MM:SS' for plain lines (the bar shows its own ETA)."""
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        done = step - self._start_step
        if done <= 0 or step >= self._total:
            return f" time={now}"
        return f" time={now} eta={_duration((time.monotonic() - self._t0) / done * (self._total - step))}"

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._bar is not None:
            self._bar.close()
