"""The SAM-gradient wrapper: flatness sought by the update rule itself, at test time too.

Sharpness-aware minimization (Foret et al., ICLR 2021) steps with the gradient taken at
the worst nearby point, θ + ρ·ĝ with ĝ = ∇f(θ)/‖∇f(θ)‖, rather than at θ. This wrapper
gives any learned optimizer that gradient instead of ∇f(θ), in meta-training and in
deployment alike, so the learned rule is trained on, and then runs on, SAM gradients.
The meta-loss regularizers shape only what the optimizer is trained *towards*; this
changes what it *sees*, and it costs one extra gradient per step at test time.

The protocol's ``step(params, grads, state)`` carries no loss, so the host hands the
wrapper a gradient oracle for the current mini-batch: ``grad_fn(params) -> grads``
(detached), passed as a keyword of ``step``. :func:`~.stack.host_step` does that for
any host; :class:`~flat_l2o_plugin.training.MetaTrainer` and the evaluation loop use
it, and the ``torch.optim`` face builds the oracle from the closure given to ``step``.
A host that already passes ``loss_fn=`` (the flatness-aware wrapper's explicit
protocol) also works: the gradient is then taken from ``loss_fn``. The imitation
teacher's SAM step (:mod:`~flat_l2o_plugin.training.imitation`) uses the same
:func:`gradient_at_sam_point`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..protocols import LossFn, Params
from .stack import GradFn, LearnedOptimizerWrapper, gradient_oracle

__all__ = ["SAMGradient", "sam_perturbation", "gradient_at_sam_point"]


def sam_perturbation(params: Params, grads: Params, rho: float, *, adaptive: bool = False) -> list[Tensor]:
    """SAM's ε = ρ·g/‖g‖, or ASAM's ρ·θ²⊙g/‖θ⊙g‖ with ``adaptive``; the norm spans all tensors.

    At a stationary point (or with a non-finite gradient) there is no direction to
    perturb in, and ε is zero rather than NaN.
    """
    with torch.no_grad():
        weights = [p.detach().abs() for p in params] if adaptive else None
        scaled = [w * g for w, g in zip(weights, grads)] if weights is not None else list(grads)
        norm = torch.sqrt(sum(x.pow(2).sum() for x in scaled))
        if not torch.isfinite(norm) or norm == 0:
            return [torch.zeros_like(g) for g in grads]
        directions = [w * x for w, x in zip(weights, scaled)] if weights is not None else scaled
        return [rho * d / norm for d in directions]


def gradient_at_sam_point(params: Params, grads: Params, grad_fn: GradFn, rho: float, *,
                          adaptive: bool = False) -> list[Tensor]:
    """∇f(θ + ε) from a gradient oracle, detached and in the dtypes of ``grads``."""
    eps = sam_perturbation(params, grads, rho, adaptive=adaptive)
    perturbed = [(p.detach() + e).to(p.dtype) for p, e in zip(params, eps)]
    return [g.detach().to(old.dtype) for g, old in zip(grad_fn(perturbed), grads)]


class SAMGradient(LearnedOptimizerWrapper):
    """Feed the wrapped learned optimizer ∇f(θ + ρ·ĝ) instead of ∇f(θ).

    Args:
        optimizer: The learned optimizer to wrap (weights and state are unchanged, so a
            pretrained model loads into the wrapper as is).
        rho: The SAM radius ρ; 0 passes the plain gradient through (no extra cost).
        adaptive: ASAM's scale-invariant perturbation (Kwon et al., 2021),
            ε = ρ·θ²⊙g / ‖θ⊙g‖, instead of ρ·g/‖g‖.

    Raises:
        ConfigError: ``rho`` negative or not finite; at ``step``, no ``grad_fn`` or
            ``loss_fn`` from the host while ``rho > 0``.

    Example:
        >>> sam = SAMGradient(create_optimizer("rnnprop"), rho=0.05)
        >>> new_params, state = sam.step(params, grads, state, grad_fn=grad_fn)
    """

    def __init__(self, optimizer: nn.Module, rho: float = 0.05, adaptive: bool = False) -> None:
        super().__init__(optimizer)
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 0:
            raise ConfigError(f"sam_gradient.rho must be a finite number >= 0, got {rho!r}")
        if not isinstance(adaptive, bool):
            raise ConfigError(f"sam_gradient.adaptive must be true or false, got {adaptive!r}")
        self.rho, self.adaptive = float(rho), adaptive

    @property
    def needs_grad_fn(self) -> bool:  # type: ignore[override]
        """The gradient at θ + ε comes from the host's oracle, unless ρ = 0."""
        return self.rho != 0

    def extra_repr(self) -> str:
        return f"wrapping {type(self.inner).__name__}, rho={self.rho:g}" + (", adaptive" if self.adaptive else "")

    def perturbation(self, params: Params, grads: Params) -> list[Tensor]:
        """ε, the step from θ to the point whose gradient the wrapped optimizer sees."""
        return sam_perturbation(params, grads, self.rho, adaptive=self.adaptive)

    def sam_gradient(self, params: Params, grads: Params, grad_fn: GradFn) -> list[Tensor]:
        """∇f(θ + ε) from the host's gradient oracle, detached."""
        return gradient_at_sam_point(params, grads, grad_fn, self.rho, adaptive=self.adaptive)

    def step(self, params: Params, grads: Params, state: Mapping[str, Tensor], *,
             grad_fn: GradFn | None = None, loss_fn: LossFn | None = None,
             **host_info: Any) -> tuple[list[Tensor], dict[str, Tensor]]:
        """One step of the wrapped optimizer on the SAM gradient.

        Args:
            params: The iterate θ_t.
            grads: ∇f(θ_t) on the current mini-batch.
            state: The wrapped optimizer's state.
            grad_fn: ``grad_fn(params)``, the current mini-batch's gradient at any point.
            loss_fn: Used for the gradient when no ``grad_fn`` is given.
            **host_info: Passed on to wrappers nested inside this one.
        """
        forwarded = {"grad_fn": grad_fn, "loss_fn": loss_fn, **host_info}
        if self.rho == 0:
            return self.inner_step(params, grads, state, **forwarded)
        oracle = grad_fn if grad_fn is not None else (gradient_oracle(loss_fn) if loss_fn is not None else None)
        if oracle is None:
            raise ConfigError("sam_gradient: the host passed neither grad_fn= nor loss_fn= to step(), so the "
                              "gradient at the perturbed point cannot be taken; call the optimizer through "
                              "flat_l2o_plugin.wrappers.host_step(optimizer, params, grads, state, loss_fn=...), "
                              "or, with LearnedOptimizerTorch, pass a closure to step(closure)")
        return self.inner_step(params, self.sam_gradient(params, grads, oracle), state, **forwarded)

