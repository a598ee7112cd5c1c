"""Entropy-SGD (Chaudhari, Choromanska, Soatto, LeCun, Baldassi, Borgs, Chayes, Sagun, Zecchina, ICLR 2017).

arXiv:1611.01838, Algorithm 1, with the optional γ scoping of its Section 4.3. Like
:class:`~flat_l2o_plugin.baselines.SAM` it re-evaluates the loss inside ``step``
(``uses_closure = True``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ._checks import Closure, non_negative, positive, require_closure

__all__ = ["EntropySGD"]


class EntropySGD(torch.optim.Optimizer):
    """Entropy-SGD (Chaudhari et al. 2017, Algorithm 1), descending the local entropy.

    One step from x, with γ_t = γ(1 + gamma_scoping)^t at the t-th step (t from 0):
    x' = μ = x; ``inner_steps`` times: the closure gives ∇f(x') (parameters are set to
    x' while it runs), x' ← x' − η'(∇f(x') − γ_t(x − x')) + √η'·noise·N(0, I),
    μ ← (1 − α)μ + αx'. Then the parameters are restored to x and take an SGD step
    (heavy-ball momentum, no dampening, no Nesterov) with the gradient γ_t(x − μ).

    The closure evaluates the loss at the current parameter values and populates
    ``.grad`` (zero grads, loss, backward, return loss). It may keep one mini-batch for
    the whole step (as the benchmark loop does) or draw a new one at each call, as
    Algorithm 1 does. Gradients populated before ``step`` are not used.

    Args:
        params: parameters or parameter groups (a group may override any option below
            except ``inner_steps``, ``generator`` and ``seed``).
        lr: η, the outer learning rate. For small steps and noise the outer gradient
            γ(x − μ) is about γ·η'·Σₖ α(1−α)^(L−k)·k·∇f (≈ 4.7·γ·η'·∇f at L = 5, α = 0.75),
            so η is of order 1 or more to match an SGD learning rate.
        gamma: γ, the scope (coupling of x' to x); larger is more local.
        inner_steps: L, the Langevin steps (closure calls) per step.
        inner_lr: η', the Langevin step size.
        noise: the Langevin noise scale (thermal noise √η'·noise); 0 makes it deterministic.
        alpha: the weight of the newest x' in the running average μ.
        momentum: the outer SGD momentum.
        gamma_scoping: γ grows by this factor per step (the paper's γ₁, e.g. 1e-3).
        generator: the ``torch.Generator`` for the noise (on the parameters' device,
            or on the CPU and moved); ``seed`` makes a CPU one. Neither: the global RNG.
    """

    uses_closure = True

    def __init__(self, params: Iterable[Any], lr: float, gamma: float = 0.03, inner_steps: int = 5,
                 inner_lr: float = 0.1, noise: float = 1e-4, alpha: float = 0.75, momentum: float = 0.0,
                 gamma_scoping: float = 0.0, generator: torch.Generator | None = None,
                 seed: int | None = None) -> None:
        positive("EntropySGD", lr=lr, inner_lr=inner_lr)
        non_negative("EntropySGD", gamma=gamma, noise=noise, gamma_scoping=gamma_scoping)
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ConfigError(f"EntropySGD: inner_steps must be an integer >= 1, got {inner_steps!r}")
        if not (isinstance(alpha, (int, float)) and 0 < alpha <= 1):
            raise ConfigError(f"EntropySGD: alpha must be in (0, 1], got {alpha!r}")
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ConfigError(f"EntropySGD: momentum must be in [0, 1), got {momentum!r}")
        if generator is not None and seed is not None:
            raise ConfigError("EntropySGD: generator and seed are exclusive: pass one of them")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ConfigError(f"EntropySGD: generator must be a torch.Generator, got {type(generator).__name__}")
        super().__init__(params, {"lr": lr, "gamma": gamma, "inner_lr": inner_lr, "noise": noise,
                                  "alpha": alpha, "momentum": momentum, "gamma_scoping": gamma_scoping})
        self.inner_steps = inner_steps
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else generator

    def _noise(self, p: Tensor) -> Tensor:
        device = self.generator.device if self.generator is not None else p.device
        return torch.randn(p.shape, generator=self.generator, device=device, dtype=p.dtype).to(p.device)

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """One Entropy-SGD step; returns the closure's loss at x (its first call, before any move)."""
        closure = require_closure("EntropySGD", closure)
        groups = [(g, [p for p in g["params"] if p.requires_grad]) for g in self.param_groups]
        for group, params in groups:
            for p in params:
                state = self.state[p]
                state.setdefault("step", 0)
                # γ_t is fixed for the whole step, inner loop and outer gradient alike.
                state["gamma_t"] = group["gamma"] * (1 + group["gamma_scoping"]) ** state["step"]
                state["x"] = p.detach().clone()
                state["mu"] = p.detach().clone()
        first_loss: Tensor | None = None
        for _ in range(self.inner_steps):
            self.zero_grad()
            loss = closure()  # at x' (the parameters hold x' during the inner loop)
            first_loss = loss if first_loss is None else first_loss
            for group, params in groups:
                lr_in, alpha = group["inner_lr"], group["alpha"]
                for p in params:
                    state = self.state[p]
                    # A parameter the loss does not reach feels only the coupling to x.
                    grad = p.grad if p.grad is not None else torch.zeros_like(p)
                    dx = grad - state["gamma_t"] * (state["x"] - p)
                    p.sub_(lr_in * dx)
                    if group["noise"] > 0:
                        p.add_(self._noise(p), alpha=math.sqrt(lr_in) * group["noise"])
                    state["mu"].mul_(1 - alpha).add_(p, alpha=alpha)
        for group, params in groups:
            for p in params:
                state = self.state[p]
                p.copy_(state["x"])
                d_p = state["gamma_t"] * (state["x"] - state.pop("mu"))
                p.grad = d_p  # so that .grad holds the step's direction afterwards
                if group["momentum"] > 0:
                    buf = state.get("momentum_buffer")
                    d_p = state["momentum_buffer"] = d_p.clone() if buf is None else buf.mul_(
                        group["momentum"]).add_(d_p)
                p.sub_(group["lr"] * d_p)
                del state["x"], state["gamma_t"]
                state["step"] += 1
        assert first_loss is not None
        return first_loss
