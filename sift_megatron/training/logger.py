"""Metrics to JSONL + TensorBoard + a progress bar, from the one rank that holds the loss."""

from __future__ import annotations

import json
import sys
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int = 0, *,
                 tensorboard: bool = True, jsonl: bool = True, progress: bool = True) -> None:
        self.enabled = enabled
        self._print_lines = progress
        self._jsonl = self._tb = self._bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
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
        if self._tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k.replace(".", "/"), v, step)
        if self._bar is None or self._bar.disable:  # not a terminal (logs, CI): one plain line per record
            if self._print_lines:
                print(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                               if v is not None), flush=True)
        elif "loss" in record:
            extra = {"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record.get('lr', 0):.2e}",
                                  tok_s=f"{record.get('tokens_per_s', 0):.0f}", **extra)

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
        if self._bar is not None:
            self._bar.close()
