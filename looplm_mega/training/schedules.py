"""Learning-rate schedules: linear warm-up, then constant, cosine to min_lr, or warmup-stable-decay
(constant, then a linear decay to min_lr over the last `decay_fraction` of the steps)."""

from __future__ import annotations

import math

from looplm_mega.training.config import OptimizerConfig, ScheduleConfig


def learning_rate(step: int, total_steps: int, optimizer: OptimizerConfig, schedule: ScheduleConfig) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps`."""
    peak, floor, warmup = optimizer.lr, optimizer.min_lr, schedule.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule.kind == "constant":
        return peak
    if schedule.kind == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    decay_start = max(warmup, int(round(total_steps * (1 - schedule.decay_fraction))))
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return peak + (floor - peak) * progress
