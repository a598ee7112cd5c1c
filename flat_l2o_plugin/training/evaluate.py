"""Training a fresh optimizee with a (learned or hand-designed) optimizer, and measuring it.

Used for validation during meta-training, for held-out evaluation, and for baselines,
so that every optimizer is measured by the same code on the same batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor

from ..protocols import LearnedOptimizer, Params, Task

__all__ = ["TrainResult", "train_with_learned_optimizer", "train_with_torch_optimizer", "batch_generator"]


def batch_generator(seed: int) -> torch.Generator:
    """The generator of an optimizee's mini-batches for ``seed``.

    Distinct from the init seed's stream, and identical for every optimizer, so that
    optimizers compared on one seed see the same batches.
    """
    return torch.Generator().manual_seed(10_000_019 * (int(seed) + 1))


@dataclass
class TrainResult:
    """What one optimizee run produced."""

    params: list[Tensor]
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_metrics: list[dict[str, float]] = field(default_factory=list)
    diverged_at: int | None = None

    @property
    def final_train_loss(self) -> float:
        return self.train_loss[-1] if self.train_loss else math.nan


def _run(task: Task, seed: int, steps: int, step_fn: Callable[[list[Tensor], Tensor, list[Tensor]], list[Tensor]],
         eval_every: int, eval_splits: Iterable[str]) -> TrainResult:
    params = [p.detach() for p in task.init_params(seed)]
    gen = batch_generator(seed)
    result = TrainResult(params=params)
    splits = tuple(eval_splits)

    def record(t: int, loss: float) -> None:
        result.steps.append(t)
        result.train_loss.append(loss)
        if splits:
            result.eval_metrics.append({f"{s}_{k}": v for s in splits for k, v in task.evaluate(params, s).items()})

    for t in range(steps):
        leaves = [p.detach().requires_grad_(True) for p in params]
        loss = task.loss(leaves, task.sample_batch(gen))
        if not torch.isfinite(loss):
            result.diverged_at = t
            break
        grads = list(torch.autograd.grad(loss, leaves))
        if t % eval_every == 0:
            record(t, float(loss.detach()))
        with torch.no_grad():
            params = step_fn(params, loss.detach(), grads)
        result.params = params
    if result.diverged_at is None:
        final = task.loss(params, task.sample_batch(gen))
        record(steps, float(final))
    return result


def train_with_learned_optimizer(optimizer: LearnedOptimizer, task: Task, seed: int, steps: int, *,
                                 eval_every: int = 10, eval_splits: Iterable[str] = ()) -> TrainResult:
    """Train ``task.init_params(seed)`` for ``steps`` steps with a learned optimizer, no meta-graph."""
    state: dict[str, Tensor] = {}
    was_training = getattr(optimizer, "training", False)
    if hasattr(optimizer, "eval"):
        optimizer.eval()

    def step(params: list[Tensor], loss: Tensor, grads: list[Tensor]) -> list[Tensor]:
        nonlocal state
        if not state:
            state = optimizer.init_state(params)
        new, state = optimizer.step(params, grads, state)
        return [p.detach() for p in new]

    try:
        return _run(task, seed, steps, step, eval_every, eval_splits)
    finally:
        if was_training:
            optimizer.train()


def train_with_torch_optimizer(make_optimizer: Callable[[Params], torch.optim.Optimizer], task: Task, seed: int,
                               steps: int, *, eval_every: int = 10, eval_splits: Iterable[str] = ()) -> TrainResult:
    """The same loop with a ``torch.optim`` optimizer, e.g. ``lambda p: torch.optim.Adam(p, lr=1e-2)``."""
    holder: dict[str, object] = {}

    def step(params: list[Tensor], loss: Tensor, grads: list[Tensor]) -> list[Tensor]:
        if "opt" not in holder:
            holder["leaves"] = [p.clone() for p in params]
            holder["opt"] = make_optimizer(holder["leaves"])  # type: ignore[arg-type]
        leaves: list[Tensor] = holder["leaves"]  # type: ignore[assignment]
        for leaf, g in zip(leaves, grads):
            leaf.grad = g
        holder["opt"].step()  # type: ignore[attr-defined]
        return [leaf.detach().clone() for leaf in leaves]

    return _run(task, seed, steps, step, eval_every, eval_splits)
