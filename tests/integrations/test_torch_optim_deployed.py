"""The torch.optim face's deployed step (``fused``) and lower-precision state (``state_dtype``)."""

from __future__ import annotations

import copy
import io
import statistics
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flat_l2o_plugin import create_optimizer
from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.integrations.torch_optim import LearnedOptimizerTorch
from flat_l2o_plugin.optimizers import LearnedCorrection, RNNProp
from flat_l2o_plugin.optimizers._fused import COMPILE_ENV
from flat_l2o_plugin.tasks import load_dataset

LARGE = 1 << 16  # a group of this many coordinates runs step_ by default


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    """Kernels run eagerly here: their compiled form is pinned in tests/optimizers."""
    monkeypatch.setenv(COMPILE_ENV, "0")


def _untrained(name: str, **options: Any) -> nn.Module:
    torch.manual_seed(0)
    module = create_optimizer(name, **options)
    with torch.no_grad():  # no hidden unit of learned_correction's net and mirror coincide
        for weight in module.parameters():
            weight.add_(torch.randn_like(weight), alpha=0.05)
    return module.eval()


def _count_fused_calls(monkeypatch, cls: type) -> list[int]:
    calls: list[int] = []
    original = cls.step_

    def counting(self, params, grads, state):
        calls.append(sum(p.numel() for p in params))
        return original(self, params, grads, state)

    monkeypatch.setattr(cls, "step_", counting)
    return calls


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0, skip: int | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randn(16, model[0].in_features, generator=gen)
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        if step == skip:
            model[0].bias.grad = None  # a parameter without a gradient at this step
        opt.step()


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 3))


def test_large_groups_run_the_deployed_step_and_small_ones_the_reference(monkeypatch) -> None:
    calls = _count_fused_calls(monkeypatch, RNNProp)
    learned = _untrained("rnnprop")
    large, small = _model(256), _model(8)
    assert sum(p.numel() for p in large.parameters()) >= LARGE
    opt = LearnedOptimizerTorch([{"params": large.parameters()}, {"params": small.parameters()}], learned)
    _train_two(large, small, opt)
    assert sorted(set(calls)) == sorted(p.numel() for p in large.parameters())  # one call per tensor
    calls.clear()
    opt = LearnedOptimizerTorch([{"params": large.parameters()}, {"params": small.parameters()}], learned,
                                fused=False)
    _train_two(large, small, opt)
    assert calls == []
    opt = LearnedOptimizerTorch(small.parameters(), learned, fused=True)
    _train(small, opt, 1)
    assert sorted(calls) == sorted(p.numel() for p in small.parameters())


