"""RNNProp: the shared protocol checks, then its features, bound and random scaling."""

from __future__ import annotations

import math

import pytest
import torch

from flat_l2o_plugin.errors import ConfigError, FlatL2OError
from flat_l2o_plugin.optimizers import RNNProp, adam_features
from flat_l2o_plugin.protocols import LearnedOptimizer

STATE_KEYS = [
    "step",
    "exp_avg",
    "exp_avg_sq",
    "lstm_h_0",
    "lstm_c_0",
    "lstm_h_1",
    "lstm_c_1",
]


def test_follows_the_protocol_with_paper_defaults() -> None:
    opt = RNNProp()
    assert isinstance(opt, LearnedOptimizer)
    assert (opt.hidden_size, opt.num_layers) == (20, 2)
    assert (opt.beta1, opt.beta2, opt.eps) == (0.95, 0.95, 1e-8)
    assert opt.output_scale == 0.1
    assert opt.random_scaling == 0.0
    assert opt.input_layer.in_features == 2 and opt.output_layer.out_features == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_and_dtypes_are_preserved(checks, dtype) -> None:
    checks.shapes_and_dtypes(RNNProp, dtype)


def test_float64_optimizer_for_float64_params(checks) -> None:
    checks.shapes_and_dtypes(lambda: RNNProp().double(), torch.float64)


def test_state_keys_are_stable_and_per_coordinate(checks) -> None:
    checks.state_layout(RNNProp, STATE_KEYS)


def test_state_keys_follow_num_layers() -> None:
    state = RNNProp(num_layers=3, hidden_size=7).init_state([torch.zeros(5)])
    assert state["lstm_h_2"].shape == (5, 7)
    assert "lstm_h_3" not in state


def test_input_state_is_not_mutated(checks) -> None:
    checks.state_not_mutated(RNNProp)


def test_safetensors_round_trip_resumes_the_same_trajectory(checks) -> None:
    checks.state_round_trip(RNNProp)


def test_round_trip_keeps_random_scaling_factors(checks) -> None:
    checks.state_round_trip(lambda: RNNProp(random_scaling=1.0))


def test_step_is_differentiable_in_every_weight(checks) -> None:
    checks.differentiable(RNNProp)


def test_no_graph_under_no_grad(checks) -> None:
    checks.no_graph_under_no_grad(RNNProp)


def test_permuting_coordinates_permutes_the_update(checks) -> None:
    checks.permutation_equivariant(RNNProp)


def test_each_coordinate_is_updated_from_its_own_gradients_only(checks) -> None:
    checks.coordinates_independent(RNNProp)


def test_splitting_into_tensors_does_not_change_the_update(checks) -> None:
    checks.split_invariant(RNNProp)


