"""HessianTrace against the exact Hessian of small float64 problems.

The products are HVPs here (``products="hvp"``), exact to rounding; the
finite-difference products are checked against them in ``test_finite_difference.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.regularizers.hessian_trace import HessianTrace


def hutchinson_variance(hessian: torch.Tensor, distribution: str) -> float:
    """Variance of a single-probe estimate vᵀHv: 2‖H‖_F² (Gaussian), minus the diagonal (±1)."""
    frobenius = float((hessian**2).sum())
    if distribution == "gaussian":
        return 2.0 * frobenius
    return 2.0 * (frobenius - float((torch.diagonal(hessian) ** 2).sum()))


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_matches_exact_trace(tiny_mlp, hessian_of, distribution):
    params = tiny_mlp.init_params(seed=0)
    hessian = hessian_of(tiny_mlp.loss, params)
    exact = float(torch.trace(hessian))
    probes = 8192
    sigma = math.sqrt(hutchinson_variance(hessian, distribution) / probes)
    # The tolerance must be tight enough to catch a wrong scale or a missing term.
    assert 4 * sigma < 0.1 * abs(exact)

    estimate = HessianTrace(products="hvp", probes=probes, distribution=distribution, seed=0)(params, tiny_mlp.loss)

    assert estimate.dim() == 0
    assert abs(float(estimate.detach()) - exact) < 4 * sigma


def test_rademacher_is_exact_on_a_diagonal_hessian():
    diagonal = torch.tensor([0.5, -1.0, 2.0, 4.0], dtype=torch.float64)

    def loss_fn(params):
        return 0.5 * (diagonal * params[0] ** 2).sum()

    # vᵀ diag(h) v = Σ h_i v_i² = Σ h_i for every ±1 probe, so even one probe is exact.
    estimate = HessianTrace(products="hvp", probes=1, seed=3)([torch.ones(4, dtype=torch.float64)], loss_fn)
    assert float(estimate.detach()) == pytest.approx(float(diagonal.sum()), abs=1e-12)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_standard_deviation_shrinks_like_one_over_sqrt_probes(tiny_mlp, hessian_of, distribution):
    params = tiny_mlp.init_params(seed=0)
    hessian = hessian_of(tiny_mlp.loss, params)
    single = math.sqrt(hutchinson_variance(hessian, distribution))
    repeats = 200
    stds = {}
    for probes in (4, 64):
        reg = HessianTrace(products="hvp", probes=probes, distribution=distribution, seed=probes)
        values = torch.tensor([float(reg(params, tiny_mlp.loss).detach()) for _ in range(repeats)])
        stds[probes] = float(values.std())
        # With 200 repeats the sample std is within ~10% of the truth; kurtosis widens it.
        assert stds[probes] == pytest.approx(single / math.sqrt(probes), rel=0.25)
    # sqrt(64 / 4) = 4.
    assert 2.8 < stds[4] / stds[64] < 5.6


def test_gradcheck_with_a_fixed_probe(tiny_mlp):
    reg = HessianTrace(products="hvp", probes=3, seed=0)

    def trace_at(*params):
        # Reseeding makes the estimate a deterministic function of the params.
        reg.generator.manual_seed(11)
        return reg(list(params), tiny_mlp.loss)

    params = tuple(p.requires_grad_(True) for p in tiny_mlp.init_params(seed=1))
    assert torch.autograd.gradcheck(trace_at, params, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_seeded_instances_repeat_and_calls_draw_fresh_probes(tiny_mlp):
    params = tiny_mlp.init_params(seed=0)
    global_state = torch.random.get_rng_state()
    first, second = HessianTrace(products="hvp", probes=2, seed=5), HessianTrace(products="hvp", probes=2, seed=5)
    a1, a2 = float(first(params, tiny_mlp.loss).detach()), float(first(params, tiny_mlp.loss).detach())
    b1 = float(second(params, tiny_mlp.loss).detach())
    assert a1 == b1
    assert a1 != a2
    assert first.last_value == a2
    assert torch.equal(torch.random.get_rng_state(), global_state)


def test_float32_matches_float64_with_the_same_probes(tiny_mlp):
    params = tiny_mlp.init_params(seed=0)
    in_double = HessianTrace(products="hvp", probes=8, seed=2)(params, tiny_mlp.loss)
    single_mlp = type(tiny_mlp)(tiny_mlp.x.float(), tiny_mlp.y.float())
    in_single = HessianTrace(products="hvp", probes=8, seed=2)([p.float() for p in params], single_mlp.loss)
    assert in_single.dtype == torch.float32
    # Rademacher probes are the same ±1 in either dtype, so only rounding differs: float32
    # HVPs on this net agree with float64 to ~2e-7 relative (ε = 1.2e-7, little cancellation);
    # 1e-4 leaves a factor of 500 for other kernels' orders of summation.
    assert float(in_single.detach()) == pytest.approx(float(in_double.detach()), rel=1e-4)


def test_unused_and_affine_parameters_contribute_nothing(tiny_mlp, hessian_of):
    params = tiny_mlp.init_params(seed=0)
    unused, linear = torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)

    def loss_fn(ps):
        return tiny_mlp.loss(ps[:4]) + 3.0 * ps[5].sum()

    hessian = hessian_of(tiny_mlp.loss, params)
    exact = float(torch.trace(hessian))
    estimate = HessianTrace(products="hvp", probes=4096, seed=0)(params + [unused, linear], loss_fn)
    # The extra parameters add zero rows and columns: the same trace and variance as H.
    assert abs(float(estimate.detach()) - exact) < 4 * math.sqrt(hutchinson_variance(hessian, "rademacher") / 4096)

    only_affine = [linear.clone().requires_grad_(True)]
    zero = HessianTrace(products="hvp", probes=2, seed=0)(only_affine, lambda ps: 3.0 * ps[0].sum())
    zero.backward()
    assert float(zero.detach()) == 0.0
    assert torch.equal(only_affine[0].grad, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize(
    ("options", "named"),
    [({"probes": 0}, "probes"), ({"probes": 2.5}, "probes"), ({"distribution": "uniform"}, "distribution")],
)
def test_rejects_bad_options(options, named):
    with pytest.raises(ValueError, match=named) as info:
        HessianTrace(**options)
    assert isinstance(info.value, ConfigError)


def test_the_default_products_are_exact_hvps(tiny_mlp):
    # Finite differences lose the meta-gradient's direction on ReLU conv nets
    # (benchmarks/regularizer_cost.py, part 4), so the trace keeps exact products by default.
    params = tiny_mlp.init_params(seed=1)
    default = float(HessianTrace(probes=3, seed=4)(params, tiny_mlp.loss).detach())
    exact = float(HessianTrace(probes=3, seed=4, products="hvp")(params, tiny_mlp.loss).detach())
    assert default == exact
