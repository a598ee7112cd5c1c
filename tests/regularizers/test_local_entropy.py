"""LocalEntropy against the closed form of -F on a quadratic, and its batching paths.

For f(θ') = ½θ'ᵀAθ' and M = A + γI, -F(θ; γ) and ∇(-F) = γ(θ - γM⁻¹θ) are known
exactly (see ``Quadratic`` in conftest.py). The tolerances below are about four Monte-Carlo
standard deviations of each estimator at the stated sample counts, measured over seeds.
"""

from __future__ import annotations

import pytest
import torch

from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.regularizers.local_entropy import LocalEntropy


def value_and_grad(reg, theta, loss_fn):
    leaf = theta.clone().requires_grad_(True)
    out = reg([leaf], loss_fn)
    out.backward()
    return float(out.detach()), leaf.grad


@pytest.mark.parametrize(
    ("gamma", "temperature", "value_tol", "grad_tol"),
    [(1.0, 1.0, 0.05, 0.05), (10.0, 1.0, 0.03, 0.04), (4.0, 0.5, 0.03, 0.04)],
)
def test_smoothing_matches_closed_form(quadratic, gamma, temperature, value_tol, grad_tol):
    reg = LocalEntropy(gamma=gamma, samples=16384, estimator="smoothing", temperature=temperature, seed=0)
    value, grad = value_and_grad(reg, quadratic.theta, quadratic.loss)

    assert value == pytest.approx(quadratic.neg_local_entropy(quadratic.theta, gamma, temperature), abs=value_tol)
    expected = quadratic.neg_local_entropy_grad(quadratic.theta, gamma)
    assert torch.allclose(grad, expected, atol=grad_tol, rtol=0)
    assert reg.last_value == value


@pytest.mark.parametrize(("gamma", "value_tol", "grad_tol"), [(1.0, 0.1, 0.03), (10.0, 0.04, 0.1)])
def test_langevin_matches_closed_form_at_temperature_one(quadratic, gamma, value_tol, grad_tol):
    # Default steps and step size; 2000 chains because the gradient γ(θ - μ) has noise
    # ~sqrt(γ / N_eff) per coordinate at T = 1.
    reg = LocalEntropy(gamma=gamma, samples=2000, estimator="langevin", seed=0)
    value, grad = value_and_grad(reg, quadratic.theta, quadratic.loss)

    assert value == pytest.approx(quadratic.neg_local_entropy(quadratic.theta, gamma), abs=value_tol)
    expected = quadratic.neg_local_entropy_grad(quadratic.theta, gamma)
    assert torch.allclose(grad, expected, atol=grad_tol, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_smoothing_matches_quadrature_on_a_non_gaussian_problem(softplus_problem, temperature):
    gamma = 1.0
    reg = LocalEntropy(gamma=gamma, samples=16384, estimator="smoothing", temperature=temperature, seed=0)
    value, grad = value_and_grad(reg, softplus_problem.theta, softplus_problem.loss)
    expected_value, expected_grad = softplus_problem.reference(gamma, temperature)
    assert value == pytest.approx(expected_value, abs=0.04)
    assert torch.allclose(grad, expected_grad, atol=0.03, rtol=0)


def test_langevin_matches_quadrature_on_a_non_gaussian_problem(softplus_problem):
    # Off a quadratic, unadjusted Langevin has an O(step_size) bias in the mean: about
    # +0.03 here at the default 0.2 / γ, so this check uses a quarter of it and 400 steps.
    # The tolerance is a third of the change a 1.3x noise level (T = 1.69) would cause.
    gamma = 1.0
    reg = LocalEntropy(gamma=gamma, samples=2000, estimator="langevin", step_size=0.05, steps=400, seed=0)
    value, grad = value_and_grad(reg, softplus_problem.theta, softplus_problem.loss)
    expected_value, expected_grad = softplus_problem.reference(gamma)
    assert value == pytest.approx(expected_value, abs=0.1)
    assert torch.allclose(grad, expected_grad, atol=0.025, rtol=0)


def test_langevin_at_small_temperature_needs_few_chains(quadratic):
    # The Gibbs measure of a quadratic is Gaussian with mean γM⁻¹θ at every temperature,
    # so the gradient is unchanged while the chains' noise shrinks like sqrt(T).
    gamma = 10.0
    reg = LocalEntropy(gamma=gamma, samples=8, estimator="langevin", temperature=1e-4, seed=0)
    _, grad = value_and_grad(reg, quadratic.theta, quadratic.loss)
    expected = quadratic.neg_local_entropy_grad(quadratic.theta, gamma)
    assert torch.allclose(grad, expected, atol=0.025, rtol=0)


@pytest.mark.parametrize("estimator", ["smoothing", "langevin"])
def test_vectorized_and_looped_paths_agree(tiny_mlp, estimator):
    params = tiny_mlp.init_params(seed=0)
    results = []
    for vectorize in (True, False):
        reg = LocalEntropy(gamma=50.0, samples=6, estimator=estimator, steps=10, vectorize=vectorize, seed=3)
        leaves = [p.clone().requires_grad_(True) for p in params]
        out = reg(leaves, tiny_mlp.loss)
        out.backward()
        results.append((float(out.detach()), torch.cat([p.grad.reshape(-1) for p in leaves])))
        assert reg.vectorize is vectorize
    (value_v, grad_v), (value_l, grad_l) = results
    assert value_v == pytest.approx(value_l, rel=1e-10)
    assert torch.allclose(grad_v, grad_l, rtol=1e-8, atol=1e-12)


def test_falls_back_to_a_loop_when_loss_fn_cannot_be_vmapped(tiny_mlp):
    def guarded_loss(params):
        loss = tiny_mlp.loss(params)
        # Python control flow on a value: fine eagerly, impossible under vmap.
        if loss.item() > 1e6:
            raise RuntimeError("diverged")
        return loss

    params = tiny_mlp.init_params(seed=0)
    plain = LocalEntropy(gamma=50.0, samples=6, seed=4)(params, tiny_mlp.loss)
    reg = LocalEntropy(gamma=50.0, samples=6, seed=4)
    guarded = reg(params, guarded_loss)
    assert reg.vectorize is False
    assert float(guarded.detach()) == pytest.approx(float(plain.detach()), rel=1e-10)


def test_seeded_instances_repeat_without_touching_the_global_rng(tiny_mlp):
    params = tiny_mlp.init_params(seed=0)
    global_state = torch.random.get_rng_state()
    for estimator in ("smoothing", "langevin"):
        first = LocalEntropy(gamma=50.0, samples=4, estimator=estimator, steps=5, seed=9)
        second = LocalEntropy(gamma=50.0, samples=4, estimator=estimator, steps=5, seed=9)
        a1, a2 = float(first(params, tiny_mlp.loss).detach()), float(first(params, tiny_mlp.loss).detach())
        assert a1 == float(second(params, tiny_mlp.loss).detach())
        assert a1 != a2  # fresh draws on every call
    assert torch.equal(torch.random.get_rng_state(), global_state)


@pytest.mark.parametrize("estimator", ["smoothing", "langevin"])
def test_float32_params_give_a_float32_differentiable_result(tiny_mlp, estimator):
    mlp = type(tiny_mlp)(tiny_mlp.x.float(), tiny_mlp.y.float())
    leaves = [p.float().requires_grad_(True) for p in tiny_mlp.init_params(seed=0)]
    out = LocalEntropy(samples=4, estimator=estimator, steps=5, seed=0)(leaves, mlp.loss)
    out.backward()
    assert out.dtype == torch.float32 and out.dim() == 0 and torch.isfinite(out)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in leaves)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": float("inf")}, "gamma"),
        ({"samples": 0}, "samples"),
        ({"estimator": "laplace"}, "estimator"),
        ({"steps": 0}, "steps"),
        ({"step_size": -1e-3}, "step_size"),
        ({"temperature": 0.0}, "temperature"),
        ({"burn_in": 1.0}, "burn_in"),
        ({"antithetic": "yes"}, "antithetic"),
    ],
)
def test_rejects_bad_options(options, named):
    with pytest.raises(ValueError, match=named) as info:
        LocalEntropy(**options)
    assert isinstance(info.value, ConfigError)


