"""A regularizer and a hook plugin that evaluate the loss three times at the same parameters.

They record what they saw, so tests can tell whether every evaluation inside one call
saw the same function (a model in train mode draws new dropout masks at each forward).
"""

from __future__ import annotations

from typing import Callable

import torch

from flat_l2o_plugin import RegularizerInfo, hookimpl


class RepeatedLoss:
    """R(θ) = the mean of three evaluations of f at θ; ``seen`` holds each call's three values."""

    def __init__(self) -> None:
        self.seen: list[list[float]] = []

    def __call__(self, params, loss_fn) -> torch.Tensor:
        values = [loss_fn(params) for _ in range(3)]
        self.seen.append([float(v.detach()) for v in values])
        return torch.stack(values).mean()


class RepeatedLossHook:
    """Implements ``flatness_terms`` itself (no registered regularizer) and does the same."""

    name = "repeated_loss_hook"

    def __init__(self) -> None:
        self.seen: list[list[float]] = []

    @hookimpl
    def flatness_terms(self, params, loss_fn):
        values = [loss_fn(params) for _ in range(3)]
        self.seen.append([float(v.detach()) for v in values])
        return {"repeated_hook": 0.0 * torch.stack(values).mean()}


@hookimpl
def register_regularizers(register: Callable[[RegularizerInfo], None]) -> None:
    register(RegularizerInfo(name="repeated_loss", factory=RepeatedLoss, stochastic=True,
                             description="Mean of three evaluations of the loss (a test probe)."))
