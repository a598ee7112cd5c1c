"""L2O-DM: the shared protocol checks, then its log/sign preprocessing and output."""

from __future__ import annotations

import math

import pytest
import torch

from flat_l2o_plugin.errors import ConfigError, FlatL2OError
from flat_l2o_plugin.optimizers import L2ODM, log_sign_preprocess
from flat_l2o_plugin.protocols import LearnedOptimizer

STATE_KEYS = ["step", "lstm_h_0", "lstm_c_0", "lstm_h_1", "lstm_c_1"]


def by_formula(g: float, p: float) -> tuple[float, float]:
    """Appendix A of Andrychowicz et al. (2016), written out branch by branch."""
    if abs(g) >= math.exp(-p):
        return math.log(abs(g)) / p, math.copysign(1.0, g)
    return -1.0, math.exp(p) * g


def test_follows_the_protocol_with_paper_defaults() -> None:
    opt = L2ODM()
    assert isinstance(opt, LearnedOptimizer)
    assert (opt.hidden_size, opt.num_layers, opt.preprocess_p) == (20, 2, 10.0)
    assert opt.output_scale == 0.1
    assert opt.cells[0].input_size == 2 and opt.output_layer.out_features == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_and_dtypes_are_preserved(checks, dtype) -> None:
    checks.shapes_and_dtypes(L2ODM, dtype)


def test_state_keys_are_stable_and_per_coordinate(checks) -> None:
    checks.state_layout(L2ODM, STATE_KEYS)


def test_input_state_is_not_mutated(checks) -> None:
    checks.state_not_mutated(L2ODM)


def test_safetensors_round_trip_resumes_the_same_trajectory(checks) -> None:
    checks.state_round_trip(L2ODM)


def test_step_is_differentiable_in_every_weight(checks) -> None:
    checks.differentiable(L2ODM)


def test_no_graph_under_no_grad(checks) -> None:
    checks.no_graph_under_no_grad(L2ODM)


def test_permuting_coordinates_permutes_the_update(checks) -> None:
    checks.permutation_equivariant(L2ODM)


def test_each_coordinate_is_updated_from_its_own_gradients_only(checks) -> None:
    checks.coordinates_independent(L2ODM)


def test_splitting_into_tensors_does_not_change_the_update(checks) -> None:
    checks.split_invariant(L2ODM)


def test_preprocessing_matches_the_formula_on_both_branches() -> None:
    p = 10.0
    boundary = math.exp(-p)
    below = math.nextafter(boundary, 0.0)
    values = [0.0, 1e-9, -1e-9, 3e-6, -3e-6, below, -below, boundary, -boundary, 0.5, -3.0, 1e4]
    out = log_sign_preprocess(torch.tensor(values, dtype=torch.float64), p)
    expected = torch.tensor([by_formula(g, p) for g in values], dtype=torch.float64)
    assert out.shape == (len(values), 2)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-15)
    # Both branches are exercised: the small ones give exactly -1 and e^p g.
    assert out[1, 0] == -1.0 and out[1, 1] == pytest.approx(math.exp(p) * 1e-9)
    assert out[-1, 1] == 1.0 and out[-2, 1] == -1.0


def test_preprocessing_is_continuous_at_the_boundary() -> None:
    p = 10.0
    at = torch.tensor([math.exp(-p), -math.exp(-p)], dtype=torch.float64)
    just_below = at * (1 - 1e-12)
    torch.testing.assert_close(log_sign_preprocess(at, p), log_sign_preprocess(just_below, p))
    torch.testing.assert_close(
        log_sign_preprocess(at, p), torch.tensor([[-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    )
    # |g| = e^{-p} itself takes the log/sign branch: its sign feature is exactly ±1,
    # where e^p g would round to 1 + 2^-52 in float64.
    assert math.exp(p) * math.exp(-p) != 1.0
    assert log_sign_preprocess(at, p)[:, 1].tolist() == [1.0, -1.0]


def test_preprocessing_in_float32_and_other_p() -> None:
    p = 5.0
    values = [0.0, 1e-4, -2e-3, 0.00673, 0.1, -7.0]
    out = log_sign_preprocess(torch.tensor(values, dtype=torch.float32), p)
    assert out.dtype == torch.float32
    expected = torch.tensor([by_formula(g, p) for g in values], dtype=torch.float32)
    torch.testing.assert_close(out, expected)


def test_lstm_sees_the_preprocessed_gradient() -> None:
    opt = L2ODM(preprocess_p=10.0)
    seen = []
    opt.cells[0].register_forward_hook(lambda mod, inputs, out: seen.append(inputs[0]))
    grad = torch.tensor([0.0, 1e-7, -0.3, 2.0, 1e-3])
    params = [torch.zeros(5)]
    with torch.no_grad():
        opt.step(params, [grad], opt.init_state(params))
    expected = torch.tensor([by_formula(g, 10.0) for g in grad.tolist()])
    torch.testing.assert_close(seen[0], expected)


def test_update_is_output_scale_times_linear_output() -> None:
    torch.manual_seed(0)
    small = L2ODM(output_scale=0.01)
    large = L2ODM(output_scale=0.2)
    large.load_state_dict(small.state_dict())
    params, grads = [torch.randn(16)], [torch.randn(16)]
    with torch.no_grad():
        (a,), _ = small.step(params, grads, small.init_state(params))
        (b,), _ = large.step(params, grads, large.init_state(params))
        opt = L2ODM(output_scale=0.5)
        opt.output_layer.weight.zero_()
        opt.output_layer.bias.fill_(3.0)  # beyond tanh's range: the output is not squashed
        (c,), _ = opt.step(params, grads, opt.init_state(params))
    torch.testing.assert_close(b - params[0], 20.0 * (a - params[0]))
    torch.testing.assert_close(c - params[0], torch.full((16,), 1.5))


def test_zero_gradient_gives_finite_update_and_meta_gradient() -> None:
    torch.manual_seed(0)
    opt = L2ODM()
    params = [torch.zeros(4)]
    (new,), _ = opt.step(params, [torch.zeros(4)], opt.init_state(params))
    grads = torch.autograd.grad(new.sum(), list(opt.parameters()), allow_unused=True)
    assert torch.isfinite(new).all()
    assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_meta_training_lowers_the_meta_loss(checks) -> None:
    losses = checks.meta_training_losses(L2ODM)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert all(math.isfinite(x) for x in losses)
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize(
    "kwargs",
    [{"hidden_size": 0}, {"num_layers": 0}, {"preprocess_p": 0.0}, {"output_scale": -0.1}],
)
def test_rejects_out_of_range_hyperparameters(kwargs) -> None:
    with pytest.raises(ConfigError, match=f"L2ODM: .*{next(iter(kwargs))}"):
        L2ODM(**kwargs)


def test_state_for_other_params_is_rejected_with_the_fix() -> None:
    opt = L2ODM()
    state = opt.init_state([torch.zeros(5)])
    with pytest.raises(FlatL2OError, match=r"L2ODM.init_state\(params\)"):
        opt.step([torch.zeros(2, 3)], [torch.zeros(2, 3)], state)
