"""A random quadratic with a chosen condition number: curvature known in closed form.

    f(θ) = ½ (θ − θ*)ᵀ A (θ − θ*),    A = Q diag(λ) Qᵀ,

with ``Q`` a random rotation, eigenvalues ``λ`` log-spaced from 1 down to ``1/κ`` (so
the largest is 1 and the condition number is exactly ``κ``), and a random minimizer
``θ*``; both are fixed by ``problem_seed``, while ``init_params(seed)`` draws the start
``θ_0 ~ N(0, I)``. The Hessian is ``A`` everywhere, so flatness estimators can be checked
against its exact spectrum (``task.hessian``, ``task.eigenvalues``).

Batches. With ``noise_std = 0`` the problem is deterministic and a batch is a zero
shift. Otherwise a batch holds ``batch_size`` perturbations ``ξ ~ N(0, noise_std² I)`` of
the minimizer and the mini-batch loss is ``mean_ξ ½ (θ − θ* − ξ)ᵀ A (θ − θ* − ξ)``: an
unbiased estimate of ``∇f`` with noise of covariance ``A² noise_std² / batch_size``,
like data noise in a real model. ``evaluate`` reports the noise-free objective on every
split: there is no data, so the splits coincide.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ConfigError
from ..protocols import Params
from .data import check_split, positive_int

__all__ = ["QuadraticTask"]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class QuadraticTask:
    """Args:
        dim: Number of parameters.
        condition_number: κ = λ_max / λ_min of ``A`` (>= 1).
        noise_std: Standard deviation of the minimizer's per-example perturbation; 0
            makes the task deterministic.
        batch_size: Perturbations per batch.
        problem_seed: Seeds ``A`` and ``θ*``.
    """

    def __init__(self, dim: int = 20, condition_number: float = 100.0, noise_std: float = 0.0,
                 batch_size: int = 1, problem_seed: int = 0) -> None:
        owner = "QuadraticTask"
        positive_int(owner, "dim", dim)
        positive_int(owner, "batch_size", batch_size)
        positive_int(owner, "problem_seed", problem_seed, minimum=0)
        if not _is_number(condition_number) or not 1 <= condition_number < math.inf:
            raise ConfigError(f"{owner}: condition_number must be a finite number >= 1, got {condition_number!r}")
        if not _is_number(noise_std) or not noise_std >= 0:
            raise ConfigError(f"{owner}: noise_std must be a number >= 0, got {noise_std!r}")
        self.dim, self.condition_number, self.noise_std = dim, float(condition_number), float(noise_std)
        self.batch_size, self.problem_seed = batch_size, problem_seed
        g = torch.Generator().manual_seed(problem_seed)
        # QR of a Gaussian matrix, with the signs of R's diagonal folded into Q, is a
        # uniformly random rotation; float64 keeps A symmetric to rounding.
        q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r))
        eigenvalues = torch.logspace(0.0, -math.log10(self.condition_number), dim, dtype=torch.float64)
        hessian = (q * eigenvalues) @ q.T
        self.eigenvalues = eigenvalues.to(torch.float32)
        self.hessian = (0.5 * (hessian + hessian.T)).to(torch.float32)
        self.minimizer = torch.randn(dim, generator=g)
        self.name = f"quadratic[d={dim},cond={self.condition_number:g}]"

    def __repr__(self) -> str:
        return f"QuadraticTask({self.name})"

    def init_params(self, seed: int) -> list[Tensor]:
        return [torch.randn(self.dim, generator=torch.Generator().manual_seed(int(seed)))]

    def sample_batch(self, generator: torch.Generator) -> Tensor:
        if self.noise_std == 0:
            return torch.zeros(self.batch_size, self.dim)
        return self.noise_std * torch.randn(self.batch_size, self.dim, generator=generator)

    def full_batch(self, split: str = "train") -> Tensor:
        """A zero shift: the loss on it is the noise-free objective ``f``."""
        check_split(self.name, split)
        return torch.zeros(1, self.dim)

    def loss(self, params: Params, batch: Tensor) -> Tensor:
        (theta,) = params
        hessian = self.hessian.to(theta)
        residual = theta - self.minimizer.to(theta) - batch.to(theta)
        return 0.5 * ((residual @ hessian) * residual).sum(dim=-1).mean()

    @torch.no_grad()
    def evaluate(self, params: Params, split: str = "test") -> dict[str, float]:
        """``loss`` (= f(θ) − f(θ*), noise-free), ``distance`` to θ* and ``grad_norm``."""
        check_split(self.name, split)
        (theta,) = (p.detach() for p in params)
        offset = theta - self.minimizer.to(theta)
        gradient = self.hessian.to(theta) @ offset
        return {"loss": float(0.5 * offset @ gradient), "distance": float(offset.norm()),
                "grad_norm": float(gradient.norm())}