def _train_two(large: nn.Module, small: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    (large(torch.randn(4, 256)).sum() + small(torch.randn(4, 8)).sum()).backward()
    opt.step()


@pytest.mark.parametrize("name", ["rnnprop", "l2o_scale", "learned_correction"])
@pytest.mark.parametrize("state_dtype", [None, "bfloat16"])
def test_the_deployed_step_follows_the_reference_through_the_face(name, state_dtype) -> None:
    """Groups with their own lr and weight decay, and a parameter that misses a gradient."""
    learned = _untrained(name)
    models = [_model(8) for _ in range(2)]
    start = [p.detach().clone() for p in models[0].parameters()]
    opts = []
    for model, fused in zip(models, (False, True)):
        groups = [{"params": [model[0].weight, model[0].bias], "lr": 0.5, "weight_decay": 0.1},
                  {"params": [model[2].weight, model[2].bias]}]
        opts.append(LearnedOptimizerTorch(groups, learned, fused=fused, state_dtype=state_dtype))
    for model, opt in zip(models, opts):
        _train(model, opt, 5, skip=2)
    # float32 kernels against the reference: the tolerance of tests/optimizers/test_deployed_step.py.
    rtol = 2.0**-5 if state_dtype else 1e-4
    for p, q, p0 in zip(models[0].parameters(), models[1].parameters(), start):
        moved = (p - p0).double()
        torch.testing.assert_close((q - p0).double(), moved, rtol=rtol, atol=rtol * moved.abs().max().item())
    assert not torch.equal(models[0][0].bias, start[1])
    reference, deployed = (o.state_dict()["state"] for o in opts)
    assert reference.keys() == deployed.keys()
    for index in reference:
        assert reference[index].keys() == deployed[index].keys()
        for key, value in reference[index].items():
            assert deployed[index][key].dtype == value.dtype, key
            scale = value.double().abs().max().item() if value.numel() else 0.0
            torch.testing.assert_close(deployed[index][key].double(), value.double(), rtol=rtol,
                                       atol=rtol * scale + 1e-30)


@pytest.mark.parametrize("name", ["rnnprop", "l2o_scale"])
def test_the_deployed_step_leaves_other_optimizers_state_alone(name) -> None:
    """A key another optimizer keeps in ``self.state[p]`` (timm's Lookahead) before the first step."""
    learned = _untrained(name)
    models = [_model(8) for _ in range(2)]
    opts = [LearnedOptimizerTorch(model.parameters(), learned, fused=True) for model in models]
    foreign = {p: torch.full_like(p, 7.0) for p in models[1].parameters()}
    for p, value in foreign.items():
        opts[1].state[p]["slow_weights"] = value
    for model, opt in zip(models, opts):
        _train(model, opt, 3)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert opts[1].state[q]["slow_weights"] is foreign[q] and bool((foreign[q] == 7.0).all())
        assert opts[1].state[q].keys() - {"slow_weights"} == opts[0].state[p].keys()


def test_bfloat16_state_is_stored_and_saved_as_bfloat16_and_resumes_identically() -> None:
    learned = _untrained("rnnprop")
    model = _model(256)
    opt = LearnedOptimizerTorch(model.parameters(), learned, state_dtype="bfloat16")
    assert opt.state_dtype == torch.bfloat16
    _train(model, opt, 2)
    for state in opt.state.values():
        assert {k for k, v in state.items() if v.dtype == torch.bfloat16} == set(learned.reduced_precision_state_keys())
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    twin_model = copy.deepcopy(model)
    twin = LearnedOptimizerTorch(twin_model.parameters(), learned, state_dtype="bfloat16")
    twin.load_state_dict(torch.load(buffer))
    _train(model, opt, 2, seed=1)
    _train(twin_model, twin, 2, seed=1)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)
    # Half the bytes of the float32 state, and the LSTM states are 80 of RNNProp's 82 numbers.
    full = LearnedOptimizerTorch(model.parameters(), learned)
    _train(model, full, 1)
    nbytes = [sum(v.numel() * v.element_size() for s in o.state.values() for v in s.values() if v.dim())
              for o in (twin, full)]
    assert nbytes[0] / nbytes[1] == pytest.approx((2 * 4 + 80 * 2) / (82 * 4))


def test_a_float32_state_loaded_into_a_bfloat16_optimizer_is_rounded_at_the_next_step() -> None:
    learned = _untrained("rnnprop")
    model = _model(256)
    full = LearnedOptimizerTorch(model.parameters(), learned)
    _train(model, full, 1)
    half = LearnedOptimizerTorch(model.parameters(), learned, state_dtype=torch.bfloat16)
    half.load_state_dict(full.state_dict())
    _train(model, half, 1)
    assert all(state["lstm_c_1"].dtype == torch.bfloat16 for state in half.state.values())


@pytest.mark.parametrize("state_dtype, match", [
    ("int8", "state_dtype must be a floating dtype"),
    ("float128", "state_dtype must be a floating dtype"),
    (torch.complex64, "state_dtype must be a floating dtype"),
    (3, "state_dtype must be a floating dtype"),
])
def test_a_bad_state_dtype_is_named(state_dtype, match) -> None:
    with pytest.raises(ConfigError, match=match):
        LearnedOptimizerTorch(nn.Linear(2, 2).parameters(), _untrained("rnnprop"), state_dtype=state_dtype)


