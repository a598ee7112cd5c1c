"""The flatness-aware wrapper: transparent at weight 0, effective above it, invisible to checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flat_l2o_plugin import FlatL2O, create_optimizer, create_task
from flat_l2o_plugin.errors import ConfigError, FlatL2OError
from flat_l2o_plugin.testing import check_learned_optimizer, isolated_plugin_manager
from flat_l2o_plugin.training import MetaTrainConfig, MetaTrainer
from flat_l2o_plugin.wrappers import FlatnessAware

ZOO = ("rnnprop", "l2o_dm")


def _problem(seed: int = 0):
    """A small non-convex regression, so curvature and sharpness are not constant."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)
    params = [torch.randn(4, 6, generator=gen) * 0.5, torch.zeros(6), torch.randn(6, 1, generator=gen) * 0.5]

    def loss_fn(ps):
        return F.mse_loss(torch.tanh(x @ ps[0] + ps[1]) @ ps[2], y)

    return params, loss_fn


def _unroll(optimizer, *, steps: int = 4, explicit: bool = True, **step_kwargs):
    """Unroll ``steps`` steps; return the iterates and the meta-gradient of φ.

    ``explicit``: hand the wrapper ``loss_fn`` and add ``pop_penalty()`` to the meta-loss,
    as a host following the wrapper's explicit protocol does.
    """
    params, loss_fn = _problem()
    params = [p.requires_grad_(True) for p in params]
    state = optimizer.init_state(params)
    meta_loss, iterates = torch.zeros(()), []
    for t in range(steps):
        loss = loss_fn(params)
        grads = [g.detach() for g in torch.autograd.grad(loss, params, retain_graph=True)]
        kwargs = {"loss_fn": loss_fn, "loss": loss, **step_kwargs} if explicit else {}
        params, state = optimizer.step(params, grads, state, **kwargs)
        iterates.append([p.detach().clone() for p in params])
        meta_loss = meta_loss + loss_fn(params)
    if explicit:
        meta_loss = meta_loss + optimizer.pop_penalty()
    weights = list(optimizer.parameters())
    return iterates, torch.autograd.grad(meta_loss, weights), meta_loss.detach()


