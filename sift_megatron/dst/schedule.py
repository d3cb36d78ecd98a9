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

from sift_megatron.errors import SiftError

__all__ = ["DSTSchedule", "resolve_end"]

DECAYS = ("cosine", "constant", "exponential")


def resolve_end(end: float, total_steps: int | None) -> int:
    """`end` below 1 is a fraction of total_steps (int(end * total), as cbsparse), otherwise a step."""
    if end < 0:
        raise SiftError(f"dst.end must be a step >= 1 or a fraction in (0, 1), got {end}")
    if end >= 1:
        if end != int(end):
            raise SiftError(f"dst.end must be a whole step when >= 1, got {end}")
        return int(end)
    if total_steps is None:
        raise SiftError(f"dst.end={end} is a fraction of the run, so the total number of steps is needed")
    return int(end * total_steps)


class DSTSchedule:
    """Mask-update timing and drop fraction. `end` is a step (>= 1) or a fraction of total_steps (< 1);
    `drop_fraction` is the initial fraction f0 (config `dst.drop_fraction`), kept as `.f0` because
    `drop_fraction(step)` is the annealed value."""

    def __init__(self, interval: int = 100, begin: int = 0, end: float = 0.75, total_steps: int | None = None,
                 drop_fraction: float = 0.3, decay: str = "cosine", exponential_rate: float = 1.0) -> None:
        if interval < 1:
            raise SiftError(f"dst.interval must be >= 1, got {interval}")
        if begin < 0:
            raise SiftError(f"dst.begin must be >= 0, got {begin}")
        if not 0.0 <= drop_fraction <= 1.0:
            raise SiftError(f"dst.drop_fraction must be in [0, 1], got {drop_fraction}")
        if decay not in DECAYS:
            raise SiftError(f"dst.decay must be cosine, constant or exponential, got {decay!r}")
        self.interval, self.begin, self.end, self.total_steps = int(interval), int(begin), end, total_steps
        self.f0, self.decay, self.exponential_rate = float(drop_fraction), decay, float(exponential_rate)
        self.end_step = resolve_end(end, total_steps)
        if self.end_step <= self.begin:
            raise SiftError(f"dst.end (step {self.end_step}) must come after dst.begin (step {self.begin})")

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
