"""Curvature along a direction from a difference of two gradients, with a second-order meta-gradient.

The curvature regularizers need uᵀH(θ)u, differentiable in θ. Built as a Hessian-vector
product (``create_graph=True``), its derivative differentiates the HVP once more: a
third-order derivative of the optimizee's loss. That is the costliest backward of a
curvature term, and torch gets it wrong or refuses it for two common layers (up to at
least torch 2.14): ``layer_norm``'s third derivative is silently wrong (its double
backward treats the saved mean and inverse deviation as constants, pytorch/pytorch
#175754), which corrupts the meta-gradient of every LayerNorm model (ViTs), and
``batch_norm`` raises.

The forward difference

    q(s) = uᵀ(∇f(θ + s·u) − ∇f(θ)) / s

needs gradients only, so its derivative in θ, (H(θ + s·u) − H(θ))u / s, needs second
derivatives only, which torch has right for both layers. With a host that hands over
∇f(θ) and its graph (the ``grads`` a regularizer may ask for), one call costs one
forward and one backward pass at θ + s·u.

Choice of s. For a smooth loss q(s) = uᵀHu + (s/2)·f'''[u,u,u] + O(s²). The computed
gradients carry rounding errors; if η bounds their component along u, the computed q is
off by up to 2η/s more. For a piecewise-smooth loss (ReLU, max-pooling) the segment from
θ to θ + s·u also crosses a kink with a probability that grows with s, and q then picks
up a jump of the gradient divided by s. Truncation and kinks grow with s, rounding
shrinks as 1/s. Rescaling θ → cθ rescales all three consistently when s scales with
the weights, so

    s = h·(1 + ‖θ‖),

and with η ∝ ε (the unit roundoff of the params' dtype) the sum of an O(ε/h) and an
O(h) error is least at h ∝ √ε. The constant, :data:`STEP_FACTOR` = 3e-3 (h = 1.0e-6 in
float32, 4.5e-11 in float64), is the largest h at which kinks did not show on the ReLU
conv net in ``benchmarks/regularizer_cost.py`` (part 4 prints the sweep). There the
top-eigenvalue quotient's median relative error is ~1e-3 in float32 and its
meta-gradient's cosine with the exact one above 0.999 on the MLP and the conv net (the
trace's, along random directions of small curvature, 0.97 on the conv net at best). On a
small ViT (GELU, LayerNorm, softmax) rounding dominates at this h (cosine down to 0.89),
and h ≈ 1e-5 to 3e-5 gives 0.999, which loses the direction on the conv net. No one h
serves both, which is why the estimators default to exact HVP products and take
``fd_step``.

The step actually taken is δ = fl(θ + s·u) − θ, computed in the params' dtype, and the
quotient is formed along δ itself: δᵀ(∇f(θ + δ) − ∇f(θ)) / ‖δ‖² is then the difference
quotient of the unit direction δ/‖δ‖, with no error from rounding θ + s·u.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from ..protocols import LossFn
from ._hvp import dot, norm

__all__ = ["PRODUCTS", "STEP_FACTOR", "GradientDifference", "check_products", "default_relative_step",
           "gradient_difference", "step_length"]

PRODUCTS = ("finite_difference", "hvp")
"""How a curvature regularizer forms its differentiable products vᵀHv."""

STEP_FACTOR = 3e-3
"""h = STEP_FACTOR·√ε of the params' dtype (see the module docstring)."""


class GradientDifference(NamedTuple):
    """The output of :func:`gradient_difference`.

    Attributes:
        value: The difference quotient δᵀ(∇f(θ + δ) − ∇f(θ)) / ‖δ‖², in the graph of θ.
        product: (∇f(θ + δ) − ∇f(θ)) / ‖δ‖, detached: H applied to the unit δ/‖δ‖, to
            first order in s (what power iteration moves on to).
        direction: The unit direction δ/‖δ‖ the quotient is of.
    """

    value: Tensor
    product: list[Tensor]
    direction: list[Tensor]


def check_products(owner: str, products: str, fd_step: float | None) -> None:
    """Raise :class:`ConfigError` naming ``owner`` for a bad ``products`` or ``fd_step`` option."""
    if products not in PRODUCTS:
        raise ConfigError(f"{owner}: products must be one of {PRODUCTS}, got {products!r}")
    if fd_step is not None and (isinstance(fd_step, bool) or not isinstance(fd_step, (int, float))
                                or not math.isfinite(fd_step) or fd_step <= 0):
        raise ConfigError(f"{owner}: fd_step must be a finite positive number or None, got {fd_step!r}")


def default_relative_step(dtype: torch.dtype) -> float:
    """h = :data:`STEP_FACTOR`·√ε for ``dtype`` (1.0e-6 in float32, 4.5e-11 in float64)."""
    return STEP_FACTOR * math.sqrt(torch.finfo(dtype).eps)


def step_length(params: Sequence[Tensor], relative: float | None = None) -> Tensor:
    """s = h·(1 + ‖θ‖), as a 0-dim tensor (no host sync); ``relative`` is h (default: by dtype)."""
    h = default_relative_step(params[0].dtype) if relative is None else relative
    return h * (1.0 + norm([p.detach() for p in params]))


def gradient_difference(
    params: Sequence[Tensor],
    loss_fn: LossFn,
    grads: Sequence[Tensor],
    direction: Sequence[Tensor],
    step: Tensor | float,
    *,
    create_graph: bool = True,
) -> GradientDifference:
    """The forward-difference curvature of ``loss_fn`` at ``params`` along the unit ``direction``.

    Args:
        params: θ, in the graph the result should be differentiable in.
        loss_fn: ``loss_fn(params)``, the scalar loss.
        grads: ∇f(θ), built with ``create_graph=True`` when the result must be
            differentiable (its graph carries −H(θ)u/s into the derivative).
        direction: A unit vector u, treated as a constant.
        step: The step length s (see :func:`step_length`).
        create_graph: Keep the gradient at θ + δ in the graph (off for a measurement).
    """
    base = [p.detach() for p in params]
    delta = [(b + step * u.detach()) - b for b, u in zip(base, direction)]
    shifted = [p + d for p, d in zip(params, delta)]
    loss = loss_fn(shifted)
    if loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar, got a tensor of shape {tuple(loss.shape)}")
    far = torch.autograd.grad(loss, shifted, create_graph=create_graph, allow_unused=True)
    difference = [(torch.zeros_like(p) if a is None else a) - b for a, b, p in zip(far, grads, params)]
    length = norm(delta)
    value = dot(delta, difference) / length**2
    return GradientDifference(value, [d.detach() / length for d in difference], [d / length for d in delta])
