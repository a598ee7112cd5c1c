"""The d-dimensional Rosenbrock function, deterministic or with unbiased gradient noise.

    f(x) = Σ_{i=1}^{d-1} [ 100 (x_{i+1} − x_i²)² + (1 − x_i)² ],

minimized at ``x = (1, ..., 1)`` with ``f = 0``: a curved, badly conditioned valley that
learned optimizers are classically tested on. ``init_params(seed)`` draws the start
uniformly in ``[-2, 2]^d``.

Batches. With ``noise_std = 0`` a batch is a zero shift and the task is deterministic.
Otherwise a batch holds ``batch_size`` rows ``ξ ~ N(0, noise_std² I_{d-1})`` and the
mini-batch loss replaces each target 1 by ``1 + ξ_i`` and averages over the rows. Its
expectation is ``f(x) + (d − 1) noise_std²``, so its gradient is an unbiased estimate of
``∇f``. ``evaluate`` reports the noise-free ``f`` on every split (there is no data).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from ..protocols import Params
from .data import check_split, positive_int

__all__ = ["RosenbrockTask"]


class RosenbrockTask:
    """Args:
        dim: Number of coordinates (>= 2).
        noise_std: Standard deviation of the targets' perturbation; 0 makes the task
            deterministic.
        batch_size: Perturbation rows per batch.
    """

    def __init__(self, dim: int = 2, noise_std: float = 0.0, batch_size: int = 1) -> None:
        positive_int("RosenbrockTask", "dim", dim, minimum=2)
        positive_int("RosenbrockTask", "batch_size", batch_size)
        if not isinstance(noise_std, (int, float)) or isinstance(noise_std, bool) or not noise_std >= 0:
            raise ConfigError(f"RosenbrockTask: noise_std must be a number >= 0, got {noise_std!r}")
        self.dim, self.noise_std, self.batch_size = dim, float(noise_std), batch_size
        self.name = f"rosenbrock[d={dim}{f',noise={self.noise_std:g}' if noise_std else ''}]"

    def __repr__(self) -> str:
        return f"RosenbrockTask({self.name})"

    def init_params(self, seed: int) -> list[Tensor]:
        return [torch.rand(self.dim, generator=torch.Generator().manual_seed(int(seed))) * 4 - 2]

    def sample_batch(self, generator: torch.Generator) -> Tensor:
        if self.noise_std == 0:
            return torch.zeros(self.batch_size, self.dim - 1)
        return self.noise_std * torch.randn(self.batch_size, self.dim - 1, generator=generator)

    def full_batch(self, split: str = "train") -> Tensor:
        """A zero shift: the loss on it is the noise-free ``f``."""
        check_split(self.name, split)
        return torch.zeros(1, self.dim - 1)

    def loss(self, params: Params, batch: Tensor) -> Tensor:
        (x,) = params
        head, tail = x[:-1], x[1:]
        valley = 100.0 * (tail - head**2) ** 2
        target = 1.0 + batch.to(x)
        return (valley + (target - head) ** 2).sum(dim=-1).mean()

    @torch.no_grad()
    def evaluate(self, params: Params, split: str = "test") -> dict[str, float]:
        """``loss`` (noise-free f) and ``distance`` to the minimizer (1, ..., 1)."""
        check_split(self.name, split)
        (x,) = (p.detach() for p in params)
        return {"loss": float(self.loss([x], self.full_batch(split))), "distance": float((x - 1).norm())}