def _fresh(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return create_optimizer(name)


@pytest.mark.parametrize("name", ZOO)
def test_weight_zero_is_bit_identical_to_the_unwrapped_optimizer(name):
    bare_iterates, bare_grads, bare_loss = _unroll(_fresh(name), explicit=False)
    wrapped = FlatnessAware(_fresh(name), {
        "sharpness": {"weight": 0.0},
        "hessian_trace": {"weight": 0.0, "mode": "optimizee_loss", "probes": 2},
    })
    iterates, grads, loss = _unroll(wrapped)
    assert torch.equal(loss, bare_loss)
    for step, (a, b) in enumerate(zip(iterates, bare_iterates)):
        assert all(torch.equal(p, q) for p, q in zip(a, b)), f"update {step} differs"
    for a, b in zip(grads, bare_grads):
        assert torch.equal(a, b)


def test_the_wrapped_optimizer_passes_the_conformance_check():
    pm = isolated_plugin_manager()
    check_learned_optimizer(lambda: FlatnessAware(create_optimizer("rnnprop"), {"sharpness": {"weight": 1.0}},
                                                  plugin_manager=pm), meta_training=False)


def test_meta_loss_term_changes_the_meta_gradient_but_not_the_updates():
    bare_iterates, bare_grads, bare_loss = _unroll(_fresh("rnnprop"), explicit=False)
    wrapped = FlatnessAware(_fresh("rnnprop"), {"sharpness": {"weight": 1.0, "rho": 0.5}})
    iterates, grads, loss = _unroll(wrapped)
    # The term is part of the meta-loss only: the optimizer saw the same gradients.
    for a, b in zip(iterates, bare_iterates):
        assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert loss > bare_loss
    diff = sum((a - b).abs().sum() for a, b in zip(grads, bare_grads))
    assert diff > 1e-6 * sum(a.abs().sum() for a in bare_grads)
    assert wrapped.pop_terms() == {}  # popping forgets


def test_optimizee_loss_mode_changes_the_gradient_the_optimizer_sees():
    bare_iterates, _, _ = _unroll(_fresh("rnnprop"), explicit=False)
    wrapped = FlatnessAware(_fresh("rnnprop"), {"sharpness": {"weight": 1.0, "rho": 0.5, "mode": "optimizee_loss"}})
    iterates, _, _ = _unroll(wrapped)
    assert not all(torch.equal(p, q) for p, q in zip(iterates[0], bare_iterates[0]))
    assert wrapped.pop_terms() == {}  # nothing joins the meta-loss


def test_schedule_reads_the_step_from_the_state_and_the_horizon():
    wrapped = FlatnessAware(_fresh("rnnprop"), {"sharpness": {"weight": 1.0, "at": "last"}}, horizon=3)
    params, loss_fn = _problem()
    state = wrapped.init_state(params)
    due = []
    for _ in range(3):
        grads = [g.detach() for g in torch.autograd.grad(loss_fn([p.requires_grad_() for p in params]), params)]
        params, state = wrapped.step(params, grads, state, loss_fn=loss_fn)
        due.append(sorted(wrapped.pop_terms()))
    assert due == [[], [], ["sharpness"]]  # θ_3 is the last iterate of a 3-step trajectory
    # An explicit step_index wins over the optimizer's own count.
    grads = [torch.zeros_like(p) for p in params]
    wrapped.step(params, grads, wrapped.init_state(params), loss_fn=loss_fn, step_index=2)
    assert sorted(wrapped.pop_terms()) == ["sharpness"]


@pytest.mark.parametrize("name", ZOO)
def test_state_dict_keys_are_unchanged_and_load_both_ways(name):
    bare = _fresh(name, seed=1)
    wrapped = FlatnessAware(_fresh(name, seed=2), {"sharpness": {"weight": 0.1}})
    assert list(wrapped.state_dict()) == list(bare.state_dict())
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in bare.named_parameters()]

    wrapped.load_state_dict(bare.state_dict())  # pretrained weights into the wrapper
    assert all(torch.equal(a, b) for a, b in zip(wrapped.parameters(), bare.parameters()))
    other = _fresh(name, seed=3)
    other.load_state_dict(FlatnessAware(_fresh(name, seed=4)).state_dict())  # and back out
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), _fresh(name, seed=4).parameters()))

    # Also when the wrapper sits inside a larger module.
    parent_bare, parent_wrapped = nn.ModuleDict({"opt": bare}), nn.ModuleDict({"opt": copy.deepcopy(wrapped)})
    assert list(parent_wrapped.state_dict()) == list(parent_bare.state_dict())
    parent_wrapped.load_state_dict(parent_bare.state_dict())
    copied = parent_wrapped["opt"]
    assert all(a is b for a, b in zip(copied.parameters(), copied.inner.parameters()))
    assert not any(a is b for a, b in zip(copied.parameters(), wrapped.parameters()))


def test_train_eval_and_dtype_reach_the_wrapped_model():
    inner = create_optimizer("rnnprop")
    wrapped = FlatnessAware(FlatnessAware(inner))  # nests
    wrapped.eval()
    assert not inner.training and not wrapped.training and not inner.cells[0].training
    wrapped.train()
    assert inner.training
    wrapped.double()
    assert inner.output_layer.weight.dtype == torch.float64
    assert wrapped.hidden_size == inner.hidden_size  # attributes read through
    with pytest.raises(FlatL2OError, match="cannot own"):
        wrapped.extra = nn.Linear(1, 1)


def test_nested_wrappers_pop_every_layer():
    inner = FlatnessAware(_fresh("rnnprop"), {"sharpness": {"weight": 1.0}})
    outer = FlatnessAware(inner, {"hessian_trace": {"weight": 0.1, "probes": 2}})
    params, loss_fn = _problem()
    grads = [torch.zeros_like(p) for p in params]
    outer.step(params, grads, outer.init_state(params), loss_fn=loss_fn)
    assert sorted(outer.pop_terms()) == ["hessian_trace", "sharpness"]
    assert inner.pop_terms() == {}


@pytest.fixture(scope="module")
def digits():
    return create_task("mlp_digits", batch_size=32)


def _meta_trainer_gradient(task, regularizers, *, wrap: bool):
    torch.manual_seed(0)
    optimizer = create_optimizer("rnnprop")
    pm = isolated_plugin_manager()
    host = FlatL2O(plugin_manager=pm)
    if wrap:
        optimizer = FlatnessAware(optimizer, regularizers, plugin_manager=pm)
        optimizer.attach(host)
    trainer = MetaTrainer(optimizer, lambda g: (task, 7), flat=host,
                          config=MetaTrainConfig(meta_steps=1, unroll=3, horizon=6, val_every=0, clip=0.0))
    logs = trainer.step(0)
    return [p.grad.clone() for p in optimizer.parameters()], logs


