"""Argument checks and the closure protocol shared by the hand-designed optimizers."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import ConfigError

Closure = Callable[[], Tensor]


def require_closure(name: str, closure: Closure | None) -> Closure:
    if closure is None:
        raise ConfigError(f"closure is required: {name}.step(closure) re-evaluates the loss "
                          "(zero grads, loss, backward, return loss)")
    # step() runs under no_grad; the closure must build a graph.
    return torch.enable_grad()(closure)


def positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{owner}: {name} must be a finite number > 0, got {value!r}")


def non_negative(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and value >= 0):
            raise ConfigError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")
