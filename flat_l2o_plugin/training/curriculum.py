"""The trajectory-length curriculum of the "enhanced" L2O training.

Chen et al., "Training Stronger Baselines for Learning to Optimize" (NeurIPS 2020),
train on short optimizee trajectories first and lengthen them in stages (e.g. 100 →
200 → 500 → 1000 steps). Progression is driven by validation: a stage ends once the
validation score has not improved for ``patience`` consecutive validations, and the
next stage starts from the best weights seen so far (best-checkpoint restore).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Curriculum"]


@dataclass
class Curriculum:
    """Stages of trajectory length and the validation rule that advances them.

    Args:
        horizons: Trajectory lengths T, one per stage, increasing; each a multiple of the
            unroll length.
        patience: Validations without improvement that end a stage.
    """

    horizons: tuple[int, ...]
    patience: int = 1
    stage: int = 0
    _stale: int = 0
    _stage_best: float = float("-inf")

    def __post_init__(self) -> None:
        self.horizons = tuple(int(h) for h in self.horizons)
        if not self.horizons or any(h < 1 for h in self.horizons):
            raise ValueError(f"curriculum horizons must be positive integers, got {self.horizons!r}")
        if list(self.horizons) != sorted(self.horizons):
            raise ValueError(f"curriculum horizons must increase, got {self.horizons!r}")
        if self.patience < 1:
            raise ValueError(f"curriculum patience must be >= 1, got {self.patience!r}")

    @property
    def horizon(self) -> int:
        return self.horizons[self.stage]

    @property
    def finished(self) -> bool:
        return self.stage == len(self.horizons) - 1

    def observe(self, score: float) -> bool:
        """Record a validation score (higher is better); return True if the stage advanced."""
        if score > self._stage_best:
            self._stage_best, self._stale = score, 0
            return False
        self._stale += 1
        if self._stale < self.patience or self.finished:
            return False
        self.stage += 1
        self._stale, self._stage_best = 0, float("-inf")
        return True

    def state_dict(self) -> dict[str, float | int]:
        return {"stage": self.stage, "stale": self._stale, "stage_best": self._stage_best}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.stage, self._stale, self._stage_best = int(state["stage"]), int(state["stale"]), float(state["stage_best"])