def test_adam_features_match_hand_computation_over_two_steps() -> None:
    """m, v, bias correction and both features, against plain-float arithmetic."""
    g1 = [0.5, -2.0, 1e-3, 0.0]
    g2 = [-0.25, 3.0, 1e-3, 4.0]
    b1 = b2 = 0.95
    eps = 1e-8

    def by_hand(t: int, m: float, v: float, g: float) -> tuple[float, float, float, float]:
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        return m, v, m_hat / (math.sqrt(v_hat) + eps), g / (math.sqrt(v_hat) + eps)

    expected = []
    for i in range(4):
        m1, v1, *_ = by_hand(1, 0.0, 0.0, g1[i])
        expected.append(by_hand(2, m1, v1, g2[i]))
    m_expected, v_expected, f1_expected, f2_expected = (
        torch.tensor([row[k] for row in expected], dtype=torch.float64) for k in range(4)
    )
    # Spot-check one hand value outright: coordinate 0 at step 2.
    assert m_expected[0].item() == pytest.approx(0.95 * 0.025 + 0.05 * -0.25)
    assert v_expected[0].item() == pytest.approx(0.95 * 0.0125 + 0.05 * 0.0625)

    # Through the optimizer itself: the features the input layer receives and the
    # moments it stores.
    opt = RNNProp().double()
    seen = []
    opt.input_layer.register_forward_hook(lambda mod, inputs, out: seen.append(inputs[0]))
    params = [torch.zeros(4, dtype=torch.float64)]
    state = opt.init_state(params)
    with torch.no_grad():
        params, state = opt.step(params, [torch.tensor(g1, dtype=torch.float64)], state)
        params, state = opt.step(params, [torch.tensor(g2, dtype=torch.float64)], state)
    torch.testing.assert_close(state["exp_avg"], m_expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(state["exp_avg_sq"], v_expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(seen[1][:, 0], f1_expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(seen[1][:, 1], f2_expected, rtol=1e-10, atol=1e-12)
    # Step 1 after bias correction: m̂ = g and v̂ = g², so both features are
    # g / (|g| + eps), about sign(g), and exactly 0 where g = 0.
    first = torch.tensor([g / (abs(g) + eps) for g in g1], dtype=torch.float64)
    torch.testing.assert_close(seen[0], torch.stack([first, first], dim=-1), rtol=1e-12, atol=0)
    assert seen[0][3].tolist() == [0.0, 0.0]

    # The public helper gives the same numbers.
    feats, m, v = adam_features(
        torch.tensor(g2, dtype=torch.float64),
        torch.tensor([by_hand(1, 0.0, 0.0, g)[0] for g in g1], dtype=torch.float64),
        torch.tensor([by_hand(1, 0.0, 0.0, g)[1] for g in g1], dtype=torch.float64),
        torch.tensor(2),
        beta1=b1,
        beta2=b2,
        eps=eps,
    )
    torch.testing.assert_close(feats, seen[1], rtol=1e-12, atol=0)


def test_update_is_output_scale_times_tanh() -> None:
    opt = RNNProp(output_scale=0.03)
    with torch.no_grad():
        opt.output_layer.weight.zero_()
        opt.output_layer.bias.fill_(0.5)
        params = [torch.randn(10)]
        (new,), _ = opt.step(params, [torch.randn(10)], opt.init_state(params))
    torch.testing.assert_close(new - params[0], torch.full((10,), 0.03 * math.tanh(0.5)))


def test_random_scaling_is_off_by_default_and_then_stores_no_factors() -> None:
    opt = RNNProp().train()
    state = opt.init_state([torch.randn(50)])
    assert "scale" not in state and opt.state_keys() == STATE_KEYS
    # 2 moments and h, c of each layer: what every step reads, and nothing else.
    assert sum(v[0].numel() for k, v in state.items() if k != "step") == 2 + 2 * 2 * 20
    on = RNNProp(random_scaling=1.0)
    assert on.state_keys() == [*STATE_KEYS, "scale"]
    assert torch.equal(on.eval().init_state([torch.randn(50)])["scale"], torch.ones(50))


def _twin(random_scaling: float) -> tuple[RNNProp, RNNProp]:
    torch.manual_seed(0)
    off = RNNProp()
    on = RNNProp(random_scaling=random_scaling)
    on.load_state_dict(off.state_dict())
    return off, on


def test_random_scaling_has_no_effect_in_eval_mode() -> None:
    off, on = _twin(2.0)
    params, grads = [torch.randn(30)], [torch.randn(30)]
    scaled_state = on.train().init_state(params)  # draws factors c != 1
    assert not torch.equal(scaled_state["scale"], torch.ones(30))
    on.eval()
    off.eval()
    assert torch.equal(on.init_state(params)["scale"], torch.ones(30))
    with torch.no_grad():
        (from_off,), _ = off.step(params, grads, off.init_state(params))
        (from_on,), _ = on.step(params, grads, scaled_state)
    assert torch.equal(from_off, from_on)


def test_random_scaling_in_training_trains_on_a_rescaled_problem() -> None:
    """On f(c ⊙ θ') the optimizer sees c ⊙ g and its step is mapped back as c ⊙ Δθ'."""
    s = 1.5
    off, on = _twin(s)
    params, grads = [torch.randn(200)], [torch.randn(200)]
    state = on.train().init_state(params, generator=torch.Generator().manual_seed(3))
    c = state["scale"]
    assert c.min() >= math.exp(-s) and c.max() <= math.exp(s)
    assert c.min() < 0.5 and c.max() > 2.0  # spread over the range, not all ones
    again = on.init_state(params, generator=torch.Generator().manual_seed(3))["scale"]
    assert torch.equal(c, again)  # reproducible from the generator

    with torch.no_grad():
        (from_off,), _ = off.train().step(params, grads, off.init_state(params))
        (from_on,), on_state = on.step(params, grads, state)
    delta_off, delta_on = from_off - params[0], from_on - params[0]
    assert not torch.allclose(delta_on, delta_off)
    # RNNProp's features ignore a positive rescaling of g (up to eps), so the network
    # takes the same Δθ' and only the mapping back by c differs.
    torch.testing.assert_close(delta_on, c * delta_off, rtol=1e-4, atol=1e-6)
    # Moments are those of the rescaled gradient c ⊙ g.
    torch.testing.assert_close(on_state["exp_avg"], 0.05 * c * grads[0])


def test_meta_training_lowers_the_meta_loss(checks) -> None:
    losses = checks.meta_training_losses(RNNProp)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert all(math.isfinite(x) for x in losses)
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hidden_size": 0},
        {"num_layers": 0},
        {"beta1": 1.0},
        {"beta2": -0.1},
        {"eps": 0.0},
        {"output_scale": 0.0},
        {"random_scaling": -1.0},
    ],
)
def test_rejects_out_of_range_hyperparameters(kwargs) -> None:
    with pytest.raises(ConfigError, match=f"RNNProp: .*{next(iter(kwargs))}"):
        RNNProp(**kwargs)


def test_state_for_other_params_is_rejected_with_the_fix() -> None:
    opt = RNNProp()
    state = opt.init_state([torch.zeros(5)])
    with pytest.raises(FlatL2OError, match=r"init_state\(params\)"):
        opt.step([torch.zeros(6)], [torch.zeros(6)], state)
    with pytest.raises(FlatL2OError, match="no 'exp_avg'"):
        opt.step([torch.zeros(5)], [torch.zeros(5)], {"step": state["step"]})