def test_state_dtype_needs_an_optimizer_that_names_its_reducible_state() -> None:
    class Plain(nn.Module):
        def init_state(self, params):
            return {"step": torch.zeros((), dtype=torch.int64)}

        def step(self, params, grads, state):
            return [p - 0.1 * g for p, g in zip(params, grads)], {"step": state["step"] + 1}

    with pytest.raises(ConfigError, match="Plain has no reduced_precision_state_keys"):
        LearnedOptimizerTorch(nn.Linear(2, 2).parameters(), Plain(), state_dtype="bfloat16")
    # learned_correction names none (its state is Adam's moments): accepted, and a no-op.
    opt = LearnedOptimizerTorch(nn.Linear(2, 2).parameters(), _untrained("learned_correction"),
                                state_dtype="bfloat16")
    assert opt._reduced_keys == frozenset()


def _loss_curve(learned: nn.Module, seed: int, steps: int, state_dtype: str | None = None,
                jitter: float = 0.0) -> list[float]:
    """Mini-batch losses of a digits MLP trained with ``learned`` from a seeded init and data order.

    ``jitter``: after each step, multiply every entry of the reducible state by an
    independent factor uniform in [1 - jitter, 1 + jitter].
    """
    x_all, y_all = load_dataset("digits").split("train")
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = LearnedOptimizerTorch(model.parameters(), learned, state_dtype=state_dtype, fused=False)
    if jitter:
        keys = learned.reduced_precision_state_keys()
        noise = torch.Generator().manual_seed(1000 + seed)

        def perturb(optimizer, args, kwargs) -> None:
            for state in optimizer.state.values():
                for key in keys:
                    state[key].mul_(1.0 + jitter * (2.0 * torch.rand(state[key].shape, generator=noise) - 1.0))

        opt.register_step_post_hook(perturb)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, x_all.shape[0], (64,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _curve_deviations(learned: nn.Module, seeds: range, steps: int) -> tuple[float, float]:
    """Mean |loss difference| along the curve from the float32-state run: bfloat16 state, and the control."""
    rounded, jittered = [], []
    for seed in seeds:
        exact = _loss_curve(learned, seed, steps)
        for runs, kwargs in ((rounded, {"state_dtype": "bfloat16"}), (jittered, {"jitter": 2.0**-8})):
            curve = _loss_curve(learned, seed, steps, **kwargs)
            runs.append(statistics.fmean(abs(a - b) for a, b in zip(curve, exact)))
    return statistics.fmean(rounded), statistics.fmean(jittered)


class _BFloat16SecondMoment(LearnedCorrection):
    """A wrong choice of reducible state: Adam's v, a running average with β2 = 0.999."""

    def reduced_precision_state_keys(self) -> list[str]:
        return ["exp_avg_sq"]


def test_bfloat16_state_moves_a_training_curve_no_more_than_rounding_noise(meta_trained) -> None:
    """The bound, and why it holds.

    Storing a state entry in bfloat16 changes it by at most 2^-9 of its value at each
    step (round to nearest, 8 significant bits). The control run perturbs the same
    entries of a float32 run at each step by independent random factors in
    [1 - 2^-8, 1 + 2^-8], twice that size. If the rounding errors behave like such
    independent errors, the bfloat16 curve strays from the float32 one no further than
    the control's does. What bfloat16 can do beyond that is to err coherently, the same
    way step after step, as a running average does whose per-step increments fall below
    half its spacing; coherent errors add up linearly instead of as a random walk, by
    √T over a T-step curve (12 here). So the bound allows the bfloat16 deviation 3 times
    the control's, and the test checks that it catches the coherent case: Adam's v
    (β2 = 0.999) in bfloat16, whose increments of 0.1% round away.
    """
    seeds, steps = range(4), 150
    rounded, control = _curve_deviations(meta_trained, seeds, steps)
    assert 0.0 < rounded <= 3.0 * control, (rounded, control)

    torch.manual_seed(0)
    wrong = _BFloat16SecondMoment().eval()
    rounded, control = _curve_deviations(wrong, seeds, steps)
    assert rounded > 3.0 * control, (rounded, control)
