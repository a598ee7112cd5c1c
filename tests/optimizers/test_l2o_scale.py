"""L2O-Scale: the shared protocol checks that apply, then its hierarchy, features and learning rate."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from flat_l2o_plugin.errors import ConfigError, FlatL2OError
from flat_l2o_plugin.optimizers import L2OScale
from flat_l2o_plugin.optimizers import l2o_scale as l2o_scale_module
from flat_l2o_plugin.optimizers.l2o_scale import gru_with_input_bias, multiscale_features, segment_mean
from flat_l2o_plugin.protocols import LearnedOptimizer
from flat_l2o_plugin.testing.optimizers import random_quadratics

STATE_KEYS = ["step", "grad_avg", "grad_sq_avg", "lr_offset", "param_h", "tensor_h", "global_h"]


def separable_grads(params: list[torch.Tensor], targets: list[torch.Tensor]) -> list[torch.Tensor]:
    """Detached gradient of ½‖θ - target‖²."""
    return [p.detach() - t for p, t in zip(params, targets)]


def run(opt: L2OScale, params: list[torch.Tensor], targets: list[torch.Tensor], steps: int,
        state: dict[str, torch.Tensor] | None = None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """``steps`` steps on ½‖θ - target‖², from ``state`` or a fresh one."""
    params = list(params)
    state = opt.init_state(params) if state is None else state
    for _ in range(steps):
        params, state = opt.step(params, separable_grads(params, targets), state)
    return params, state


def _coordinatewise_variant() -> L2OScale:
    """L2O-Scale with every path between coordinates cut: zero context weights, no
    per-tensor normalization of the direction, no relative learning rate."""
    opt = L2OScale(normalize_direction=False, relative_lr=False)
    with torch.no_grad():
        for weight in opt.context_weights():
            weight.zero_()
    return opt


def test_follows_the_protocol_with_the_documented_defaults() -> None:
    opt = L2OScale()
    assert isinstance(opt, LearnedOptimizer)
    assert (opt.hidden_size, opt.tensor_hidden_size, opt.global_hidden_size) == (10, 20, 20)
    assert opt.momentum_decays == (0.5, 0.9, 0.99)
    assert (opt.init_lr, opt.lr_momentum, opt.eps) == (3e-3, 0.9, 1e-8)
    assert opt.normalize_direction and opt.relative_lr and opt.gradient_shortcut
    # 3 normalized momenta + 3 relative log magnitudes + the relative log learning rate.
    assert opt.num_features == 7 and opt.param_cell.input_size == 7
    assert opt.tensor_cell.input_size == 10 and opt.global_cell.input_size == 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_and_dtypes_are_preserved(checks, dtype) -> None:
    checks.shapes_and_dtypes(L2OScale, dtype)


def test_float64_optimizer_for_float64_params(checks) -> None:
    checks.shapes_and_dtypes(lambda: L2OScale().double(), torch.float64)


def test_state_layout() -> None:
    opt = L2OScale()
    params = [torch.randn(2, 3), torch.randn(7, dtype=torch.float64), torch.randn(())]
    state = opt.init_state(params)
    assert list(state) == STATE_KEYS == opt.state_keys()
    assert state["step"].shape == () and state["step"].dtype == torch.int64
    expected = {
        "grad_avg": ((14, 3), torch.float64), "grad_sq_avg": ((14, 3), torch.float64),
        "lr_offset": ((14,), torch.float32), "param_h": ((14, 10), torch.float32),
        "tensor_h": ((3, 20), torch.float32), "global_h": ((1, 20), torch.float32),
    }
    for key, (shape, dtype) in expected.items():
        assert (tuple(state[key].shape), state[key].dtype) == (shape, dtype), key
        assert not state[key].any(), key
    new_params, state = run(opt, params, [torch.zeros_like(p) for p in params], steps=3, state=state)
    assert [p.dtype for p in new_params] == [torch.float32, torch.float64, torch.float32]
    assert list(state) == STATE_KEYS and int(state["step"]) == 3


def test_input_state_is_not_mutated(checks) -> None:
    checks.state_not_mutated(L2OScale)


def test_safetensors_round_trip_resumes_the_same_trajectory(checks) -> None:
    checks.state_round_trip(L2OScale)


def test_no_graph_under_no_grad(checks) -> None:
    checks.no_graph_under_no_grad(L2OScale)


def test_permuting_coordinates_within_a_tensor_permutes_the_update(checks) -> None:
    # Per-tensor means are symmetric in the coordinates, so this survives the hierarchy.
    checks.permutation_equivariant(L2OScale)


def test_the_context_reaches_the_update_one_step_later_and_every_weight_from_the_third() -> None:
    """A level's new state feeds the level below at the next step: with two steps the
    tensor and global recurrent weights (and the global-to-tensor context) have had no
    effect on any update yet."""
    torch.manual_seed(0)
    opt = L2OScale()
    params = [torch.randn(3, 4), torch.randn(6)]
    targets = [torch.randn(3, 4), torch.randn(6)]
    late = {"tensor_cell.weight_hh", "global_cell.weight_hh", "global_to_tensor.weight"}
    for steps, silent in ((2, late), (3, set())):
        new_params, _ = run(opt, params, targets, steps=steps)
        meta_loss = sum(((p - t) ** 2).sum() for p, t in zip(new_params, targets))
        names, weights = zip(*opt.named_parameters())
        grads = torch.autograd.grad(meta_loss, weights, allow_unused=True)
        zero = {n for n, g in zip(names, grads) if g is None or not g.any()}
        assert zero == silent, steps
        assert all(torch.isfinite(g).all() for g in grads if g is not None)


# ---------------------------------------------------------------------------- hierarchy


def _two_tensor_runs(opt: nn.Module, steps: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Iterates with the first tensor's gradients changed and the second's not."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(3, 4, generator=gen), torch.randn(8, generator=gen)]
    targets = [torch.randn(3, 4, generator=gen), torch.randn(8, generator=gen)]
    nudged = [targets[0] + torch.randn(3, 4, generator=gen), targets[1]]
    with torch.no_grad():
        plain, _ = run(opt, params, targets, steps=steps)
        other, _ = run(opt, params, nudged, steps=steps)
    return plain, other


def test_other_tensors_reach_an_update_through_the_context_only() -> None:
    torch.manual_seed(0)
    opt = L2OScale()
    # The first step sees the initial (zero) tensor and global states: no context yet.
    plain, other = _two_tensor_runs(opt, steps=1)
    assert not torch.equal(plain[0], other[0])
    assert torch.equal(plain[1], other[1])
    # From the second step on, the first tensor's gradients move the second tensor.
    plain, other = _two_tensor_runs(opt, steps=4)
    assert not torch.equal(plain[1], other[1])
    # With the context weights at zero they no longer can, however long the run.
    with torch.no_grad():
        for weight in opt.context_weights():
            weight.zero_()
    plain, other = _two_tensor_runs(opt, steps=6)
    assert not torch.equal(plain[0], other[0])
    assert torch.equal(plain[1], other[1])


def test_without_context_and_per_tensor_statistics_it_is_coordinatewise(checks) -> None:
    checks.coordinates_independent(_coordinatewise_variant)
    checks.split_invariant(_coordinatewise_variant)


def test_with_the_defaults_it_is_not_coordinatewise(checks) -> None:
    # Why it is registered with coordinatewise=False.
    with pytest.raises(AssertionError):
        checks.coordinates_independent(L2OScale)
    with pytest.raises(AssertionError):
        checks.split_invariant(L2OScale)


def test_step_issues_the_same_kernels_for_one_tensor_or_two_hundred() -> None:
    """No per-tensor loop: only the metadata-only views of flatten/unflatten grow with T."""

    class CountOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.counts: Counter[str] = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            self.counts[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    metadata_only = {"view", "reshape", "_unsafe_view", "alias", "as_strided", "detach"}
    torch.manual_seed(0)
    opt = L2OScale()

    def ops(params: list[torch.Tensor], grad_enabled: bool) -> Counter[str]:
        grads = [torch.randn_like(p) for p in params]
        state = opt.init_state(params)
        opt.step(params, grads, state)  # builds the per-dtype constants, once
        with torch.set_grad_enabled(grad_enabled), CountOps() as mode:
            opt.step(params, grads, state)
        return mode.counts

    coordinates = torch.randn(4000)
    for grad_enabled in (False, True):
        one = ops([coordinates], grad_enabled)
        many = ops(list(coordinates.split(20)), grad_enabled)
        assert {k: v for k, v in one.items() if k not in metadata_only} == {
            k: v for k, v in many.items() if k not in metadata_only
        }
        assert sum(one.values()) < 200  # a fixed, small number of kernels
        # flatten's reshape and unflatten's view_as: metadata, one each per tensor, plus slack.
        assert sum(many[k] for k in metadata_only) - sum(one[k] for k in metadata_only) <= 3 * 199


# ---------------------------------------------------------------------------- features


def test_momentum_features_at_the_documented_timescales_match_a_hand_computation(monkeypatch) -> None:
    decays = (0.5, 0.9, 0.99)
    eps = 1e-8
    g1 = [0.5, -2.0, 1e-3, 0.0]
    g2 = [-0.25, -1.0, 4.0, 0.0]

    def by_hand(g_history: list[float], beta: float) -> tuple[float, float, float, float]:
        m = v = 0.0
        for g in g_history:
            m = beta * m + (1 - beta) * g
            v = beta * v + (1 - beta) * g * g
        t = len(g_history)
        m_hat, v_hat = m / (1 - beta**t), v / (1 - beta**t)
        return m, v, m_hat / (math.sqrt(v_hat) + eps), math.log(v_hat + 1e-16)

    expected = torch.tensor(
        [[by_hand([a, b], beta) for beta in decays] for a, b in zip(g1, g2)], dtype=torch.float64
    )  # (coordinate, timescale, [m, v, momentum, log v̂])
    # Spot-check one hand value outright: coordinate 0, β = 0.9, after two steps.
    assert expected[0, 1, 0].item() == pytest.approx(0.9 * 0.1 * 0.5 + 0.1 * -0.25)
    log_v = expected[..., 3]
    magnitude = log_v - log_v.mean(dim=1, keepdim=True)

    seen = []

    def recording(cell, x, h, input_bias):  # noqa: ANN001, ANN202
        if cell is opt.param_cell:
            seen.append(x)
        return gru_with_input_bias(cell, x, h, input_bias)

    monkeypatch.setattr(l2o_scale_module, "gru_with_input_bias", recording)
    opt = L2OScale(momentum_decays=decays, eps=eps).double()
    params = [torch.zeros(4, dtype=torch.float64)]
    state = opt.init_state(params)
    with torch.no_grad():
        for g in (g1, g2):
            params, state = opt.step(params, [torch.tensor(g, dtype=torch.float64)], state)

    torch.testing.assert_close(state["grad_avg"], expected[..., 0], rtol=1e-12, atol=0)
    torch.testing.assert_close(state["grad_sq_avg"], expected[..., 1], rtol=1e-12, atol=0)
    inputs = seen[1]  # what the parameter GRU read at step 2
    torch.testing.assert_close(inputs[:, 0:3], expected[..., 2], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(inputs[:, 3:6], magnitude, rtol=1e-10, atol=1e-12)
    # Step 1: m̂ = g and v̂ = g², so every momentum is g / (|g| + ε), about sign(g).
    first = torch.tensor([g / (abs(g) + eps) for g in g1], dtype=torch.float64)
    torch.testing.assert_close(seen[0][:, 0:3], first[:, None].expand(4, 3), rtol=1e-12, atol=0)
    # An all-zero gradient history gives exactly zero features, not NaN.
    assert seen[1][3].tolist() == [0.0] * 7

    # The public helper gives the same numbers from the same history.
    momentum, mag, m, v = multiscale_features(
        torch.tensor(g2, dtype=torch.float64), expected.new_tensor(
            [[(1 - b) * a for b in decays] for a in g1]), expected.new_tensor(
            [[(1 - b) * a * a for b in decays] for a in g1]),
        torch.tensor(2), torch.tensor(decays, dtype=torch.float64), eps=eps)
    torch.testing.assert_close(momentum, expected[..., 2], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mag, magnitude, rtol=1e-10, atol=1e-12)


def test_relative_learning_rate_is_the_offset_from_the_tensor_mean(monkeypatch) -> None:
    seen = []

    def recording(cell, x, h, input_bias):  # noqa: ANN001, ANN202
        if cell is opt.param_cell:
            seen.append(x)
        return gru_with_input_bias(cell, x, h, input_bias)

    monkeypatch.setattr(l2o_scale_module, "gru_with_input_bias", recording)
    opt = L2OScale()
    params = [torch.zeros(3), torch.zeros(2)]
    state = dict(opt.init_state(params))
    state["lr_offset"] = torch.tensor([1.0, 2.0, 6.0, -1.0, 1.0])
    with torch.no_grad():
        opt.step(params, [torch.ones(3), torch.ones(2)], state)
    torch.testing.assert_close(seen[0][:, -1], torch.tensor([-2.0, -1.0, 3.0, -1.0, 1.0]))


def test_segment_mean_averages_each_tensor_and_gives_zero_for_an_empty_one() -> None:
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 20.0]])
    segment = torch.tensor([0, 0, 2])
    counts = torch.tensor([2.0, 1.0, 1.0])  # segment 1 is empty: counted as 1
    torch.testing.assert_close(segment_mean(values, segment, counts),
                               torch.tensor([[2.0, 3.0], [0.0, 0.0], [10.0, 20.0]]))


def test_gru_with_input_bias_is_a_gru_cell_with_a_shifted_input_bias() -> None:
    torch.manual_seed(0)
    cell = nn.GRUCell(5, 4)
    x, h, bias = torch.randn(6, 5), torch.randn(6, 4), torch.randn(6, 12)
    torch.testing.assert_close(gru_with_input_bias(cell, x, h, None), cell(x, h))
    shifted = nn.GRUCell(5, 4)
    shifted.load_state_dict(cell.state_dict())
    for row in range(6):
        with torch.no_grad():
            shifted.bias_ih.copy_(cell.bias_ih + bias[row])
        torch.testing.assert_close(gru_with_input_bias(cell, x, h, bias)[row], shifted(x[row:row + 1], h[row:row + 1])[0])


# ---------------------------------------------------------------------------- learning rate


@pytest.mark.parametrize("init_lr", [3e-3, 1e-2])
def test_a_fresh_optimizer_steps_init_lr_per_coordinate_in_rms(init_lr) -> None:
    torch.manual_seed(0)
    opt = L2OScale(init_lr=init_lr)
    params = [torch.randn(5, 6), torch.randn(7), torch.randn(())]
    targets = [torch.randn_like(p) for p in params]
    state = opt.init_state(params)
    with torch.no_grad():
        for _ in range(5):
            new_params, state = opt.step(params, separable_grads(params, targets), state)
            for new, old in zip(new_params, params):
                rms = (new - old).pow(2).mean().sqrt().item()
                assert rms == pytest.approx(init_lr, rel=1e-4)
            params = new_params
    # The per-coordinate part of the log learning rate stays at zero until w_η is trained.
    assert torch.equal(state["lr_offset"], torch.zeros(38))
    assert opt.log_lr_head.bias.item() == pytest.approx(math.log(init_lr))
    assert not opt.log_lr_head.weight.any()


def test_the_learned_base_rate_sets_the_step_from_the_first_step() -> None:
    opt = L2OScale()
    with torch.no_grad():
        opt.log_lr_head.bias.fill_(math.log(0.05))
        params = [torch.randn(40)]
        (new,), _ = opt.step(params, [torch.randn(40)], opt.init_state(params))
    assert (new - params[0]).pow(2).mean().sqrt().item() == pytest.approx(0.05, rel=1e-4)


def test_the_per_coordinate_offset_follows_the_head_with_momentum() -> None:
    torch.manual_seed(0)
    opt = L2OScale(lr_momentum=0.75)
    with torch.no_grad():
        opt.log_lr_head.weight.fill_(0.3)
    params = [torch.randn(8)]
    seen = []
    state = opt.init_state(params)
    offset = torch.zeros(8)
    with torch.no_grad():
        for _ in range(3):
            params, state = opt.step(params, [torch.randn(8)], state)
            head = state["param_h"] @ opt.log_lr_head.weight.squeeze(0)
            offset = 0.75 * offset + 0.25 * head
            seen.append(state["lr_offset"])
            torch.testing.assert_close(state["lr_offset"], offset)
    assert seen[-1].abs().max() <= 0.3 * 10  # |u| <= ||w_η||_1


def test_a_fresh_optimizer_descends_on_quadratics() -> None:
    torch.manual_seed(0)
    opt = L2OScale(init_lr=1e-2)
    for a, b, theta0, f_star in random_quadratics(dim=20, count=3, seed=0):
        params, state = [theta0.clone()], opt.init_state([theta0])
        with torch.no_grad():
            for _ in range(50):
                params, state = opt.step(params, [a @ params[0] - b], state)
        f0 = 0.5 * theta0 @ a @ theta0 - b @ theta0 - f_star
        f1 = 0.5 * params[0] @ a @ params[0] - b @ params[0] - f_star
        assert f1 < 0.8 * f0


def test_an_empty_tensor_does_not_poison_the_hierarchy() -> None:
    torch.manual_seed(0)
    opt = L2OScale()
    params = [torch.randn(4), torch.zeros(0), torch.randn(2, 3)]
    targets = [torch.zeros_like(p) for p in params]
    new_params, state = run(opt, params, targets, steps=3)
    assert [tuple(p.shape) for p in new_params] == [(4,), (0,), (2, 3)]
    for key, value in state.items():
        assert torch.isfinite(value.float()).all(), key


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hidden_size": 0},
        {"tensor_hidden_size": 0},
        {"global_hidden_size": 2.5},
        {"momentum_decays": ()},
        {"momentum_decays": (0.9, 1.0)},
        {"eps": 0.0},
        {"init_lr": 0.0},
        {"init_lr": math.inf},
        {"lr_momentum": 1.0},
    ],
)
def test_rejects_out_of_range_hyperparameters(kwargs) -> None:
    with pytest.raises(ConfigError, match=f"L2OScale: {next(iter(kwargs))}"):
        L2OScale(**kwargs)


def test_state_for_other_params_is_rejected_with_the_fix() -> None:
    opt = L2OScale()
    state = opt.init_state([torch.zeros(5)])
    with pytest.raises(FlatL2OError, match=r"init_state\(params\)"):
        opt.step([torch.zeros(6)], [torch.zeros(6)], state)
    # Same number of coordinates, different tensors: the per-tensor states would not fit.
    with pytest.raises(FlatL2OError, match=r"built for 1 tensors but got 2"):
        opt.step([torch.zeros(2), torch.zeros(3)], [torch.zeros(2), torch.zeros(3)], state)
    with pytest.raises(FlatL2OError, match="no 'tensor_h'"):
        opt.step([torch.zeros(5)], [torch.zeros(5)], {k: v for k, v in state.items() if k != "tensor_h"})
