"""First-order (SAM-style) sharpness: how much the loss rises one step uphill."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from ..protocols import LossFn, Params
from ._hvp import as_graph_params, axpy, normalized

__all__ = ["Sharpness"]


class Sharpness:
    r"""The loss increase after a step of length :math:`\rho` along the gradient.

    .. math::

        S_\rho(\theta) = f(\theta + \rho \hat g) - f(\theta),
        \qquad \hat g = \operatorname{stopgrad}\Big(\frac{\nabla f(\theta)}
            {\lVert \nabla f(\theta) \rVert}\Big),

    with the norm taken over all parameter tensors together. The ascent direction is the
    first-order solution of :math:`\max_{\lVert\epsilon\rVert \le \rho} f(\theta +
    \epsilon)` used by sharpness-aware minimization (Foret et al., ICLR 2021). For small
    :math:`\rho`, :math:`S_\rho \approx \rho \lVert \nabla f \rVert + \tfrac{\rho^2}{2}
    \hat g^\top \nabla^2 f\, \hat g`: away from a minimum it is dominated by the gradient
    norm, and near one by the curvature along the gradient.

    :math:`\hat g` is treated as a constant, as SAM does, so no second-order graph is
    built: the result's gradient is :math:`\nabla f(\theta + \rho\hat g) - \nabla
    f(\theta)`, through both loss evaluations. Cost per call: two forward passes and
    one backward pass (for :math:`\hat g`), plus the caller's backward through both
    forwards. A host that hands over its ``loss`` at θ (and ``grads``) leaves one
    forward pass (at θ + ρĝ).

    Reference: Foret, Kleiner, Mobahi and Neyshabur, "Sharpness-Aware Minimization for
    Efficiently Improving Generalization", ICLR 2021.

    Args:
        rho: radius :math:`\rho > 0` of the ascent step, in parameter units. 0.05 is
            SAM's default for networks of ordinary weight scale.
        seed: accepted so that every regularizer is built with the same arguments; the
            estimate is deterministic and draws nothing.

    Attributes:
        last_value: the latest sharpness, as a float for logging (``None`` before the
            first call).
    """

    def __init__(self, rho: float = 0.05, seed: int | None = None) -> None:
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho <= 0:
            raise ConfigError(f"Sharpness: rho must be a finite positive number, got {rho!r}")
        self.rho = float(rho)
        self.seed = seed
        self.last_value: float | None = None

    def __repr__(self) -> str:
        return f"Sharpness(rho={self.rho})"

    def __call__(self, params: Params, loss_fn: LossFn, *, loss: Tensor | None = None,
                 grads: Sequence[Tensor] | None = None) -> Tensor:
        """The sharpness at ``params``, a 0-dim tensor differentiable in ``params``.

        ``loss`` (f at ``params``, in their graph) and ``grads`` (its gradient) are the
        host's, when it has them; otherwise they are computed here.
        """
        params = as_graph_params(params)
        if loss is None:
            loss = loss_fn(params)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar, got a tensor of shape {tuple(loss.shape)}")
        if grads is None:
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]
        # A zero gradient gives a zero direction (see normalized) and zero sharpness.
        direction = normalized(grads)
        perturbed_loss = loss_fn(axpy(self.rho, direction, params))
        value = perturbed_loss - loss
        self.last_value = float(value.detach())
        return value
