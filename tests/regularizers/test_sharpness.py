"""Sharpness against its definition and its small-ρ expansion.

S_ρ(θ) = f(θ + ρĝ) - f(θ) with ĝ = ∇f/‖∇f‖ (one norm over all tensors). Taylor's
theorem gives S_ρ = ρ‖g‖ + (ρ²/2) ĝᵀHĝ + O(ρ³), with no remainder on a quadratic.
"""

from __future__ import annotations

import math

import pytest
import torch

from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.regularizers.sharpness import Sharpness


def gradient_of(loss_fn, params):
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    return list(torch.autograd.grad(loss_fn(leaves), leaves))


def unit_gradient(loss_fn, params):
    grads = gradient_of(loss_fn, params)
    norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
    return [g / norm for g in grads], norm


def test_value_and_gradient_match_the_definition(tiny_mlp):
    params = tiny_mlp.init_params(seed=0)
    rho = 0.2
    direction, _ = unit_gradient(tiny_mlp.loss, params)
    shifted = [p + rho * d for p, d in zip(params, direction)]
    expected_value = float(tiny_mlp.loss(shifted) - tiny_mlp.loss(params))
    # ĝ is a constant, so the gradient is the difference of the two gradients.
    expected_grad = [a - b for a, b in zip(gradient_of(tiny_mlp.loss, shifted), gradient_of(tiny_mlp.loss, params))]

    leaves = [p.clone().requires_grad_(True) for p in params]
    reg = Sharpness(rho=rho)
    out = reg(leaves, tiny_mlp.loss)
    out.backward()

    assert float(out.detach()) == pytest.approx(expected_value, rel=1e-12, abs=1e-15)
    assert reg.last_value == float(out.detach())
    for leaf, grad in zip(leaves, expected_grad):
        assert torch.allclose(leaf.grad, grad, rtol=1e-10, atol=1e-14)


def test_exact_second_order_expansion_on_a_quadratic(quadratic):
    rho = 0.3
    (direction,), norm = unit_gradient(quadratic.loss, [quadratic.theta])
    expected = rho * norm + 0.5 * rho**2 * float(direction @ quadratic.A @ direction)
    value = Sharpness(rho=rho)([quadratic.theta], quadratic.loss)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-12)


def test_small_rho_limit(tiny_mlp, hessian_of):
    params = tiny_mlp.init_params(seed=0)
    direction, norm = unit_gradient(tiny_mlp.loss, params)
    flat_direction = torch.cat([d.reshape(-1) for d in direction])
    curvature = float(flat_direction @ hessian_of(tiny_mlp.loss, params) @ flat_direction)

    remainders = []
    for rho in (1e-1, 1e-2, 1e-3):
        value = float(Sharpness(rho=rho)(params, tiny_mlp.loss).detach())
        # First order: S/ρ → ‖g‖, off by about ρ ĝᵀHĝ / 2.
        assert value / rho == pytest.approx(norm, abs=rho * abs(curvature))
        remainders.append(abs((value - rho * norm) / rho**2 - 0.5 * curvature))
    # Second order: the remainder of ρ‖g‖ + ρ²/2 ĝᵀHĝ is O(ρ³), so after dividing by ρ²
    # it shrinks about tenfold per decade of ρ.
    assert remainders[1] < 0.2 * remainders[0]
    assert remainders[2] < 0.2 * remainders[1]
    assert remainders[2] < 1e-2 * abs(curvature)


def test_zero_at_a_stationary_point(quadratic):
    origin = torch.zeros(quadratic.dim, dtype=torch.float64, requires_grad=True)
    value = Sharpness(rho=0.1)([origin], quadratic.loss)
    value.backward()
    assert float(value.detach()) == 0.0
    assert torch.equal(origin.grad, torch.zeros_like(origin))


def test_float32(tiny_mlp):
    mlp = type(tiny_mlp)(tiny_mlp.x.float(), tiny_mlp.y.float())
    params = [p.float() for p in tiny_mlp.init_params(seed=0)]
    in_single = Sharpness()(params, mlp.loss)
    in_double = Sharpness()(tiny_mlp.init_params(seed=0), tiny_mlp.loss)
    assert in_single.dtype == torch.float32
    # Only rounding differs. S = f(θ + ρĝ) − f(θ) ≈ 0.085 against f ≈ 0.81 loses a factor
    # f/S ≈ 10 to cancellation: float32 (ε = 1.2e-7) gives ~1e-6 relative (5e-7 seen); 1e-3
    # leaves a factor of 1000 for other kernels' orders of summation.
    assert float(in_single.detach()) == pytest.approx(float(in_double.detach()), rel=1e-3)


@pytest.mark.parametrize("rho", [0.0, -0.05, float("nan"), float("inf")])
def test_rejects_bad_rho(rho):
    with pytest.raises(ValueError, match="rho") as info:
        Sharpness(rho=rho)
    assert isinstance(info.value, ConfigError)
