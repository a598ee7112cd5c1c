"""Regularizers that record what the host handed them: its loss, its gradient, or nothing.

Each names a different subset of the optional keyword parameters of the regularizer
contract (``loss``, ``grads``), so tests can see that a regularizer receives exactly
what it names, and that ``**kwargs`` receives nothing.
"""

from __future__ import annotations

from typing import Callable

import torch

from flat_l2o_plugin import RegularizerInfo, hookimpl


def _norm(params) -> torch.Tensor:
    return sum((p * p).sum() for p in params)


class SeesLoss:
    """Records the ``loss`` it got and ``loss_fn(params)`` evaluated next to it."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor | None, float]] = []

    def __call__(self, params, loss_fn, *, loss=None) -> torch.Tensor:
        self.seen.append((loss, float(loss_fn(params).detach())))
        return _norm(params)


class SeesGrads:
    """Records the ``grads`` it got."""

    def __init__(self) -> None:
        self.seen: list[list[torch.Tensor] | None] = []

    def __call__(self, params, loss_fn, grads=None) -> torch.Tensor:
        self.seen.append(grads)
        return _norm(params)


class TakesKeywords:
    """Accepts ``**kwargs`` but names neither value: it must receive nothing extra."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def __call__(self, params, loss_fn, **kwargs) -> torch.Tensor:
        self.seen.append(kwargs)
        return _norm(params)


@hookimpl
def register_regularizers(register: Callable[[RegularizerInfo], None]) -> None:
    register(RegularizerInfo(name="sees_loss", factory=SeesLoss, description="Records the host's loss."))
    register(RegularizerInfo(name="sees_grads", factory=SeesGrads, description="Records the host's gradient."))
    register(RegularizerInfo(name="takes_keywords", factory=TakesKeywords, description="Records its **kwargs."))
