"""Stochastic Lanczos quadrature against matrices whose spectrum is known exactly.

Everything is float64 and seeded with explicit generators.
"""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
from torch import Tensor

from flat_l2o_plugin.diagnostics import (
    gauss_quadrature,
    gaussian_density,
    hessian_slq,
    lanczos_tridiagonal,
    stochastic_lanczos_quadrature,
)

DTYPE = torch.float64


def rotated(eigenvalues: Tensor, seed: int) -> Tensor:
    """A symmetric matrix with the given eigenvalues and a random orthogonal eigenbasis."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=DTYPE))
    a = q @ torch.diag(eigenvalues) @ q.T
    return 0.5 * (a + a.T)


def hutchinson_std(matrix: Tensor, probes: int) -> float:
    """Exact standard deviation of the mean of ``probes`` Rademacher samples vᵀAv."""
    off_diagonal = (matrix**2).sum() - (torch.diagonal(matrix) ** 2).sum()
    return math.sqrt(2.0 * float(off_diagonal) / probes)


def tiny_mlp_loss() -> tuple[Callable[[list[Tensor]], Tensor], list[Tensor]]:
    """A 3-5-1 tanh regression network on 16 fixed points (26 parameters), at random params."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(16, 3, generator=g, dtype=DTYPE)
    y = torch.sin(x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=DTYPE))
    params = [torch.randn(s, generator=g, dtype=DTYPE) * 0.7 for s in [(5, 3), (5,), (1, 5), (1,)]]

    def loss(p: list[Tensor]) -> Tensor:
        w1, b1, w2, b2 = p
        return ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()

    return loss, params


def exact_hessian(loss, params: list[Tensor]) -> Tensor:
    sizes = [p.numel() for p in params]

    def flat_loss(v: Tensor) -> Tensor:
        return loss([piece.reshape(p.shape) for piece, p in zip(torch.split(v, sizes), params)])

    return torch.autograd.functional.hessian(flat_loss, torch.cat([p.reshape(-1) for p in params]))


def test_gauss_quadrature_is_exact_in_the_moments_with_fewer_steps_than_the_dimension():
    # A diagonal H and Rademacher probes: vᵀHʲv = tr Hʲ for every probe, and m Lanczos
    # steps integrate polynomials up to degree 2m - 1 exactly, so 4 steps on d = 12 give
    # the first 7 moments to rounding.
    eigenvalues = torch.tensor([-1.5, -0.2, 0.0, 0.1, 0.3, 0.4, 0.7, 1.0, 1.2, 2.5, 4.0, 9.0], dtype=DTYPE)
    h = torch.diag(eigenvalues)
    quadrature = stochastic_lanczos_quadrature(lambda v: h @ v, 12, probes=3, steps=4, seed=0)
    assert all(len(x) == 4 for x in quadrature.nodes)
    for order in range(1, 8):
        exact = float((eigenvalues**order).mean())
        assert quadrature.moment(order) == pytest.approx(exact, rel=1e-9, abs=1e-12)
    assert quadrature.trace() == pytest.approx(float(eigenvalues.sum()), rel=1e-12)


def test_density_integrates_to_one_and_its_mean_is_the_trace_over_d():
    # A bulk and a few outliers, the shape of a trained network's Hessian spectrum.
    bulk, outliers = torch.linspace(0.0, 0.5, 36, dtype=DTYPE), torch.tensor([2.0, 3.0, 5.0, 8.0], dtype=DTYPE)
    eigenvalues = torch.cat([bulk, outliers])
    h = rotated(eigenvalues, seed=1)
    d, probes = len(eigenvalues), 16
    quadrature = stochastic_lanczos_quadrature(lambda v: h @ v, d, probes=probes, steps=20, seed=3)
    for weights in quadrature.weights:
        assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
        assert bool((weights >= 0).all())
    density = quadrature.density(points=4096)
    assert density.integral() == pytest.approx(1.0, abs=1e-6)
    # The Gaussian kernel is symmetric: broadening keeps the mean and adds σ² to the
    # second moment, so the grid reproduces the quadrature's moments.
    assert density.moment(1) == pytest.approx(quadrature.moment(1), rel=1e-6)
    assert density.moment(2) == pytest.approx(quadrature.moment(2) + density.sigma**2, rel=1e-6)
    # Each probe's first moment is a Hutchinson sample of tr H / d.
    tolerance = 4 * hutchinson_std(h, probes) / d
    assert abs(quadrature.moment(1) - float(eigenvalues.mean())) < tolerance


@pytest.mark.parametrize("steps", [40, 100])
def test_nodes_are_the_eigenvalues_when_steps_reach_the_dimension(steps):
    # A spread of six decades: without reorthogonalization, λ_max would come back as
    # spurious copies ("ghosts") long before 40 steps.
    eigenvalues = torch.logspace(-3, 3, 40, dtype=DTYPE)
    h = rotated(eigenvalues, seed=2)
    quadrature = stochastic_lanczos_quadrature(lambda v: h @ v, 40, probes=2, steps=steps, seed=0)
    assert quadrature.steps == 40
    for nodes in quadrature.nodes:
        assert len(nodes) == 40
        nearest = (nodes[:, None] - eigenvalues[None, :]).abs().min(dim=1).values
        assert bool((nearest <= 1e-8 * eigenvalues.max()).all())
        assert float(nodes.min()) == pytest.approx(1e-3, rel=1e-6)
        assert float(nodes.max()) == pytest.approx(1e3, rel=1e-12)
        # One node per eigenvalue: a ghost would put two nodes on λ_max.
        assert int(((nodes - 1e3).abs() < 1e-6).sum()) == 1
    assert quadrature.extremes() == pytest.approx((1e-3, 1e3), rel=1e-6)


