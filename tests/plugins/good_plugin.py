"""A well-behaved plugin: registers ``l2_norm`` and observes every unroll."""

from __future__ import annotations

from typing import Any, Callable

import torch

from flat_l2o_plugin import RegularizerInfo, hookimpl

AFTER_UNROLL_CALLS: list[dict[str, Any]] = []
"""One entry per ``after_unroll`` call, with the keyword arguments it received."""


class L2Norm:
    """R(θ) = scale · Σ‖θ_i‖², counting its calls so tests can see when it ran."""

    def __init__(self, scale: float = 1.0) -> None:
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        self.scale = scale
        self.calls = 0

    def __call__(self, params, loss_fn) -> torch.Tensor:
        self.calls += 1
        return self.scale * sum((p * p).sum() for p in params)


INFO = RegularizerInfo(name="l2_norm", factory=L2Norm, description="Sum of squared parameters.")


@hookimpl
def register_regularizers(register: Callable[[RegularizerInfo], None]) -> None:
    register(INFO)


@hookimpl
def after_unroll(step, meta_loss, logs) -> None:
    AFTER_UNROLL_CALLS.append({"step": step, "meta_loss": meta_loss, "logs": logs})
