"""Meta-gradients through a regularizer, checked by central finite differences.

A one-step unroll θ₁ = θ₀ - φ ⊙ ∇f(θ₀), with the gradient detached as in learned
optimizers, makes R(θ₁) a function of the per-coordinate step sizes φ. Autograd's
dR/dφ runs through R's own graph into the non-leaf iterate θ₁; in float64 it must match
(R(φ + hu) - R(φ - hu)) / 2h along random directions u, whose error is O(h²) plus
rounding of order 1e-16 |R| / h.

Each regularizer is rebuilt with the same seed for every evaluation, so its probes and
draws are identical and R is a deterministic function of φ.
"""

from __future__ import annotations

import pytest
import torch

from flat_l2o_plugin.regularizers.hessian import HessianTopEigenvalue
from flat_l2o_plugin.regularizers.hessian_trace import HessianTrace
from flat_l2o_plugin.regularizers.local_entropy import LocalEntropy
from flat_l2o_plugin.regularizers.sharpness import Sharpness

STEP = 1e-5


def one_step_unroll(theta0, grad0, phi):
    return [t - p * g for t, p, g in zip(theta0, phi, grad0)]


@pytest.fixture
def unroll(tiny_mlp):
    theta0 = tiny_mlp.init_params(seed=0)
    leaves = [t.clone().requires_grad_(True) for t in theta0]
    grad0 = [g.detach() for g in torch.autograd.grad(tiny_mlp.loss(leaves), leaves)]
    g = torch.Generator().manual_seed(5)
    phi = [0.05 + 0.02 * torch.rand(t.shape, generator=g, dtype=t.dtype) for t in theta0]
    directions = []
    for _ in range(4):
        u = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in theta0]
        norm = torch.sqrt(sum((x**2).sum() for x in u))
        directions.append([x / norm for x in u])
    return theta0, grad0, phi, directions


def check_against_finite_differences(objective, phi, directions, differenced=None, rel=1e-6):
    """Compares autograd's gradient of ``objective(phi)`` with central differences.

    ``differenced`` is the function to difference when it is not ``objective`` itself.
    """
    differenced = differenced or objective
    leaves = [p.clone().requires_grad_(True) for p in phi]
    grads = torch.autograd.grad(objective(leaves), leaves)
    assert all(torch.isfinite(g).all() for g in grads)
    for u in directions:
        analytic = float(sum((g * x).sum() for g, x in zip(grads, u)))
        plus = float(differenced([p + STEP * x for p, x in zip(phi, u)]).detach())
        minus = float(differenced([p - STEP * x for p, x in zip(phi, u)]).detach())
        numeric = (plus - minus) / (2 * STEP)
        assert analytic == pytest.approx(numeric, rel=rel, abs=1e-9)


@pytest.mark.parametrize(
    ("make", "rel"),
    [
        pytest.param(lambda: HessianTrace(probes=4, seed=0, products="hvp"), 1e-6, id="hessian_trace"),
        pytest.param(
            lambda: LocalEntropy(gamma=50.0, samples=8, estimator="smoothing", seed=0), 1e-6, id="local_entropy"
        ),
        # Stopped at a residual r ≤ 1e-10·λ (5e-10), the unit eigenvector is within r/gap
        # = 2e-10 of the top one (gap 2.4 here), so dλ/dφ = vᵀ(∂H/∂φ)v is exact far
        # beyond what central differences resolve.
        pytest.param(
            lambda: HessianTopEigenvalue(iters=300, warm_start=False, tol=1e-10, seed=0, products="hvp"), 1e-5,
            id="hessian_top_eigenvalue",
        ),
    ],
)
def test_meta_gradient_matches_finite_differences(tiny_mlp, unroll, make, rel):
    theta0, grad0, phi, directions = unroll

    def objective(phi_):
        return make()(one_step_unroll(theta0, grad0, phi_), tiny_mlp.loss)

    check_against_finite_differences(objective, phi, directions, rel=rel)


def test_sharpness_meta_gradient_treats_the_ascent_direction_as_constant(tiny_mlp, unroll):
    theta0, grad0, phi, directions = unroll
    rho = 0.1
    reg = Sharpness(rho=rho)

    # Sharpness differentiates f(θ₁ + ρĝ) - f(θ₁) with ĝ frozen at its current value, so
    # the finite differences must hold ĝ fixed too.
    base = [t.clone().requires_grad_(True) for t in one_step_unroll(theta0, grad0, phi)]
    grads = torch.autograd.grad(tiny_mlp.loss(base), base)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    frozen = [g / norm for g in grads]

    def frozen_objective(phi_):
        theta1 = one_step_unroll(theta0, grad0, phi_)
        return tiny_mlp.loss([t + rho * d for t, d in zip(theta1, frozen)]) - tiny_mlp.loss(theta1)

    def objective(phi_):
        return reg(one_step_unroll(theta0, grad0, phi_), tiny_mlp.loss)

    assert float(objective(phi).detach()) == pytest.approx(float(frozen_objective(phi)), rel=1e-12)
    check_against_finite_differences(objective, phi, directions, differenced=frozen_objective)
    # Differencing the regularizer itself moves ĝ too; that changes the directional
    # derivative by several percent here, so the check above does tell the two apart.
    leaves = [p.clone().requires_grad_(True) for p in phi]
    grads = torch.autograd.grad(objective(leaves), leaves)
    u = directions[0]
    analytic = float(sum((g * x).sum() for g, x in zip(grads, u)))
    plus = float(objective([p + STEP * x for p, x in zip(phi, u)]).detach())
    minus = float(objective([p - STEP * x for p, x in zip(phi, u)]).detach())
    assert abs(analytic - (plus - minus) / (2 * STEP)) > 0.01 * abs(analytic)