def test_lanczos_stops_at_an_invariant_subspace():
    # Three distinct eigenvalues: the Krylov space of any start vector has dimension 3.
    eigenvalues = torch.tensor([1.0] * 5 + [2.0] * 4 + [7.0] * 3, dtype=DTYPE)
    h = rotated(eigenvalues, seed=4)
    alphas, betas = lanczos_tridiagonal(lambda v: h @ v, torch.ones(12, dtype=DTYPE), steps=12)
    assert len(alphas) == 3 and len(betas) == 2
    nodes, weights = gauss_quadrature(alphas, betas)
    assert nodes.tolist() == pytest.approx([1.0, 2.0, 7.0], rel=1e-10)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)


def test_a_zero_operator_gives_a_single_node_at_zero():
    alphas, betas = lanczos_tridiagonal(torch.zeros_like, torch.ones(5, dtype=DTYPE), steps=5)
    nodes, weights = gauss_quadrature(alphas, betas)
    assert nodes.tolist() == [0.0] and weights.tolist() == pytest.approx([1.0])
    quadrature = stochastic_lanczos_quadrature(torch.zeros_like, 5, probes=2, steps=3, seed=0)
    density = quadrature.density(points=512)
    assert density.integral() == pytest.approx(1.0, abs=1e-6)


def test_hessian_slq_on_a_tiny_mlp_finds_the_exact_extreme_eigenvalues():
    loss, params = tiny_mlp_loss()
    exact = torch.linalg.eigvalsh(exact_hessian(loss, params))
    assert float(exact.min()) < 0 < float(exact.max())  # away from a minimum: an indefinite Hessian
    quadrature = hessian_slq(loss, params, probes=4, steps=26, seed=0)
    scale = float(exact.abs().max())
    for nodes in quadrature.nodes:
        assert float(nodes.min()) == pytest.approx(float(exact.min()), abs=1e-8 * scale)
        assert float(nodes.max()) == pytest.approx(float(exact.max()), abs=1e-8 * scale)
    hessian = exact_hessian(loss, params)
    assert abs(quadrature.trace() - float(exact.sum())) < 4 * hutchinson_std(hessian, 4)


def test_hessian_slq_extreme_ritz_values_converge_before_the_dimension(rounding):
    loss, params = tiny_mlp_loss()
    hessian = exact_hessian(loss, params)
    exact = torch.linalg.eigvalsh(hessian)
    quadrature = hessian_slq(loss, params, probes=2, steps=15, seed=1)
    low, high = quadrature.extremes()
    # Ritz values are interior to the spectrum and approach its ends first.
    assert float(exact.min()) - rounding(hessian) <= low and high <= float(exact.max()) + rounding(hessian)
    for nodes, residuals in zip(quadrature.nodes, quadrature.residuals):
        assert len(residuals) == len(nodes) == 15
        # Every node lies within its Ritz residual of an eigenvalue...
        nearest = (nodes[:, None] - exact[None, :]).abs().min(dim=1).values
        assert bool((nearest <= residuals + rounding(hessian)).all())
        # ...and the top node's residual is already small: it has converged.
        top_gap = float(exact[-1] - exact[-2])
        assert float(exact[-1] - nodes[-1]) <= float(residuals[-1]) ** 2 / (top_gap - float(residuals[-1])) \
            + rounding(hessian)
        assert float(residuals[-1]) < 1e-3 * float(exact[-1])


def test_the_same_seed_gives_the_same_quadrature_and_another_seed_does_not():
    h = rotated(torch.linspace(0.1, 3.0, 20, dtype=DTYPE), seed=5)
    first = stochastic_lanczos_quadrature(lambda v: h @ v, 20, probes=2, steps=6, seed=11)
    again = stochastic_lanczos_quadrature(lambda v: h @ v, 20, probes=2, steps=6, seed=11)
    other = stochastic_lanczos_quadrature(lambda v: h @ v, 20, probes=2, steps=6, seed=12)
    assert all(torch.equal(a, b) for a, b in zip(first.nodes, again.nodes))
    assert not torch.equal(first.nodes[0], other.nodes[0])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="nonzero"):
        lanczos_tridiagonal(lambda v: v, torch.zeros(4, dtype=DTYPE), steps=3)
    with pytest.raises(ValueError, match="non-finite"):
        lanczos_tridiagonal(lambda v: v * float("nan"), torch.ones(4, dtype=DTYPE), steps=3)
    with pytest.raises(ValueError, match="probes"):
        stochastic_lanczos_quadrature(lambda v: v, 4, probes=0)
    quadrature = stochastic_lanczos_quadrature(lambda v: v, 4, probes=1, steps=2)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_density(quadrature, sigma=-1.0)
