"""The top-eigenvalue regularizer against the exact Hessian of tiny float64 models.

These tests check the eigensolver and the exact derivative, so they form the final
quotient as an HVP (``products="hvp"``); the finite-difference quotient is checked
against it in ``test_finite_difference.py``.
"""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch

from flat_l2o_plugin import create_regularizer
from flat_l2o_plugin.regularizers import HessianTopEigenvalue, hessian_eigenpairs
from flat_l2o_plugin.regularizers.hessian import power_iteration
from flat_l2o_plugin.regularizers._hvp import gradient, random_like


def _eigvalsh(hessian_of, loss_fn, params):
    return torch.linalg.eigvalsh(hessian_of(loss_fn, params))


def assert_top_within_its_bound(value: float, residual: float, hessian: torch.Tensor, slack: float) -> None:
    """``value`` is λ₁ as closely as its residual guarantees (Kato–Temple).

    A Rayleigh quotient θ with residual r lies in [λ₁ − r²/(θ − λ₂), λ₁] once θ > λ₂; up
    to ``slack`` for rounding.
    """
    exact = torch.linalg.eigvalsh(hessian)
    top, second = float(exact[-1]), float(exact[-2])
    assert value > second + slack
    assert top - residual**2 / (value - second) - slack <= value <= top + slack


def test_cold_start_matches_eigvalsh(tiny_mlp, hessian_of, rounding):
    params = tiny_mlp.init_params(0)
    hessian = hessian_of(tiny_mlp.loss, params)
    reg = HessianTopEigenvalue(products="hvp", iters=500, warm_start=False, tol=1e-10, seed=0)
    value = reg(params, tiny_mlp.loss)
    assert value.dim() == 0
    assert reg.last_residual <= 1e-10 * abs(value.item()) + rounding(hessian)
    assert_top_within_its_bound(value.item(), reg.last_residual, hessian, rounding(hessian))


def test_created_through_the_registry_is_the_same_estimator(tiny_mlp, hessian_of, rounding):
    params = tiny_mlp.init_params(1)
    hessian = hessian_of(tiny_mlp.loss, params)
    reg = create_regularizer("hessian_top_eigenvalue", products="hvp", iters=300, warm_start=False, tol=1e-10, seed=0)
    assert isinstance(reg, HessianTopEigenvalue)
    value = reg(params, tiny_mlp.loss).item()
    assert reg.last_residual <= 1e-10 * abs(value) + rounding(hessian)
    assert_top_within_its_bound(value, reg.last_residual, hessian, rounding(hessian))


def test_negative_dominant_eigenvalue_still_gives_the_largest(rounding):
    # Spectrum {-5, -1, 0.5}: plain power iteration finds -5; the shift recovers 0.5.
    a = torch.diag(torch.tensor([-5.0, -1.0, 0.5], dtype=torch.float64))
    loss_fn = lambda p: 0.5 * p[0] @ a @ p[0]  # noqa: E731
    x = [torch.ones(3, dtype=torch.float64)]
    largest = HessianTopEigenvalue(products="hvp", iters=300, warm_start=False, tol=1e-10, seed=0)
    magnitude = HessianTopEigenvalue(products="hvp", iters=300, warm_start=False, tol=1e-10, which="magnitude", seed=0)
    assert_top_within_its_bound(largest(x, loss_fn).item(), largest.last_residual, a, rounding(a))
    assert abs(magnitude(x, loss_fn).item() - 5.0) <= magnitude.last_residual + rounding(a)
    assert magnitude.last_residual <= 1e-10 * 5.0 + rounding(a)


