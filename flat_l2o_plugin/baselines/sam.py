"""Sharpness-Aware Minimization (Foret, Kleiner, Mobahi, Neyshabur, ICLR 2021, arXiv:2010.01412).

With the adaptive variant ASAM (Kwon, Kim, Park, Choi, ICML 2021, arXiv:2102.11600). The
base step (SGD or Adam) is taken at θ with the gradient at θ + ε. It needs the loss
re-evaluated inside ``step``, so it sets ``uses_closure = True``: the evaluation loop
(:func:`flat_l2o_plugin.training.evaluate.train_with_torch_optimizer`) then passes a
standard closure (zero grads, loss, backward, return loss) on the current mini-batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ._checks import Closure, non_negative, positive, require_closure

__all__ = ["SAM"]

_BASES: dict[str, type[torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization around an internal SGD or Adam.

    One step, with g the gradient at θ and ‖·‖ the norm over all parameters together:
    ε = ρ g/‖g‖ (or, ``adaptive``, ε = ρ θ²g/‖|θ|g‖), then the gradient at θ + ε is
    computed by the closure, θ is restored exactly (from a copy, not by subtracting ε)
    and the base optimizer steps from θ with that gradient. With ‖g‖ = 0, ε = 0.

    Protocol: the caller has usually populated ``.grad`` at θ already (loss.backward()
    on the mini-batch); ``step(closure)`` uses it when every parameter that requires a
    gradient has one, and otherwise calls the closure at θ first. The closure must
    re-evaluate the SAME mini-batch (a different batch would not be SAM's ascent step).

    Args:
        params: parameters or parameter groups (a group may override ``rho``/``adaptive``
            and any base option).
        lr: the base optimizer's learning rate.
        rho: the radius of the perturbation; 0 gives the base optimizer exactly
            (at twice the cost).
        base: ``"sgd"`` (``torch.optim.SGD``) or ``"adam"`` (``torch.optim.Adam``).
        adaptive: ASAM's scale-invariant perturbation (Kwon et al. use a larger ρ, e.g. 0.5-2).
        **base_kwargs: passed to the base optimizer (``momentum``, ``betas``, ``weight_decay``...).
    """

    uses_closure = True

    def __init__(self, params: Iterable[Any], lr: float, rho: float = 0.05, base: str = "sgd",
                 adaptive: bool = False, **base_kwargs: Any) -> None:
        positive("SAM", lr=lr)
        non_negative("SAM", rho=rho)
        if base not in _BASES:
            raise ConfigError(f"SAM: base must be one of {sorted(_BASES)}, got {base!r}")
        super().__init__(params, {"lr": lr, "rho": rho, "adaptive": bool(adaptive)})
        # The base optimizer shares our group dicts, so a scheduler changing
        # ``lr`` in ``param_groups`` changes the base step too.
        self.base_optimizer = _BASES[base](self.param_groups, lr=lr, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "base_optimizer"):  # after __init__: the base fills in its own defaults
            self.base_optimizer.add_param_group(self.param_groups.pop())

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    @torch.no_grad()
    def _perturbation(self) -> list[tuple[Tensor, Tensor]]:
        """(parameter, ε) for every parameter with a gradient."""
        scaled = [(p, p.grad * p.abs() if group["adaptive"] else p.grad, group)
                  for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not scaled:
            return []
        device = scaled[0][0].device
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(s).to(device) for _, s, _ in scaled]))
        # No host sync: a zero gradient gives ε = 0 rather than a division by zero.
        inv = torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))
        out = []
        for p, s, group in scaled:
            direction = s * p.abs() if group["adaptive"] else s  # θ²g in ASAM, g in SAM
            out.append((p, direction * (group["rho"] * inv.to(p.device))))
        return out

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """One SAM step; returns the closure's loss at the perturbed point θ + ε."""
        closure = require_closure("SAM", closure)
        if any(p.grad is None for p in self._params()):
            self.zero_grad()
            closure()
        perturbation = self._perturbation()
        saved = [(p, p.detach().clone()) for p, _ in perturbation]
        for p, eps in perturbation:
            p.add_(eps)
        self.zero_grad()  # in case the closure does not zero the gradients itself
        loss = closure()
        for p, theta in saved:
            p.copy_(theta)
        self.base_optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        # SAM keeps no state between steps (ε lives inside step); all of it is the base's,
        # whose groups are ours and so carry rho and adaptive too.
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