def test_antithetic_draws_come_in_mirrored_pairs():
    seen = []

    def loss_fn(ps):
        seen.append(ps[0].detach().clone())
        return (ps[0] ** 2).sum()

    theta = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    LocalEntropy(gamma=50.0, samples=5, antithetic=True, vectorize=False, seed=0)([theta], loss_fn)
    offsets = torch.stack(seen) - theta
    assert offsets.shape[0] == 5
    # ⌈5/2⌉ = 3 draws and the mirror images of the first two.
    torch.testing.assert_close(offsets[3:], -offsets[:2], rtol=0, atol=1e-15)
    assert not torch.allclose(offsets[0], offsets[1])


def test_antithetic_draws_cancel_the_first_order_spread():
    """On a linear loss f = gᵀθ, with a = gᵀε ~ N(0, σ²), σ² = ‖g‖²T/γ:

    independent draws give −T·log mean e^(−a/T) ≈ mean(a) (T = 1), of variance ≈ σ²/S;
    S/2 mirrored pairs give −log mean cosh(a) ≈ −mean(a²)/2, of variance
    Var(a²/2)/(S/2) = σ⁴/S. At σ² = 0.01 the ratio is ~1/σ² = 100. Over 200 calls
    each, the ratio of sample variances stays within a factor 1.7 of the true one with
    probability > 1 - 1e-4 (F(199, 199)), so it must exceed 100/1.7 > 50; we ask for 20.
    """
    g = torch.tensor([0.6, -0.8], dtype=torch.float64)  # ‖g‖ = 1
    loss_fn = lambda ps: g @ ps[0]  # noqa: E731
    theta = [torch.zeros(2, dtype=torch.float64)]
    variances = {}
    for antithetic in (False, True):
        reg = LocalEntropy(gamma=100.0, samples=8, antithetic=antithetic, seed=1)
        values = torch.tensor([float(reg(theta, loss_fn).detach()) for _ in range(200)])
        variances[antithetic] = float(values.var())
    assert variances[False] > 20 * variances[True]
