"""Training a fresh optimizee with a (learned or hand-designed) optimizer, and measuring it.

Used for validation during meta-training, for held-out evaluation, and for baselines,
so that every optimizer is measured by the same code on the same batches.
"""

from __future__ import annotations

import math
from functools import partial
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor

from ..protocols import LearnedOptimizer, Params, Task
from ..wrappers.stack import host_step

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


# step_fn(params, loss, grads, loss_fn) -> new params; loss_fn is the current mini-batch's
# loss, for optimizers that look at other points (SAM, Entropy-SGD, the sam_gradient wrapper).
StepFn = Callable[[list[Tensor], Tensor, list[Tensor], Callable[[Params], Tensor]], list[Tensor]]


Probe = Callable[[list[Tensor]], dict[str, float]]
"""``probe(params)``: extra measurements at each recorded step (e.g. curvature)."""


def _run(task: Task, seed: int, steps: int, step_fn: StepFn, eval_every: int,
         eval_splits: Iterable[str], probe: Probe | None = None) -> TrainResult:
    params = [p.detach() for p in task.init_params(seed)]
    gen = batch_generator(seed)
    result = TrainResult(params=params)
    splits = tuple(eval_splits)

    def record(t: int, loss: float) -> None:
        result.steps.append(t)
        result.train_loss.append(loss)
        if splits or probe is not None:
            metrics = {f"{s}_{k}": v for s in splits for k, v in task.evaluate(params, s).items()}
            result.eval_metrics.append({**metrics, **(probe(params) if probe is not None else {})})

    for t in range(steps):
        leaves = [p.detach().requires_grad_(True) for p in params]
        batch = task.sample_batch(gen)
        loss = task.loss(leaves, batch)
        if not torch.isfinite(loss):
            result.diverged_at = t
            break
        grads = list(torch.autograd.grad(loss, leaves))
        if t % eval_every == 0:
            record(t, float(loss.detach()))
        with torch.no_grad():
            params = step_fn(params, loss.detach(), grads, partial(task.loss, batch=batch))
        result.params = params
    if result.diverged_at is None:
        final = task.loss(params, task.sample_batch(gen))
        record(steps, float(final))
    return result


def train_with_learned_optimizer(optimizer: LearnedOptimizer, task: Task, seed: int, steps: int, *,
                                 eval_every: int = 10, eval_splits: Iterable[str] = (),
                                 probe: Probe | None = None) -> TrainResult:
    """Train ``task.init_params(seed)`` for ``steps`` steps with a learned optimizer, no meta-graph.

    Every ``eval_every`` steps (and at the end) the mini-batch loss is recorded, with
    ``task.evaluate`` on each of ``eval_splits`` and ``probe(params)`` if given. Wrapper
    stacks are called through :func:`~flat_l2o_plugin.wrappers.host_step`.
    """
    state: dict[str, Tensor] = {}
    was_training = getattr(optimizer, "training", False)
    if hasattr(optimizer, "eval"):
        optimizer.eval()

    def step(params: list[Tensor], loss: Tensor, grads: list[Tensor], loss_fn: Callable[[Params], Tensor]
             ) -> list[Tensor]:
        nonlocal state
        if not state:
            state = optimizer.init_state(params)
        new, state = host_step(optimizer, params, grads, state, loss_fn=loss_fn)
        return [p.detach() for p in new]

    try:
        return _run(task, seed, steps, step, eval_every, eval_splits, probe)
    finally:
        if was_training:
            optimizer.train()


def train_with_torch_optimizer(make_optimizer: Callable[[Params], torch.optim.Optimizer], task: Task, seed: int,
                               steps: int, *, eval_every: int = 10, eval_splits: Iterable[str] = (),
                               probe: Probe | None = None) -> TrainResult:
    """The same loop with a ``torch.optim`` optimizer, e.g. ``lambda p: torch.optim.Adam(p, lr=1e-2)``.

    The optimizer's ``.grad`` holds the mini-batch gradient when ``step`` is called. An
    optimizer class with ``uses_closure = True`` (SAM, Entropy-SGD) also gets a closure
    that re-evaluates the same mini-batch's loss at the current values and back-propagates.
    """
    holder: dict[str, object] = {}

    def step(params: list[Tensor], loss: Tensor, grads: list[Tensor], loss_fn: Callable[[Params], Tensor]
             ) -> list[Tensor]:
        if "opt" not in holder:
            holder["leaves"] = [p.clone().requires_grad_(True) for p in params]
            holder["opt"] = make_optimizer(holder["leaves"])  # type: ignore[arg-type]
        leaves: list[Tensor] = holder["leaves"]  # type: ignore[assignment]
        opt: torch.optim.Optimizer = holder["opt"]  # type: ignore[assignment]
        for leaf, g in zip(leaves, grads):
            leaf.grad = g.clone()
        if getattr(opt, "uses_closure", False):
            def closure() -> Tensor:
                with torch.enable_grad():
                    opt.zero_grad()
                    value = loss_fn(leaves)
                    value.backward()
                return value.detach()

            opt.step(closure)
        else:
            opt.step()
        return [leaf.detach().clone() for leaf in leaves]

    return _run(task, seed, steps, step, eval_every, eval_splits, probe)
