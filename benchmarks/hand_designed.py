"""Hand-designed flatness-seeking baselines, as ``torch.optim.Optimizer`` subclasses.

- :class:`SAM`: Sharpness-Aware Minimization (Foret, Kleiner, Mobahi, Neyshabur, ICLR 2021,
  arXiv:2010.01412), with the adaptive variant ASAM (Kwon, Kim, Park, Choi, ICML 2021,
  arXiv:2102.11600). The base step (SGD or Adam) is taken at θ with the gradient at θ + ε.
- :class:`EntropySGD`: Entropy-SGD (Chaudhari, Choromanska, Soatto, LeCun, Baldassi,
  Borgs, Chayes, Sagun, Zecchina, ICLR 2017, arXiv:1611.01838), Algorithm 1, with the
  optional γ scoping of its Section 4.3.

Both need the loss re-evaluated inside ``step``, so both set ``uses_closure = True``:
the benchmark loop (:func:`flat_l2o_plugin.training.evaluate.train_with_torch_optimizer`)
then passes a standard closure (zero grads, loss, backward, return loss) on the current
mini-batch. No maintained package provides these for current torch, hence this file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

Closure = Callable[[], Tensor]
_BASES: dict[str, type[torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


def _require_closure(name: str, closure: Closure | None) -> Closure:
    if closure is None:
        raise ValueError(f"closure is required: {name}.step(closure) re-evaluates the loss "
                         "(zero grads, loss, backward, return loss)")
    # step() runs under no_grad; the closure must build a graph.
    return torch.enable_grad()(closure)


def _positive(**values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _non_negative(**values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


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
        _positive(lr=lr)
        _non_negative(rho=rho)
        if base not in _BASES:
            raise ValueError(f"base must be one of {sorted(_BASES)}, got {base!r}")
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
        closure = _require_closure("SAM", closure)
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
        _positive(lr=lr, inner_lr=inner_lr)
        _non_negative(gamma=gamma, noise=noise, gamma_scoping=gamma_scoping)
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}")
        if not (isinstance(alpha, (int, float)) and 0 < alpha <= 1):
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if generator is not None and seed is not None:
            raise ValueError("generator and seed are exclusive: pass one of them")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
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
        closure = _require_closure("EntropySGD", closure)
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
