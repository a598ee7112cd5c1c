"""Tiny float64 problems with exact answers, shared by the regularizer tests.

Everything is built from explicit ``torch.Generator`` seeds, so no test depends on the
global random state or on test order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import pytest
import torch
from torch import Tensor

DTYPE = torch.float64


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, start = [], 0
    for t in like:
        out.append(vector[start:start + t.numel()].view_as(t))
        start += t.numel()
    return out


def exact_hessian(loss_fn, params: Sequence[Tensor]) -> Tensor:
    """The full (d, d) Hessian of ``loss_fn`` at ``params``, by autograd."""
    flat = flatten([p.detach() for p in params])
    return torch.autograd.functional.hessian(lambda v: loss_fn(unflatten(v, params)), flat)


@dataclass
class TinyMLP:
    """A 3-5-1 tanh regression network on 16 fixed points: 26 parameters."""

    x: Tensor
    y: Tensor

    def loss(self, params: Sequence[Tensor]) -> Tensor:
        w1, b1, w2, b2 = params
        hidden = torch.tanh(self.x @ w1.T + b1)
        return ((hidden @ w2.T + b2 - self.y) ** 2).mean()

    def init_params(self, seed: int) -> list[Tensor]:
        g = torch.Generator().manual_seed(seed)
        shapes = [(5, 3), (5,), (1, 5), (1,)]
        return [torch.randn(s, generator=g, dtype=self.x.dtype) * 0.7 for s in shapes]


@dataclass
class Quadratic:
    """f(θ) = ½ θᵀ A θ with A symmetric positive definite and known eigenvalues."""

    A: Tensor
    eigenvalues: Tensor
    theta: Tensor

    @property
    def dim(self) -> int:
        return self.A.shape[0]

    def loss(self, params: Sequence[Tensor]) -> Tensor:
        (x,) = params
        return 0.5 * x @ self.A @ x

    def scaled(self, c: float) -> Quadratic:
        return Quadratic(c * self.A, c * self.eigenvalues, self.theta)

    def neg_local_entropy(self, theta: Tensor, gamma: float, temperature: float = 1.0) -> float:
        """-F_T(θ; γ) in closed form.

        The exponent -(½θ'ᵀAθ' + γ/2‖θ-θ'‖²)/T is a Gaussian in θ' with precision
        M/T, M = A + γI, and mean γM⁻¹θ; integrating it gives
        F_T = (dT/2) log 2πT - (T/2) log det M + (γ²/2) θᵀM⁻¹θ - (γ/2)‖θ‖².
        """
        d, t = self.dim, temperature
        m = self.A + gamma * torch.eye(d, dtype=self.A.dtype)
        entropy = (
            0.5 * d * t * math.log(2 * math.pi * t)
            - 0.5 * t * torch.logdet(m)
            + 0.5 * gamma**2 * theta @ torch.linalg.solve(m, theta)
            - 0.5 * gamma * theta @ theta
        )
        return -float(entropy)

    def neg_local_entropy_grad(self, theta: Tensor, gamma: float) -> Tensor:
        """∇(-F) = γ(θ - μ) with μ = γ(A + γI)⁻¹θ, the Gibbs mean (any temperature)."""
        m = self.A + gamma * torch.eye(self.dim, dtype=self.A.dtype)
        return gamma * (theta - gamma * torch.linalg.solve(m, theta))


@dataclass
class SeparableSoftplus:
    """f(θ) = Σ_i softplus(3θ_i): smooth, convex, and far from Gaussian under exp(-f).

    The Gibbs measure of f + γ/2‖θ - θ'‖² factorizes over coordinates, so -F and the
    Gibbs mean come from one-dimensional quadrature. Unlike on a quadratic, the mean moves
    with the temperature, which is what exposes a sampler with the wrong noise level.
    """

    theta: Tensor

    def loss(self, params: Sequence[Tensor]) -> Tensor:
        return torch.nn.functional.softplus(3.0 * params[0]).sum()

    def reference(self, gamma: float, temperature: float = 1.0) -> tuple[float, Tensor]:
        """(-F_T(θ; γ), ∇(-F_T) = γ(θ - μ)) by the trapezoid rule on a fine grid."""
        grid = torch.linspace(-15.0, 15.0, 200_001, dtype=self.theta.dtype)
        entropy, means = 0.0, []
        for center in self.theta:
            exponent = -(torch.nn.functional.softplus(3.0 * grid) + 0.5 * gamma * (grid - center) ** 2) / temperature
            top = exponent.max()
            weight = torch.exp(exponent - top)
            mass = torch.trapezoid(weight, grid)
            entropy += temperature * float(torch.log(mass) + top)
            means.append(torch.trapezoid(weight * grid, grid) / mass)
        return -entropy, gamma * (self.theta - torch.stack(means))


def make_tiny_mlp() -> TinyMLP:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(16, 3, generator=g, dtype=DTYPE)
    teacher = torch.tensor([[1.0], [-2.0], [0.5]], dtype=DTYPE)
    y = torch.sin(x @ teacher) + 0.1 * torch.randn(16, 1, generator=g, dtype=DTYPE)
    return TinyMLP(x, y)


@pytest.fixture
def tiny_mlp() -> TinyMLP:
    return make_tiny_mlp()


@pytest.fixture(scope="session")
def trained_tiny_mlp() -> tuple[TinyMLP, list[Tensor]]:
    """The tiny MLP and a local minimum of its loss, found by full-batch L-BFGS."""
    mlp = make_tiny_mlp()
    params = [p.requires_grad_(True) for p in mlp.init_params(seed=0)]
    optimizer = torch.optim.LBFGS(
        params, lr=1.0, max_iter=1000, tolerance_grad=1e-11, tolerance_change=0.0,
        history_size=50, line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = mlp.loss(params)
        loss.backward()
        return loss

    optimizer.step(closure)
    grads = torch.autograd.grad(mlp.loss(params), params)
    # The Laplace comparison is only meaningful at a stationary point.
    assert float(flatten(grads).norm()) < 1e-8
    return mlp, [p.detach() for p in params]


@pytest.fixture
def softplus_problem() -> SeparableSoftplus:
    return SeparableSoftplus(torch.tensor([0.2, -0.4], dtype=DTYPE))


@pytest.fixture
def quadratic() -> Quadratic:
    g = torch.Generator().manual_seed(7)
    eigenvalues = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=DTYPE)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=DTYPE))
    a = q @ torch.diag(eigenvalues) @ q.T
    theta = torch.randn(4, generator=g, dtype=DTYPE)
    # Unit norm keeps f(θ + ε) from varying by many nats over the draws at γ ≈ 1, where
    # the Monte-Carlo log-mean-exp would need far more samples than a test can afford.
    theta = theta / theta.norm()
    return Quadratic(0.5 * (a + a.T), eigenvalues, theta)


@pytest.fixture
def hessian_of():
    """``hessian_of(loss_fn, params)``: the exact (d, d) Hessian, for reference values."""
    return exact_hessian
