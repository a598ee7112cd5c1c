"""Tensor-list arithmetic and Hessian-vector products shared by the curvature regularizers.

Parameters stay a list of tensors (one per weight) rather than one flat vector: the
iterates come out of the learned optimizer as separate tensors in the meta-graph, and
concatenating them would add a copy per HVP.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from ..protocols import LossFn, Params


def as_graph_params(params: Params) -> list[Tensor]:
    """The params as a list, each one requiring grad.

    A tensor already in a graph (an iterate produced by a learned optimizer) is used as
    is, so the regularizer stays differentiable through it. A leaf that does not require
    grad is detached into a new leaf that does: the value is then a plain measurement.
    """
    out = []
    for p in params:
        out.append(p if p.requires_grad else p.detach().requires_grad_(True))
    return out


def seeded_generator(seed: int | None) -> torch.Generator:
    """A private CPU generator for an estimator's probes.

    Without an explicit seed it is seeded from torch's global RNG, once, at construction:
    ``torch.manual_seed`` then makes the whole run reproducible, and the estimator never
    draws from (or disturbs) the global stream afterwards.
    """
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator().manual_seed(int(seed))


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))  # type: ignore[return-value]


def norm(a: Sequence[Tensor]) -> Tensor:
    return torch.sqrt(sum((x * x).sum() for x in a))  # type: ignore[arg-type]


def scale(a: Sequence[Tensor], s: Tensor | float) -> list[Tensor]:
    return [x * s for x in a]


def axpy(alpha: Tensor | float, x: Sequence[Tensor], y: Sequence[Tensor]) -> list[Tensor]:
    """``alpha * x + y``."""
    return [alpha * xi + yi for xi, yi in zip(x, y)]


def normalized(a: Sequence[Tensor]) -> list[Tensor]:
    """``a / ‖a‖``; a zero ``a`` stays zero.

    No epsilon is added to the norm: ``a / (‖a‖ + ε)`` has norm 1 − ε/‖a‖, which biases
    every Rayleigh quotient vᵀHv by 2ε/‖a‖ relative, and so the error bounds that assume a
    unit v.
    """
    n = norm(a)
    n = n.clamp_min(torch.finfo(n.dtype).tiny)
    return [x / n for x in a]


def random_like(
    params: Sequence[Tensor], generator: torch.Generator | None, distribution: str = "gaussian"
) -> list[Tensor]:
    """Random probes shaped like ``params`` (``"gaussian"`` or ``"rademacher"``)."""
    out = []
    for p in params:
        # Draw on the CPU generator, then move: a CPU generator cannot feed CUDA kernels.
        if distribution == "gaussian":
            v = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        elif distribution == "rademacher":
            v = torch.randint(0, 2, p.shape, generator=generator).to(p.dtype) * 2 - 1
        else:
            raise ValueError(f"unknown probe distribution {distribution!r}; use 'gaussian' or 'rademacher'")
        out.append(v.to(p.device))
    return out


def gradient(loss_fn: LossFn, params: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """The loss and its gradient, kept in the graph so that HVPs can differentiate it."""
    loss = loss_fn(params)
    if loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar, got a tensor of shape {tuple(loss.shape)}")
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    return loss, grads


def hvp(
    grads: Sequence[Tensor], params: Sequence[Tensor], v: Sequence[Tensor], *, create_graph: bool
) -> list[Tensor]:
    """H v by differentiating ``<grads, v>`` (Pearlmutter's trick), with ``v`` treated as constant."""
    # A parameter the loss does not use has a constant (zero) gradient: it contributes nothing.
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    result = [torch.zeros_like(p) for p in params]
    if not live:
        return result
    out = torch.autograd.grad(
        [grads[i] for i in live], params, grad_outputs=[v[i].detach() for i in live],
        retain_graph=True, create_graph=create_graph, allow_unused=True,
    )
    return [r if h is None else h for h, r in zip(out, result)]


def flat_hessian(
    grads: Sequence[Tensor], params: Sequence[Tensor]
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], list[Tensor]]]:
    """H as an operator on flat vectors (no graph), and the split of a flat vector into params.

    Lanczos works on flat vectors; the HVP itself stays per tensor.
    """
    sizes = [p.numel() for p in params]

    def split(flat: Tensor) -> list[Tensor]:
        return [piece.view_as(p) for piece, p in zip(flat.split(sizes), params)]

    def matvec(flat: Tensor) -> Tensor:
        return torch.cat([h.reshape(-1) for h in hvp(grads, params, split(flat), create_graph=False)])

    return matvec, split
