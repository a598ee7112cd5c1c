"""The synthetic problems against their closed forms: Hessians, minima, noise expectations."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import hessian

from flat_l2o_plugin import create_task
from flat_l2o_plugin.errors import ConfigError


def test_quadratic_hessian_and_spectrum_are_exact():
    task = create_task("quadratic", dim=6, condition_number=50.0)
    (theta,) = task.init_params(0)
    exact = hessian(lambda t: task.loss([t], task.full_batch()), theta)
    assert torch.allclose(exact, task.hessian, atol=1e-6)
    spectrum = torch.linalg.eigvalsh(task.hessian.double()).flip(0)
    assert torch.allclose(spectrum, task.eigenvalues.double(), rtol=1e-5)
    assert float(spectrum[0]) == pytest.approx(1.0, rel=1e-5)
    assert float(spectrum[0] / spectrum[-1]) == pytest.approx(50.0, rel=1e-4)
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
    expected = task.evaluate(params, "train")["loss"] + 0.5 * sigma**2 * float(task.hessian.trace())
    assert float(task.loss(params, batch)) == pytest.approx(expected, rel=2e-2)
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
    expected = noisy.evaluate(x, "test")["loss"] + 2 * sigma**2  # (d - 1) σ²
    assert float(noisy.loss(x, batch)) == pytest.approx(expected, rel=2e-2)


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
