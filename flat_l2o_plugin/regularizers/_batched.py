"""A loss at many points at once: ``torch.func.vmap`` when the loss allows it, else a loop.

Monte-Carlo estimators (local entropy's draws, the trace's finite-difference probes)
evaluate one ``loss_fn`` at a batch of points. ``vmap`` runs them as one batched pass;
a ``loss_fn`` that cannot be vmapped (Python control flow on tensor values, random ops,
``.item()``) will not become vmappable on the next call either, so the caller keeps a
flag and stops trying after the first failure.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch import Tensor

from ..protocols import LossFn

__all__ = ["batched", "batched_losses", "scalar"]

_Result = TypeVar("_Result")


def batched(vectorized: Callable[[], _Result], looped: Callable[[], _Result], vectorize: bool) -> tuple[_Result, bool]:
    """``vectorized()`` if ``vectorize`` and it works, else ``looped()``; and whether to try vmap next time."""
    if vectorize:
        try:
            return vectorized(), True
        except Exception:  # noqa: BLE001 - any vmap failure means: evaluate one by one
            pass
    return looped(), False


def batched_losses(loss_fn: LossFn, points: list[Tensor], vectorize: bool) -> tuple[Tensor, bool]:
    """``loss_fn`` at each of the batched ``points`` (leading dimension n), as a 1-D tensor.

    Returns the losses and whether vmap may be tried next time.
    """
    n = points[0].shape[0]

    def vectorized() -> Tensor:
        return torch.func.vmap(lambda *ps: loss_fn(list(ps)))(*points)

    def looped() -> Tensor:
        return torch.stack([scalar(loss_fn([x[i] for x in points])) for i in range(n)])

    losses, vectorize = batched(vectorized, looped, vectorize)
    if losses.shape != (n,):
        raise ValueError(f"loss_fn must return a scalar, got a batch of shape {tuple(losses.shape)}")
    return losses, vectorize


def scalar(loss: Tensor) -> Tensor:
    """``loss``, checked to be 0-dim."""
    if loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar, got a tensor of shape {tuple(loss.shape)}")
    return loss
