"""Hutchinson's estimate of the trace of the loss Hessian, as a flatness regularizer.

The trace is the sum of the Hessian's eigenvalues: it measures the curvature of the
loss in every direction at once, where the top eigenvalue measures only the sharpest
one. It is one of the two flatness measures that "Learning to Generalize Provably in
Learning to Optimize" (Yang et al., AISTATS 2023) adds to the meta-objective of a
learned optimizer.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from ..protocols import LossFn, Params
from ._hvp import as_graph_params, gradient, random_like, seeded_generator

__all__ = ["HessianTrace"]

_DISTRIBUTIONS = ("rademacher", "gaussian")


class HessianTrace:
    r"""Hutchinson's stochastic estimate of :math:`\operatorname{tr} \nabla^2 f(\theta)`.

    For probes :math:`v_1, \dots, v_m` with :math:`\mathbb{E}[v v^\top] = I`,

    .. math::

        \operatorname{tr} H \approx \frac{1}{m} \sum_{i=1}^{m} v_i^\top H v_i,
        \qquad H = \nabla^2 f(\theta),

    which is unbiased (Hutchinson, 1989). Its variance is
    :math:`\frac{2}{m} \sum_{i \ne j} H_{ij}^2` for Rademacher probes and
    :math:`\frac{2}{m} \lVert H \rVert_F^2` for Gaussian ones, so Rademacher probes are
    never worse and are the default. Fresh probes are drawn on every call.

    All ``m`` Hessian-vector products come from one batched backward pass through the
    gradient graph (``is_grads_batched``), and that pass is itself kept in the graph, so
    the estimate is differentiable in ``params`` (a third-order derivative of the loss
    when it is backpropagated). Cost per call: one forward and one backward pass to get
    the gradient, then one batched double-backward over the ``m`` probes; memory grows
    linearly in ``m``.

    Reference: Yang, Chen, Wang, Ye and Wang, "Learning to Generalize Provably in
    Learning to Optimize", AISTATS 2023 (Hessian-based flatness regularizer).

    Args:
        probes: number of probe vectors ``m`` per call. Eight keeps the estimator's
            relative standard deviation near ``1/sqrt(8)`` of the single-probe one at a
            memory cost that stays small for the optimizees used in meta-training.
        distribution: ``"rademacher"`` (entries ±1) or ``"gaussian"`` (standard normal).
        seed: seed of this instance's own ``torch.Generator``; ``None`` draws one from
            torch's global RNG at construction, so ``torch.manual_seed`` makes it
            reproducible. The estimator never draws from the global stream afterwards.

    Attributes:
        last_value: the latest estimate, as a float for logging (``None`` before the
            first call).
    """

    def __init__(self, probes: int = 8, distribution: str = "rademacher", seed: int | None = None) -> None:
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
            raise ConfigError(f"HessianTrace: probes must be a positive integer, got {probes!r}")
        if distribution not in _DISTRIBUTIONS:
            raise ConfigError(
                f"HessianTrace: distribution must be one of {_DISTRIBUTIONS}, got {distribution!r}"
            )
        self.probes = probes
        self.distribution = distribution
        self.generator = seeded_generator(seed)
        self.last_value: float | None = None

    def __repr__(self) -> str:
        return f"HessianTrace(probes={self.probes}, distribution={self.distribution!r})"

    def __call__(self, params: Params, loss_fn: LossFn, *, grads: Sequence[Tensor] | None = None) -> Tensor:
        """The trace estimate at ``params``, a 0-dim tensor differentiable in ``params``.

        ``grads``: ∇f at ``params`` with its graph, if the host has it (else computed).
        """
        params = as_graph_params(params)
        grads = gradient(loss_fn, params)[1] if grads is None else list(grads)
        # ``expand`` gives the batched shape without allocating: random_like only reads
        # shape, dtype and device.
        probes = random_like(
            [p.detach().expand(self.probes, *p.shape) for p in params], self.generator, self.distribution
        )
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        per_tensor: list[Tensor] = []
        if live:
            hvps = torch.autograd.grad(
                [grads[i] for i in live], params, grad_outputs=[probes[i] for i in live],
                is_grads_batched=True, retain_graph=True, create_graph=True, allow_unused=True,
            )
            per_tensor = [
                (v * hv).reshape(self.probes, -1).sum(dim=1)
                for v, hv in zip(probes, hvps)
                if hv is not None
            ]
        if per_tensor:
            estimate = torch.stack(per_tensor).sum(dim=0).mean()
        else:
            # The loss is affine in every parameter, so the Hessian is zero. Multiplying
            # the params by zero keeps the result in the graph for callers that backprop.
            estimate = torch.stack([(p * 0).sum() for p in params]).sum()
        self.last_value = float(estimate.detach())
        return estimate