def test_warm_start_tracks_the_eigenvalue_with_two_hvps_per_call(tiny_mlp, hessian_of, rounding):
    params = tiny_mlp.init_params(2)
    reg = HessianTopEigenvalue(products="hvp", iters=200, warm_start=True, warm_iters=1, tol=1e-10, seed=0)
    reg(params, tiny_mlp.loss)
    cold_hvps = reg.last_hvps
    # A slowly moving trajectory, as consecutive iterates of an unroll are.
    errors = []
    for k in range(1, 30):
        moved = [p + 1e-3 * k * torch.sin(torch.arange(p.numel(), dtype=p.dtype).view_as(p) + k) for p in params]
        value = reg(moved, tiny_mlp.loss).item()
        assert reg.last_hvps == 2
        hessian = hessian_of(tiny_mlp.loss, moved)
        # Two HVPs leave a residual near 1e-2·λ, but the error is about residual²/gap.
        assert_top_within_its_bound(value, reg.last_residual, hessian, rounding(hessian))
        exact = float(torch.linalg.eigvalsh(hessian)[-1])
        errors.append(abs(value - exact) / abs(exact))
    assert cold_hvps > 2
    # 6e-5 at most here: the bound above keeps it there, as long as the probe tracks.
    assert max(errors) < 1e-3


def test_tolerance_stops_early(tiny_mlp):
    params = tiny_mlp.init_params(0)
    loose = HessianTopEigenvalue(products="hvp", iters=500, warm_start=False, tol=1e-2, seed=0)
    tight = HessianTopEigenvalue(products="hvp", iters=500, warm_start=False, tol=1e-10, seed=0)
    loose(params, tiny_mlp.loss)
    tight(params, tiny_mlp.loss)
    assert loose.last_hvps < tight.last_hvps


def test_gradient_is_the_eigenvalue_derivative(tiny_mlp):
    """dλ/dθ = vᵀ(∂H/∂θ)v: compare autograd with central finite differences of eigvalsh."""
    params = [p.requires_grad_(True) for p in tiny_mlp.init_params(3)]
    reg = HessianTopEigenvalue(products="hvp", iters=1000, warm_start=False, tol=0, seed=0)
    grads = torch.autograd.grad(reg(params, tiny_mlp.loss), params)

    eps = 1e-5
    rng = torch.Generator().manual_seed(0)
    for _ in range(5):
        i = int(torch.randint(0, len(params), (1,), generator=rng))
        j = int(torch.randint(0, params[i].numel(), (1,), generator=rng))
        values = []
        for sign in (1, -1):
            shifted = [p.detach().clone() for p in params]
            shifted[i].view(-1)[j] += sign * eps
            h = torch.autograd.functional.hessian(
                lambda v: tiny_mlp.loss(_unflatten(v, shifted)), torch.cat([p.reshape(-1) for p in shifted]))
            values.append(torch.linalg.eigvalsh(h).max().item())
        fd = (values[0] - values[1]) / (2 * eps)
        assert grads[i].view(-1)[j].item() == pytest.approx(fd, rel=1e-4, abs=1e-7)


def _unflatten(vector, like):
    out, start = [], 0
    for t in like:
        out.append(vector[start:start + t.numel()].view_as(t))
        start += t.numel()
    return out


def test_gradcheck_of_the_differentiable_rayleigh_quotient(tiny_mlp):
    params = tiny_mlp.init_params(4)
    probe = random_like(params, torch.Generator().manual_seed(0))

    def rayleigh(*ps):
        # A fixed probe makes the function deterministic: gradcheck then checks vᵀ(∂H/∂θ)v.
        reg = HessianTopEigenvalue(products="hvp", iters=1, warm_start=True, warm_iters=0, seed=0)
        reg._probe = [v.clone() for v in probe]
        return reg(list(ps), tiny_mlp.loss)

    inputs = tuple(p.detach().requires_grad_(True) for p in params)
    assert torch.autograd.gradcheck(rayleigh, inputs, eps=1e-6, atol=1e-6)


