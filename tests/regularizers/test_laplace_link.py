"""The link between local entropy and the Hessian that motivates both regularizers.

Expanding f to second order around a minimum θ* with Hessian eigenvalues λ_i and
integrating the Gaussian gives Laplace's approximation

    -F(θ*; γ) ≈ f(θ*) + ½ Σ_i log(λ_i + γ) - (d/2) log 2π,

exact for quadratics. So -F grows with every eigenvalue, and for γ ≫ λ_i its
θ-dependent part is f(θ*) + tr(H)/(2γ): local entropy is a smoothed trace penalty.
"""

from __future__ import annotations

import math

import pytest
import torch

from flat_l2o_plugin.regularizers.local_entropy import LocalEntropy


def laplace_neg_local_entropy(loss_at_minimum: float, eigenvalues: torch.Tensor, gamma: float) -> float:
    d = eigenvalues.numel()
    return loss_at_minimum + 0.5 * float(torch.log(eigenvalues + gamma).sum()) - 0.5 * d * math.log(2 * math.pi)


def test_quadratic_grows_with_curvature_exactly_as_laplace_says(quadratic):
    gamma = 16.0
    origin = torch.zeros(quadratic.dim, dtype=torch.float64)
    laplace, estimates = [], []
    for scale in (1.0, 2.0, 4.0, 8.0):
        steeper = quadratic.scaled(scale)
        expected = laplace_neg_local_entropy(0.0, steeper.eigenvalues, gamma)
        # At the minimum of a quadratic, Laplace's approximation is the closed form.
        assert steeper.neg_local_entropy(origin, gamma) == pytest.approx(expected, rel=1e-12)
        estimate = float(LocalEntropy(gamma=gamma, samples=16384, seed=int(scale))([origin], steeper.loss).detach())
        # About 5 Monte-Carlo standard deviations (0.006) at the steepest scale.
        assert estimate == pytest.approx(expected, abs=0.03)
        laplace.append(expected)
        estimates.append(estimate)
    # Each doubling of A adds ½ Σ log((2cλ + γ)/(cλ + γ)) ≥ 0.16 nats here, well above the noise.
    assert all(b - a > 0.16 for a, b in zip(laplace, laplace[1:]))
    assert all(b > a for a, b in zip(estimates, estimates[1:]))


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_trained_network_follows_laplace_at_large_gamma(trained_tiny_mlp, hessian_of, scale):
    mlp, minimum = trained_tiny_mlp

    def loss_fn(params):
        # Scaling the loss scales every Hessian eigenvalue: a sharper copy of the same minimum.
        return scale * mlp.loss(params)

    eigenvalues = torch.linalg.eigvalsh(hessian_of(loss_fn, minimum))
    assert float(eigenvalues.min()) > -1e-8  # a minimum: no direction of negative curvature
    gamma = 100.0  # draws within ~0.1 per weight, where the loss is close to its quadratic model
    loss_at_minimum = float(loss_fn(minimum))
    expected = laplace_neg_local_entropy(loss_at_minimum, eigenvalues, gamma)
    # What Laplace adds over a perfectly flat minimum: the part a wrong estimator would miss.
    curvature_term = 0.5 * float(torch.log1p(eigenvalues / gamma).sum())
    assert curvature_term > 0.05

    estimate = float(LocalEntropy(gamma=gamma, samples=4096, seed=0)(minimum, loss_fn).detach())
    flat_value = loss_at_minimum + 0.5 * eigenvalues.numel() * math.log(gamma / (2 * math.pi))
    # The estimate recovers the curvature term to 5% (errors over seeds stay below 2%);
    # at the sharper scale that also rules out the first-order tr(H)/(2γ), 7% higher.
    assert estimate - flat_value == pytest.approx(curvature_term, rel=0.05)
    assert flat_value + curvature_term == pytest.approx(expected, rel=1e-12)
