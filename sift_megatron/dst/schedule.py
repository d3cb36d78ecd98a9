"""When DST updates masks, and how much it drops (spec section 3.2, cbsparse conventions).

`step` is the number of optimizer steps taken so far: the counter is incremented right after the optimizer
step and the mask update for that step runs after it, so the first training step is step 1. An update
happens when `begin < step < end and step % interval == 0` (cbsparse `DynamicMaskOptimizer.is_update_step`;
strict on both sides). The drop fraction anneals over the same window, with progress
p = (step - begin) / (end - begin):

    cosine:       f0 * (1 + cos(pi * p)) / 2     (cbsparse `update_group_drop_fraction`)
    constant:     f0
    exponential:  f0 * exp(-rate * p)            (cbsparse `exponential_<rate>`)

With begin = 0 the cosine form equals cstorch's Cosine(init=f0, half_period=end, minimum=0) used by the
released GPT-3 Sparse-IFT configs.
"""

from __future__ import annotations

import math

from sift_megatron.config import DSTConfig, dst_end_step, resolve_end

__all__ = ["DSTSchedule", "resolve_end"]


class DSTSchedule:
    """Mask-update timing and drop fraction. `end` is a step (>= 1) or a fraction of total_steps (< 1);
    `drop_fraction` is the initial fraction f0 (config `dst.drop_fraction`), kept as `.f0` because
    `drop_fraction(step)` is the annealed value."""

    def __init__(self, interval: int = 100, begin: int = 0, end: float = 0.75, total_steps: int | None = None,
                 drop_fraction: float = 0.3, decay: str = "cosine", exponential_rate: float = 1.0) -> None:
        d = DSTConfig(interval=interval, begin=begin, end=end, drop_fraction=drop_fraction, decay=decay,
                      exponential_rate=exponential_rate)
        self.end_step = dst_end_step(d, total_steps)  # the config's checks: one-line errors
        self.interval, self.begin, self.end, self.total_steps = int(interval), int(begin), end, total_steps
        self.f0, self.decay, self.exponential_rate = float(drop_fraction), decay, float(exponential_rate)

    def __repr__(self) -> str:
        return (f"DSTSchedule(interval={self.interval}, begin={self.begin}, end_step={self.end_step}, "
                f"f0={self.f0}, decay={self.decay!r}, exponential_rate={self.exponential_rate})")

    @classmethod
    def from_config(cls, dst, total_steps: int | None) -> DSTSchedule:
        """From a `config.DSTConfig` (interval, begin, end, drop_fraction, decay, exponential_rate)."""
        return cls(interval=dst.interval, begin=dst.begin, end=dst.end, total_steps=total_steps,
                   drop_fraction=dst.drop_fraction, decay=dst.decay, exponential_rate=dst.exponential_rate)

    def is_update_step(self, step: int) -> bool:
        """True when the mask update runs after optimizer step `step` (1-based)."""
        return self.begin < step < self.end_step and step % self.interval == 0

    def update_steps(self) -> range:
        """All update steps, in order."""
        first = (self.begin // self.interval + 1) * self.interval
        return range(first, self.end_step, self.interval)

    def drop_fraction(self, step: int) -> float:
        """Fraction of each tensor's active weights to drop at `step` (progress clamped to [0, 1], which
        only matters for steps outside the update window)."""
        progress = min(1.0, max(0.0, (step - self.begin) / (self.end_step - self.begin)))
        if self.decay == "constant":
            return self.f0
        if self.decay == "cosine":
            return self.f0 * (0.5 + 0.5 * math.cos(math.pi * progress))
        return self.f0 * math.exp(-self.exponential_rate * progress)
