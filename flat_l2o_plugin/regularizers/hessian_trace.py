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
from ._batched import batched_losses
from ._hvp import as_graph_params, gradient, random_like, seeded_generator
from .finite_difference import check_products, step_length

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

    Two ways to form the products :math:`v_i^\top H v_i`, both batched over the probes:

    ``products="hvp"`` (the default)
        All ``m`` Hessian-vector products from one batched backward pass through the
        gradient graph (``is_grads_batched``), itself kept in the graph: exact to
        rounding, and backpropagating it is a third-order derivative of the loss, which
        torch gets wrong for LayerNorm (ViTs) and refuses for BatchNorm.
    ``products="finite_difference"``
        :math:`\lVert v_i\rVert^2\, u_i^\top(\nabla f(\theta + s u_i) - \nabla f(\theta))/s`
        along the unit :math:`u_i = v_i/\lVert v_i\rVert`
        (:mod:`~flat_l2o_plugin.regularizers.finite_difference`): the loss at the ``m``
        shifted points in one ``vmap``-ed forward pass (a loop when the loss cannot be
        vmapped), their gradients in one backward pass kept in the graph. Its
        derivative needs second derivatives only, so it is right for LayerNorm models
        and works for BatchNorm ones; about half the cost of the HVP form on the conv
        net. Not the default: along random directions the curvature is small, and on
        piecewise-linear networks (ReLU, max-pooling) the kinks the step crosses
        dominate it. On conv-digits no step h brings the meta-gradient within cosine
        0.99 of the exact one (``benchmarks/regularizer_cost.py``, part 4), where on
        MLP-digits it is above 0.9999. Use it for LayerNorm and BatchNorm models.

    Either way the gradient at θ is the host's when it hands it over (``grads``),
    else computed here (one forward and one backward pass); memory grows linearly in
    ``m``.

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
        products: ``"hvp"`` (default) or ``"finite_difference"`` (above).
        fd_step: The relative step h of the finite differences, s = h·(1 + ‖θ‖) (default:
            by the params' dtype, see
            :func:`~flat_l2o_plugin.regularizers.finite_difference.default_relative_step`).
        vectorize: Evaluate the shifted points with ``torch.func.vmap`` when the loss
            allows it; cleared after the first call that cannot be vmapped.

    Attributes:
        last_value: the latest estimate, as a float for logging (``None`` before the
            first call).
    """

    def __init__(self, probes: int = 8, distribution: str = "rademacher", seed: int | None = None,
                 products: str = "hvp", fd_step: float | None = None, vectorize: bool = True) -> None:
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
            raise ConfigError(f"HessianTrace: probes must be a positive integer, got {probes!r}")
        if distribution not in _DISTRIBUTIONS:
            raise ConfigError(
                f"HessianTrace: distribution must be one of {_DISTRIBUTIONS}, got {distribution!r}"
            )
        check_products("HessianTrace", products, fd_step)
        self.probes = probes
        self.distribution = distribution
        self.generator = seeded_generator(seed)
        self.products, self.fd_step = products, None if fd_step is None else float(fd_step)
        self.vectorize = vectorize
        self.last_value: float | None = None

    def __repr__(self) -> str:
        return f"HessianTrace(probes={self.probes}, distribution={self.distribution!r}, products={self.products!r})"

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
        if self.products == "finite_difference":
            estimate = self._finite_differences(params, loss_fn, grads, probes)
        else:
            estimate = self._hvps(params, grads, probes)
        self.last_value = float(estimate.detach())
        return estimate

    def _finite_differences(self, params: list[Tensor], loss_fn: LossFn, grads: list[Tensor],
                            probes: list[Tensor]) -> Tensor:
        m = self.probes
        squared = torch.stack([(v * v).reshape(m, -1).sum(dim=1) for v in probes]).sum(dim=0)
        shape = [(m,) + (1,) * p.dim() for p in params]
        step = step_length(params, self.fd_step)
        # The steps actually taken, δ_i = fl(θ + s·u_i) − θ, as in finite_difference.
        base = [p.detach().unsqueeze(0) for p in params]
        delta = [(b + (step / squared.sqrt()).view(s) * v) - b for b, v, s in zip(base, probes, shape)]
        points = [p.unsqueeze(0) + d for p, d in zip(params, delta)]
        losses, self.vectorize = batched_losses(loss_fn, points, self.vectorize)
        # Each loss depends on its own point only, so this is every point's gradient.
        far = torch.autograd.grad(losses.sum(), points, create_graph=True, allow_unused=True)
        far = [torch.zeros_like(x) if f is None else f for f, x in zip(far, points)]
        along = torch.stack([(d * (f - g.unsqueeze(0))).reshape(m, -1).sum(dim=1)
                             for d, f, g in zip(delta, far, grads)]).sum(dim=0)
        lengths = torch.stack([(d * d).reshape(m, -1).sum(dim=1) for d in delta]).sum(dim=0)
        # vᵀHv = ‖v‖²·uᵀHu, each quotient taken along the realized δ_i.
        estimate = (squared * along / lengths).mean()
        if not estimate.requires_grad:
            # An affine loss has constant gradients: keep the (zero) result in the graph.
            estimate = estimate + torch.stack([(p * 0).sum() for p in params]).sum()
        return estimate

    def _hvps(self, params: list[Tensor], grads: list[Tensor], probes: list[Tensor]) -> Tensor:
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
        return estimate
