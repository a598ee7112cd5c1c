"""The synthetic problems against their closed forms: Hessians, minima, noise expectations."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import hessian

from flat_l2o_plugin import create_task
from flat_l2o_plugin.errors import ConfigError


def float32_mean_rounding(mean: float, n: int) -> float:
    """A bound on the float32 rounding of a mean of n positive terms by pairwise summation:
    about log₂ n roundings of relative size ε each."""
    return math.log2(n) * torch.finfo(torch.float32).eps * abs(mean)


def test_quadratic_hessian_and_spectrum_are_exact():
    task = create_task("quadratic", dim=6, condition_number=50.0)
    (theta,) = task.init_params(0)
    exact = hessian(lambda t: task.loss([t], task.full_batch()), theta)
    assert torch.allclose(exact, task.hessian, atol=1e-6)
    spectrum = torch.linalg.eigvalsh(task.hessian.double()).flip(0)
    # A and λ are built in float64 and stored in float32: rounding moves each entry by at
    # most u = ε/2 relative, so by Weyl each eigenvalue by at most u·‖A‖_F (plus u·λ for
    # the stored λ and float64 eigvalsh error, far smaller).
    u = torch.finfo(torch.float32).eps / 2
    weyl = u * float(torch.linalg.matrix_norm(task.hessian.double())) + u * spectrum + 1e-12
    assert bool(((spectrum - task.eigenvalues.double()).abs() <= weyl).all())
    assert abs(float(spectrum[0]) - 1.0) <= float(weyl[0])
    assert float(spectrum[0] / spectrum[-1]) == pytest.approx(50.0, rel=2 * float(weyl[-1] / spectrum[-1]))
    at_minimum = task.evaluate([task.minimizer], "test")
    assert at_minimum["loss"] == pytest.approx(0.0, abs=1e-10) and at_minimum["distance"] == 0.0
    # The problem belongs to problem_seed; the init seed only moves the start.
    assert torch.equal(create_task("quadratic", dim=6, condition_number=50.0).hessian, task.hessian)
    assert not torch.equal(create_task("quadratic", dim=6, condition_number=50.0, problem_seed=1).hessian,
                           task.hessian)


def test_noisy_quadratic_batches_are_unbiased():
    sigma = 0.3
    task = create_task("quadratic", dim=5, condition_number=10.0, noise_std=sigma, batch_size=50_000)
    params = task.init_params(0)
    batch = task.sample_batch(torch.Generator().manual_seed(0))
    # E[loss] = f(θ) + ½ σ² tr(A): the noise shifts the level, never the gradient's mean.
    shift = 0.5 * sigma**2 * float(task.hessian.trace())
    expected = task.evaluate(params, "train")["loss"] + shift
    # Per example ½(r − ξ)ᵀA(r − ξ) = ½rᵀAr − rᵀAξ + ½ξᵀAξ, r = θ − θ*: variance
    # σ²‖Ar‖² + ½σ⁴ tr A² for Gaussian ξ.
    a, r = task.hessian.double(), (params[0] - task.minimizer).double()
    std = math.sqrt((sigma**2 * float((a @ r).square().sum()) + 0.5 * sigma**4 * float((a @ a).trace())) / 50_000)
    assert 5 * std < 0.1 * shift  # the check can tell a missing shift
    assert abs(float(task.loss(params, batch)) - expected) <= 5 * std + float32_mean_rounding(expected, 50_000)
    assert not torch.equal(batch, task.sample_batch(torch.Generator().manual_seed(1)))


def test_rosenbrock_known_values_and_noise():
    task = create_task("rosenbrock")
    zero_shift = task.full_batch()
    assert float(task.loss([torch.tensor([-1.2, 1.0])], zero_shift)) == pytest.approx(24.2, rel=1e-6)
    ones = torch.ones(4, requires_grad=True)
    deep = create_task("rosenbrock", dim=4)
    value = deep.loss([ones], deep.full_batch())
    (grad,) = torch.autograd.grad(value, ones)
    assert float(value.detach()) == 0.0 and torch.count_nonzero(grad) == 0
    assert deep.evaluate([ones.detach()], "val") == {"loss": 0.0, "distance": 0.0}

    sigma = 0.5
    noisy = create_task("rosenbrock", dim=3, noise_std=sigma, batch_size=50_000)
    x = noisy.init_params(0)
    batch = noisy.sample_batch(torch.Generator().manual_seed(0))
    shift = 2 * sigma**2  # (d - 1) σ²
    expected = noisy.evaluate(x, "test")["loss"] + shift
    # Per row Σᵢ (1 − xᵢ + ξᵢ)² + the noise-free terms: variance Σᵢ 4(1 − xᵢ)²σ² + 2σ⁴.
    std = math.sqrt(float((4 * (1 - x[0][:-1].double()) ** 2 * sigma**2 + 2 * sigma**4).sum()) / 50_000)
    assert 5 * std < 0.1 * shift  # the check can tell a missing shift
    assert abs(float(noisy.loss(x, batch)) - expected) <= 5 * std + float32_mean_rounding(expected, 50_000)


def test_logistic_regression_penalty_and_metrics():
    plain = create_task("logistic_regression")
    ridge = create_task("logistic_regression", l2=0.5)
    assert plain.name == "logreg_synthetic_linear[20-2]" and ridge.name == "logreg_synthetic_linear[20-2,l2=0.5]"
    params = plain.init_params(0)
    batch = plain.sample_batch(torch.Generator().manual_seed(0))
    penalty = 0.25 * float(params[0].square().sum())
    assert float(ridge.loss(params, batch)) == pytest.approx(float(plain.loss(params, batch)) + penalty, rel=1e-6)
    assert ridge.evaluate(params, "val") == plain.evaluate(params, "val")  # metrics exclude the penalty
    digits = create_task("logistic_regression", dataset="digits")
    assert [tuple(p.shape) for p in digits.init_params(0)] == [(10, 64), (10,)]


def test_synthetic_problem_errors_name_the_option():
    with pytest.raises(ConfigError, match="condition_number"):
        create_task("quadratic", condition_number=0.5)
    with pytest.raises(ConfigError, match="condition_number"):
        create_task("quadratic", condition_number=math.inf)
    with pytest.raises(ConfigError, match="dim must be an integer >= 2"):
        create_task("rosenbrock", dim=1)
    with pytest.raises(ConfigError, match="noise_std"):
        create_task("rosenbrock", noise_std=-0.1)
    with pytest.raises(ConfigError, match="l2"):
        create_task("logistic_regression", l2=-1)
