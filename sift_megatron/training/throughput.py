"""Per-step throughput a user can read: tokens/s, model TFLOP/s per GPU, MFU, peak memory.

FLOPs come from `sift flops` (ift/flops.py): training = 3 x forward per token. `tflops` counts the useful
FLOPs (a sparse matmul costs its nonzeros), `executed_tflops` what a masked dense matmul executes (every masked
zero too); MFU is each against the device's dense peak for the run's precision (TF32 for fp32 on GPUs that
have it). The peak comes from a small table of known GPUs or `logging.peak_tflops`; unknown devices (and CPUs)
log no MFU rather than a made-up one.
"""

from __future__ import annotations

import resource
import sys

import torch

from sift_megatron.config import Config

# Dense (no 2:4 sparsity) peak TFLOP/s per GPU from the vendors' data sheets: (bf16, fp32 via TF32).
# Matched in order against torch.cuda.get_device_name(), so the more specific names come first.
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("B200", 2250.0, 1100.0),
    ("H200", 989.4, 494.7),
    ("GH200", 989.4, 494.7),
    ("H100 PCIe", 756.0, 378.0),
    ("H100", 989.4, 494.7),
    ("H800", 989.4, 494.7),
    ("A100", 312.0, 156.0),
    ("A800", 312.0, 156.0),
    ("L40S", 362.0, 183.0),
    ("A10G", 70.0, 35.0),
    ("V100", 125.0, 15.7),
)


def peak_tflops(device: torch.device, precision: str, override: float | None = None) -> float | None:
    """Dense peak of `device` for `precision`, or None where unknown (CPU, an unlisted GPU, fp64)."""
    if override:
        return float(override)
    if device.type != "cuda" or precision == "fp64":
        return None
    name = torch.cuda.get_device_name(device)
    for key, bf16, tf32 in PEAK_TFLOPS:
        if key in name:
            return bf16 if precision == "bf16" else tf32
    return None


def flops_per_token(cfg: Config, vocab_size: int) -> tuple[float, float]:
    """(useful, executed) training FLOPs per token, from ift/flops.py (the numbers `sift flops` prints)."""
    from sift_megatron.ift.flops import executed_flops_per_token, model_flops_per_token

    return model_flops_per_token(cfg, vocab_size=vocab_size), executed_flops_per_token(cfg, vocab_size=vocab_size)


def _peak_memory_gib(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_gpu_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_rss_gib": rss / (2**30 if sys.platform == "darwin" else 2**20)}


class Throughput:
    """Turns a step's wall time into the throughput fields of a metrics record."""

    def __init__(self, cfg: Config, vocab_size: int, world_size: int, device: torch.device) -> None:
        self.seq = cfg.model.seq_length
        self.samples_per_step = cfg.train.global_batch_size
        self.useful, self.executed = flops_per_token(cfg, vocab_size)
        self.world = world_size
        self.device = device
        self.peak = peak_tflops(device, cfg.model.precision, cfg.logging.peak_tflops)

    def record(self, step_time_s: float, samples: int | None = None) -> dict:
        """Fields for a step of `samples` sequences (default: the global batch; a batch ramp-up passes its own)."""
        tokens_per_s = (samples or self.samples_per_step) * self.seq / step_time_s
        tflops = self.useful * tokens_per_s / self.world / 1e12
        executed = self.executed * tokens_per_s / self.world / 1e12
        rec = {"tokens_per_s": tokens_per_s, "tflops_per_gpu": tflops, "executed_tflops_per_gpu": executed}
        if self.peak:
            rec.update(mfu=tflops / self.peak, executed_mfu=executed / self.peak)
        rec.update(_peak_memory_gib(self.device))
        return rec
