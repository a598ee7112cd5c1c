"""One in-flight optimizee trajectory of the meta-trainer: what an unroll advances and a checkpoint holds."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..protocols import Task
from .imitation import Teacher

__all__ = ["Trajectory"]


@dataclass
class Trajectory:
    """An optimizee being trained by the learned optimizer, between two resets.

    Attributes:
        task: The optimizee.
        seed: Its init seed.
        params: The current iterate θ_t (detached between unrolls).
        state: The learned optimizer's state for this optimizee.
        generator: The optimizee's mini-batch stream.
        horizon: Steps before the trajectory is reset.
        slot: The meta-batch slot it belongs to.
        sample_state: The slot generator's state when the task was drawn, so that a
            resume can draw the same task again instead of saving the task object.
        step: Optimizee steps taken so far.
        initial_loss: The loss at θ_0 (for schedules that scale with it).
        teacher: The imitation teacher's state, once an imitation unroll ran.
    """

    task: Task
    seed: int
    params: list[Tensor]
    state: dict[str, Tensor]
    generator: torch.Generator
    horizon: int
    slot: int = 0
    sample_state: Tensor | None = None
    step: int = 0
    initial_loss: float | None = None
    teacher: Teacher | None = None