def test_eigenpairs_are_the_top_k_by_magnitude_within_their_residuals(tiny_mlp, hessian_of, rounding):
    params = tiny_mlp.init_params(5)
    hessian = hessian_of(tiny_mlp.loss, params)
    exact = torch.linalg.eigvalsh(hessian)
    by_magnitude = exact[exact.abs().argsort(descending=True)][:3].tolist()
    tol = 1e-8
    pairs = hessian_eigenpairs(params, tiny_mlp.loss, k=3, iters=26, tol=tol, seed=0)
    for value, residual, reference in zip(pairs.values, pairs.residuals, by_magnitude):
        assert abs(value - reference) <= residual + rounding(hessian)
        # The stopping rule's bound; the mixing of close pairs keeps it from tol·|value|.
        assert residual <= tol * math.hypot(*pairs.values) + rounding(hessian)
    assert len(pairs.vectors) == 3 and [v.shape for v in pairs.vectors[0]] == [p.shape for p in params]
    # The residuals are those of the returned vectors, against the exact Hessian.
    for value, vector, residual in zip(pairs.values, pairs.vectors, pairs.residuals):
        u = torch.cat([x.reshape(-1) for x in vector])
        assert float(torch.linalg.vector_norm(hessian @ u - value * u)) == pytest.approx(
            residual, abs=rounding(hessian))