def test_attached_wrapper_reaches_an_unmodified_meta_trainer(digits):
    plain, plain_logs = _meta_trainer_gradient(digits, {}, wrap=False)
    zero, zero_logs = _meta_trainer_gradient(digits, {"sharpness": {"weight": 0.0}}, wrap=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, zero))
    assert zero_logs["meta_loss"] == plain_logs["meta_loss"]

    regularized, logs = _meta_trainer_gradient(digits, {"sharpness": {"weight": 1.0, "rho": 0.5}}, wrap=True)
    assert logs["term/sharpness"] > 0 and logs["meta_loss"] > plain_logs["meta_loss"]
    assert any(not torch.equal(a, b) for a, b in zip(plain, regularized))


def test_errors_name_the_field_and_the_fix():
    with pytest.raises(ConfigError, match="foreign"):
        FlatnessAware(nn.Linear(2, 1))
    with pytest.raises(ConfigError, match="regularizers"):
        FlatnessAware(create_optimizer("rnnprop"), ["sharpness"])
    with pytest.raises(ConfigError, match="horizon"):
        FlatnessAware(create_optimizer("rnnprop"), horizon=0)

    class NoStepCount(nn.Module):
        def init_state(self, params):
            return {}

        def step(self, params, grads, state):
            return list(params), {}

    wrapped = FlatnessAware(NoStepCount(), {"sharpness": {"weight": 1.0}})
    params, loss_fn = _problem()
    with pytest.raises(ConfigError, match="step_index"):
        wrapped.step(params, params, {}, loss_fn=loss_fn)
    wrapped.step(params, params, {}, loss_fn=loss_fn, step_index=0)  # the fix

    host = FlatL2O({"sharpness": {"weight": 1.0}})
    with pytest.raises(ConfigError, match="only"):
        wrapped.attach(host)
    optimizee = FlatnessAware(create_optimizer("rnnprop"), {"sharpness": {"weight": 1.0, "mode": "optimizee_loss"}})
    with pytest.raises(ConfigError, match="optimizee_loss"):
        optimizee.attach(FlatL2O())


@pytest.mark.parametrize("route", ["explicit", "attached"])
def test_the_wrappers_regularizer_sees_one_dropout_mask_per_call(route):
    import repeated_loss_plugin

    params, loss_fn = _problem()
    dropout_loss = lambda ps: loss_fn([F.dropout(ps[0], 0.5, training=True), *ps[1:]])  # noqa: E731
    pm = isolated_plugin_manager(repeated_loss_plugin)
    torch.manual_seed(0)
    wrapped = FlatnessAware(create_optimizer("l2o_dm"), {"repeated_loss": {"weight": 1.0}}, plugin_manager=pm)
    params = [p.requires_grad_(True) for p in params]
    state = wrapped.init_state(params)
    host = FlatL2O(plugin_manager=pm)
    if route == "attached":
        wrapped.attach(host)
    for t in range(3):
        grads = [g.detach() for g in torch.autograd.grad(dropout_loss(params), params)]
        if route == "explicit":
            params, state = wrapped.step(params, grads, state, loss_fn=dropout_loss)
        else:
            params, state = wrapped.step(params, grads, state)
            assert set(host.flatness_terms(params, dropout_loss, t + 1, optimizer=wrapped)) == {"repeated_loss"}
    seen = wrapped.active["repeated_loss"].regularizer.seen
    assert len(seen) == 3 and all(values[0] == values[1] == values[2] for values in seen)


def test_optimizee_loss_mode_works_when_the_host_hands_its_own_loss():
    """A host's loss is in the graph of its params, not of the wrapper's detached probe: a
    regularizer that takes ``loss`` (sharpness differentiates it) must get the loss at the
    probe, so handing the loss over changes nothing but what schedules read."""
    params, loss_fn = _problem()
    config = {"sharpness": {"weight": 1.0, "rho": 0.5, "mode": "optimizee_loss"}}
    steps = []
    for hand_over in (False, True):
        torch.manual_seed(0)
        wrapped = FlatnessAware(_fresh("rnnprop"), config)
        leaves = [p.clone().requires_grad_(True) for p in params]
        loss = loss_fn(leaves)
        grads = [g.detach() for g in torch.autograd.grad(loss, leaves, retain_graph=True)]
        extra = {"loss": loss} if hand_over else {}
        new_params, _ = wrapped.step(leaves, grads, wrapped.init_state(leaves), loss_fn=loss_fn, **extra)
        steps.append([p.detach() for p in new_params])
    for a, b in zip(*steps):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
