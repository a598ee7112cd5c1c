"""The structural types the host loop, the zoo and the tasks agree on.

A learned optimizer is an ``nn.Module`` with two methods (``init_state`` and ``step``),
as in google/learned_optimization; a task is a functional optimizee whose parameters
are plain tensors, so an unroll keeps the graph from the learned optimizer's weights
through every iterate.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

__all__ = ["Params", "LossFn", "Regularizer", "LearnedOptimizer", "Task"]

Params = Sequence[Tensor]
"""The optimizee's parameters, one tensor per weight, in a fixed order."""

LossFn = Callable[[Params], Tensor]
"""``loss_fn(params)`` returns the scalar mini-batch loss at ``params``."""


@runtime_checkable
class Regularizer(Protocol):
    """``reg(params, loss_fn)`` returns a scalar differentiable with respect to ``params``.

    A regularizer may also name ``loss`` and ``grads`` among its keyword parameters to
    receive what the host already has at the iterate (see the ``register_regularizers``
    hook); it is called without them when the host has none.
    """

    def __call__(self, params: Params, loss_fn: LossFn) -> Tensor: ...


@runtime_checkable
class LearnedOptimizer(Protocol):
    """A learned optimizer m_φ: an ``nn.Module`` whose parameters are φ.

    ``step`` must be differentiable in the module's own weights, so that a meta-loss on
    the new params reaches φ. It works coordinatewise over all parameters flattened into
    one batch. ``state`` is a flat ``dict[str, Tensor]`` so that it can be saved.
    """

    def init_state(self, params: Params) -> dict[str, Tensor]: ...

    def step(
        self, params: Params, grads: Params, state: Mapping[str, Tensor]
    ) -> tuple[list[Tensor], dict[str, Tensor]]: ...

    def parameters(self, recurse: bool = True) -> Any: ...


@runtime_checkable
class Task(Protocol):
    """An optimizee: a model and its data, with functional parameters.

    ``init_params(seed)`` returns fresh parameters; ``sample_batch(generator)`` draws a
    training mini-batch; ``loss(params, batch)`` is the scalar training loss;
    ``evaluate(params, split)`` returns metrics (at least ``loss`` and, for classifiers,
    ``accuracy``) on a whole split (``"train"``, ``"val"`` or ``"test"``).
    """

    name: str

    def init_params(self, seed: int) -> list[Tensor]: ...

    def sample_batch(self, generator: torch.Generator) -> Any: ...

    def loss(self, params: Params, batch: Any) -> Tensor: ...

    def evaluate(self, params: Params, split: str = "test") -> dict[str, float]: ...