def test_a_repeated_top_eigenvalue_is_reported_as_often_as_it_occurs(rounding):
    # One Lanczos run sees a single copy of a repeated eigenvalue; locking finds the others.
    eigenvalues = torch.tensor([4.0, 4.0, 4.0, -2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    a = q @ torch.diag(eigenvalues) @ q.T
    tol = 1e-10
    pairs = hessian_eigenpairs([torch.zeros(7, dtype=torch.float64)], lambda p: 0.5 * p[0] @ a @ p[0], k=4,
                               tol=tol, seed=0)
    for value, residual, reference in zip(pairs.values, pairs.residuals, [4.0, 4.0, 4.0, -2.0]):
        assert abs(value - reference) <= residual + rounding(a)
        assert residual <= tol * math.hypot(*pairs.values) + rounding(a)


def test_power_iteration_reports_hvps_spent(tiny_mlp):
    params = [p.requires_grad_(True) for p in tiny_mlp.init_params(0)]
    _, grads = gradient(tiny_mlp.loss, params)
    run = power_iteration(grads, params, random_like(params, torch.Generator().manual_seed(0)), iters=7)
    assert run.hvps == 7 and not run.converged


def test_deterministic_under_a_seed_and_works_in_float32(tiny_mlp):
    params32 = [p.float() for p in tiny_mlp.init_params(6)]
    loss32 = lambda ps: tiny_mlp.loss([p.double() for p in ps]).float()  # noqa: E731
    a = HessianTopEigenvalue(products="hvp", iters=10, seed=3)(params32, loss32)
    b = HessianTopEigenvalue(products="hvp", iters=10, seed=3)(params32, loss32)
    assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("bad", [{"iters": 0}, {"warm_iters": -1}, {"tol": -1.0}, {"which": "smallest"}])
def test_bad_options_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        HessianTopEigenvalue(**bad)


def test_lanczos_matches_eigvalsh_with_few_hvps(tiny_mlp, hessian_of, rounding):
    params = tiny_mlp.init_params(7)
    hessian = hessian_of(tiny_mlp.loss, params)
    reg = HessianTopEigenvalue(products="hvp", method="lanczos", iters=26, warm_start=False, tol=1e-10, seed=0)
    value = reg(params, tiny_mlp.loss).item()
    assert reg.last_residual <= 1e-10 * abs(value) + rounding(hessian)
    assert_top_within_its_bound(value, reg.last_residual, hessian, rounding(hessian))
    exact = float(torch.linalg.eigvalsh(hessian)[-1])
    power = HessianTopEigenvalue(products="hvp", method="power", iters=reg.last_hvps, warm_start=False, tol=0, seed=0)
    power_error = abs(power(params, tiny_mlp.loss).item() - exact)
    assert abs(value - exact) <= power_error + rounding(hessian)  # same HVP budget, at least as accurate


def test_lanczos_which_largest_and_magnitude(rounding):
    a = torch.diag(torch.tensor([-5.0, -1.0, 0.5], dtype=torch.float64))
    loss_fn = lambda p: 0.5 * p[0] @ a @ p[0]  # noqa: E731
    x = [torch.ones(3, dtype=torch.float64)]
    # Three steps span R³: the Ritz values are the eigenvalues, to rounding.
    largest = HessianTopEigenvalue(products="hvp", method="lanczos", iters=3, warm_start=False, tol=0, seed=0)(x, loss_fn)
    magnitude = HessianTopEigenvalue(products="hvp", method="lanczos", iters=3, warm_start=False, tol=0, which="magnitude",
                                     seed=0)(x, loss_fn)
    assert abs(largest.item() - 0.5) <= rounding(a)
    assert abs(magnitude.item() - 5.0) <= rounding(a)


def test_lanczos_warm_start_carries_the_ritz_vector(tiny_mlp, hessian_of, rounding):
    params = tiny_mlp.init_params(8)
    reg = HessianTopEigenvalue(products="hvp", method="lanczos", iters=26, warm_start=True, warm_iters=2, tol=1e-12, seed=0)
    reg(params, tiny_mlp.loss)
    moved = [p + 1e-3 for p in params]
    value = reg(moved, tiny_mlp.loss).item()
    assert reg.last_hvps == 3
    hessian = hessian_of(tiny_mlp.loss, moved)
    assert_top_within_its_bound(value, reg.last_residual, hessian, rounding(hessian))
    # The carried vector is nearly converged: residual 1e-3 and error 3e-8 relative, where
    # a fresh start with the same 3 HVPs is far off.
    fresh = HessianTopEigenvalue(products="hvp", method="lanczos", iters=2, warm_start=False, tol=0, seed=0)
    fresh(moved, tiny_mlp.loss)
    assert reg.last_residual < 0.1 * fresh.last_residual


def clustered_tanh_mlp(data_seed: int = 0) -> tuple[Callable[[list[torch.Tensor]], torch.Tensor], list[torch.Tensor]]:
    """A 4-6-2 tanh regression network (44 parameters) with a clustered top spectrum.

    Data seed 0: λ₁ = 2.423, λ₂ = 2.256, where the power iteration's estimate creeps by
    less than 1e-3 per step long before it is within 1e-3 of λ₁. Data seed 49: λ₁ = 2.463,
    λ₂ = 2.357, where the top Ritz value stalls for a step or two early on.
    """
    g = torch.Generator().manual_seed(data_seed)
    x = torch.randn(32, 4, generator=g, dtype=torch.float64)
    y = torch.randn(32, 2, generator=g, dtype=torch.float64)
    params = [torch.randn(s, generator=g, dtype=torch.float64) * 0.5 for s in [(6, 4), (6,), (2, 6), (2,)]]

    def loss(p: list[torch.Tensor]) -> torch.Tensor:
        w1, b1, w2, b2 = p
        return ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()

    return loss, params


@pytest.mark.parametrize("method", ["power", "lanczos"])
@pytest.mark.parametrize("data_seed", [0, 49])
@pytest.mark.parametrize("seed", range(5))
def test_tol_bounds_the_error_in_a_clustered_spectrum(method, data_seed, seed, hessian_of, rounding):
    loss, params = clustered_tanh_mlp(data_seed)
    hessian = hessian_of(loss, params)
    exact = torch.linalg.eigvalsh(hessian)
    top, second = float(exact[-1]), float(exact[-2])
    assert abs(float(exact[0])) < top and second / top > 0.9
    reg = create_regularizer("hessian_top_eigenvalue", products="hvp", iters=200, warm_start=False, method=method, seed=seed)
    tol = reg.tol
    value = reg(params, loss).item()
    # What a user reads into tol=1e-3 (a rule on the change of the estimate stopped up to
    # 5e-3 off here with power iteration, and up to 4e-2 with Lanczos).
    assert abs(value - top) <= tol * top
    # What the stopping rule guarantees: a residual of at most tol·|λ|, hence an
    # eigenvalue within it, and λ_max within residual²/gap since the probe found it.
    residual = reg.last_residual
    assert residual <= tol * abs(value) + rounding(hessian)
    assert_top_within_its_bound(value, residual, hessian, rounding(hessian))
    assert reg.last_hvps < 200


@pytest.mark.parametrize("iters", [1, 3, 10])
@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_last_residual_bounds_the_error_even_when_the_budget_runs_out(iters, method, hessian_of, rounding):
    loss, params = clustered_tanh_mlp()
    hessian = hessian_of(loss, params)
    exact = torch.linalg.eigvalsh(hessian)
    reg = HessianTopEigenvalue(products="hvp", iters=iters, warm_start=False, method=method, tol=1e-3, seed=0)
    value = reg(params, loss).item()
    assert reg.last_hvps == iters + 1
    assert reg.last_residual > 1e-3 * abs(value)  # not converged: the honest residual is large
    assert float((exact - value).abs().min()) <= reg.last_residual + rounding(hessian)


def test_power_iteration_stops_at_the_first_vector_within_tol(hessian_of, rounding):
    loss, params = clustered_tanh_mlp()
    params = [p.requires_grad_(True) for p in params]
    hessian = hessian_of(loss, params)
    _, grads = gradient(loss, params)
    probe = random_like(params, torch.Generator().manual_seed(0))
    run = power_iteration(grads, params, probe, iters=500, tol=1e-4)
    v = torch.cat([x.reshape(-1) for x in run.vector])
    assert run.converged and float(v @ hessian @ v) == pytest.approx(run.value, abs=rounding(hessian))
    assert float(torch.linalg.vector_norm(hessian @ v - run.value * v)) == pytest.approx(
        run.residual, abs=rounding(hessian))
    assert run.residual <= 1e-4 * abs(run.value)
    # One HVP fewer had not met the rule.
    earlier = power_iteration(grads, params, probe, iters=run.hvps - 1, tol=1e-4)
    assert not earlier.converged and earlier.residual > 1e-4 * abs(earlier.value)
    ahead = torch.cat([x.reshape(-1) for x in run.ahead])
    assert torch.allclose(ahead, hessian @ v / torch.linalg.vector_norm(hessian @ v), atol=1e-12)


def test_warm_calls_spend_warm_iters_hvps_and_report_their_residual(hessian_of, rounding):
    loss, params = clustered_tanh_mlp()
    for warm_iters in (0, 1, 3):
        reg = HessianTopEigenvalue(products="hvp", iters=200, warm_iters=warm_iters, tol=1e-3, seed=0)
        reg(params, loss)
        for k in range(1, 4):
            moved = [p + 1e-3 * k for p in params]
            value = reg(moved, loss).item()
            hessian = hessian_of(loss, moved)
            assert reg.last_hvps <= warm_iters + 1
            nearest = float((torch.linalg.eigvalsh(hessian) - value).abs().min())
            assert nearest <= reg.last_residual + rounding(hessian)


def test_the_default_products_are_exact_hvps(tiny_mlp):
    # Finite differences need a step no one value of which serves both ReLU conv nets and
    # ViTs (benchmarks/regularizer_cost.py, part 4), so the default stays exact.
    params = tiny_mlp.init_params(9)
    default = HessianTopEigenvalue(seed=0)
    exact = HessianTopEigenvalue(seed=0, products="hvp")
    assert float(default(params, tiny_mlp.loss)) == float(exact(params, tiny_mlp.loss))
    assert default.last_residual == exact.last_residual
