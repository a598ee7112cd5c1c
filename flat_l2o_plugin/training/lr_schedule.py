"""The meta-learning-rate schedule: linear warmup, then constant or cosine decay.

The rate of a meta-step is a pure function of its index and the config, never a
state that accumulates: a resumed run recomputes exactly the rate the uninterrupted
run would have used, and nothing about the schedule needs to be checkpointed.

With W warmup steps, base rate η and final rate η_min, meta-step s (0-based) of S uses

    η_s = η · (s + 1) / W                                      for s < W,
    η_s = η                                                    ("constant"),
    η_s = η_min + (η − η_min) · ½ (1 + cos(π (s − W) / (S − W)))   ("cosine").

The warmup ends one step before the base rate is reached, so the first step never uses
the full rate on a freshly initialised learned optimizer, whose early meta-gradients
are the least reliable.
"""

from __future__ import annotations

import math

from ..errors import ConfigError

__all__ = ["META_LR_SCHEDULES", "meta_learning_rate"]

META_LR_SCHEDULES = ("constant", "cosine")
"""The names ``MetaTrainConfig.meta_lr_schedule`` accepts."""


def meta_learning_rate(step: int, *, base: float, total: int, schedule: str = "constant", warmup: int = 0,
                       minimum: float = 0.0) -> float:
    """The meta-optimizer's learning rate at meta-step ``step``.

    Args:
        step: The 0-based meta-step index.
        base: η, the rate after warmup (and the start of the cosine decay).
        total: S, the number of meta-steps of the run; the cosine reaches ``minimum``
            at step S.
        schedule: ``"constant"`` or ``"cosine"``.
        warmup: W, meta-steps of linear warmup from η/W to η (0: none).
        minimum: η_min, the cosine schedule's final rate (ignored by ``"constant"``).

    Returns:
        The rate, a float.

    Raises:
        ConfigError: An unknown schedule name.

    Example:
        >>> meta_learning_rate(0, base=1e-3, total=100, schedule="cosine", warmup=10)
        0.0001
    """
    if schedule not in META_LR_SCHEDULES:
        raise ConfigError(f"meta_lr_schedule must be one of {META_LR_SCHEDULES}, got {schedule!r}")
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    return minimum + (base - minimum) * 0.5 * (1.0 + math.cos(math.pi * progress))
