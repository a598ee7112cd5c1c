"""Imitation of a hand-designed optimizer, the second half of the "enhanced" L2O training.

Chen et al., "Training Stronger Baselines for Learning to Optimize" (NeurIPS 2020):
with probability p an unroll follows a *teacher* optimizer's trajectory instead of the
learned optimizer's, and the learned optimizer is trained to reproduce the teacher's
update at each iterate:

    L_imit = 1/K Σ_t mean_i (Δθ_learned,i − Δθ_teacher,i)² / lr²,

divided by the teacher's lr² so that the term is O(1) whatever the step size. The
learned optimizer's recurrent state advances along the teacher's trajectory, so it
sees the gradients it would see while imitating. Teachers: ``"adam"``, and ``"sam"``
(Adam at the SAM-perturbed point θ + ρ ĝ, Foret et al. 2021), for imitation of a
flatness-seeking optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ..protocols import LossFn
from ..wrappers.sam_gradient import gradient_at_sam_point
from ..wrappers.stack import gradient_oracle

__all__ = ["Teacher", "TEACHERS"]


@dataclass
class Teacher:
    """A functional Adam (optionally at the SAM point) whose state lives with a trajectory.

    Args:
        lr: Learning rate.
        betas: Adam's decay rates.
        eps: Adam's epsilon.
        rho: SAM radius; 0 is plain Adam.
    """

    lr: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    rho: float = 0.0
    _m: list[Tensor] = field(default_factory=list, repr=False)
    _v: list[Tensor] = field(default_factory=list, repr=False)
    _t: int = 0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"imitation teacher lr must be > 0, got {self.lr!r}")
        if self.rho < 0:
            raise ValueError(f"imitation teacher rho must be >= 0, got {self.rho!r}")

    def gradient(self, params: list[Tensor], grads: list[Tensor], loss_fn: LossFn) -> list[Tensor]:
        """The gradient the teacher steps with: ∇f(θ), or ∇f(θ + ρ ĝ) for SAM."""
        if self.rho == 0:
            return grads
        return gradient_at_sam_point(params, grads, gradient_oracle(loss_fn), self.rho)

    def state_dict(self) -> dict[str, Any]:
        """The moments (lists of tensors, not copies: :meth:`update` replaces them) and the step count."""
        return {"exp_avg": list(self._m), "exp_avg_sq": list(self._v), "step": self._t}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (a resumed trajectory keeps imitating)."""
        self._m, self._v, self._t = list(state["exp_avg"]), list(state["exp_avg_sq"]), int(state["step"])

    def update(self, params: list[Tensor], grads: list[Tensor], loss_fn: LossFn) -> list[Tensor]:
        """The teacher's step Δθ at ``params`` (detached)."""
        g = self.gradient(params, grads, loss_fn)
        if not self._m:
            self._m = [torch.zeros_like(x) for x in g]
            self._v = [torch.zeros_like(x) for x in g]
        b1, b2 = self.betas
        self._t += 1
        self._m = [b1 * m + (1 - b1) * x for m, x in zip(self._m, g)]
        self._v = [b2 * v + (1 - b2) * x * x for v, x in zip(self._v, g)]
        c1, c2 = 1 - b1**self._t, 1 - b2**self._t
        return [-self.lr * (m / c1) / ((v / c2).sqrt() + self.eps) for m, v in zip(self._m, self._v)]


TEACHERS: dict[str, Callable[..., Teacher]] = {
    "adam": lambda lr=1e-2, rho=0.0, **kw: Teacher(lr=lr, rho=0.0, **kw),
    "sam": lambda lr=1e-2, rho=0.05, **kw: Teacher(lr=lr, rho=rho, **kw),
}
