"""learn2learn's meta-descent loop gains a flatness term, run with learn2learn itself."""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flat_l2o_plugin import FlatL2O
from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.integrations.learn2learn import FlatnessLearnableOptimizer, flatness_penalty
from flat_l2o_plugin.testing import isolated_plugin_manager

# gym, which learn2learn imports, emits deprecation warnings of its own.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def l2l():
    # gym prints a notice to stderr when imported; it says nothing about our code.
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("learn2learn")


def _transform(l2l, kind):
    if kind == "module":
        return l2l.optim.ModuleTransform(nn.Linear)
    return l2l.optim.KroneckerTransform(l2l.nn.KroneckerLinear)


# One regularizer per transform kind: a first-order one, and one built on HVPs.
REGULARIZERS = {
    "module": {"sharpness": {"weight": 1.0, "rho": 0.5}},
    "kronecker": {"hessian_trace": {"weight": 0.1, "probes": 2, "seed": 0}},
}


def _run(l2l, kind, regularizers=None, *, steps=3):
    """learn2learn's loop, φ held fixed so trajectories can be compared coordinate by coordinate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    metaopt = l2l.optim.LearnableOptimizer(model, _transform(l2l, kind), lr=0.1)
    flat_opt = None
    if regularizers is not None:
        flat_opt = FlatnessLearnableOptimizer(metaopt, regularizers, plugin_manager=isolated_plugin_manager())
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 4, generator=gen), torch.randn(12, 1, generator=gen)

    def loss_of_model(m):
        return F.mse_loss(m(x), y)

    transform_grads, model_grads = [], []
    for _ in range(steps):
        metaopt.zero_grad()
        for p in metaopt.parameters():
            p.grad = None
        loss = loss_of_model(model)
        if flat_opt is None:
            loss.backward()
        else:
            flat_opt.backward(loss, loss_of_model)
        transform_grads.append([None if p.grad is None else p.grad.clone() for p in metaopt.parameters()])
        model_grads.append([p.grad.clone() for p in model.parameters()])
        metaopt.step()
    return transform_grads, model_grads


def _equal(a, b):
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["module", "kronecker"])
def test_weight_zero_leaves_the_meta_gradient_bit_identical(l2l, kind):
    plain_transform, plain_model = _run(l2l, kind)
    zeroed = {name: {**spec, "weight": 0.0} for name, spec in REGULARIZERS[kind].items()}
    transform, model = _run(l2l, kind, zeroed)
    assert all(_equal(a, b) for a, b in zip(transform, plain_transform))
    assert all(_equal(a, b) for a, b in zip(model, plain_model))


@pytest.mark.parametrize("kind", ["module", "kronecker"])
def test_regularizer_changes_the_transforms_meta_gradient_only(l2l, kind):
    plain_transform, plain_model = _run(l2l, kind)
    transform, model = _run(l2l, kind, REGULARIZERS[kind])
    # θ_0 does not depend on φ; from θ_1 on the term reaches the transforms.
    assert all(g is None for g in transform[0])
    assert not _equal(transform[1], plain_transform[1]) and not _equal(transform[2], plain_transform[2])
    # The model's gradient, which the transform reads at the next step, is ∇f alone.
    assert all(_equal(a, b) for a, b in zip(model, plain_model))


def test_optimizee_loss_mode_trains_the_model_on_the_penalized_loss(l2l):
    _, plain_model = _run(l2l, "module")
    _, model = _run(l2l, "module", {"sharpness": {"weight": 1.0, "rho": 0.5, "mode": "optimizee_loss"}})
    assert not _equal(model[0], plain_model[0])


def test_flatness_penalty_is_differentiable_in_the_transform(l2l):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    metaopt = l2l.optim.LearnableOptimizer(model, _transform(l2l, "kronecker"), lr=0.1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def loss_of_model(m):
        return F.mse_loss(m(x), y)

    loss_of_model(model).backward()
    metaopt.step()  # the model's parameters are now T_φ's output
    flat = FlatL2O({"sharpness": {"weight": 1.0, "start_fraction": 0.5}}, plugin_manager=isolated_plugin_manager())
    early = flatness_penalty(model, loss_of_model, flat, 1, horizon=4)
    assert early.item() == 0.0 and not early.requires_grad  # not due yet: nothing evaluated
    penalty = flatness_penalty(model, loss_of_model, flat, 2, horizon=4)
    grads = torch.autograd.grad(penalty, list(metaopt.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_the_wrapper_is_transparent_and_checks_its_argument(l2l):
    model = nn.Linear(3, 2)
    metaopt = l2l.optim.LearnableOptimizer(model, _transform(l2l, "kronecker"))
    wrapped = FlatnessLearnableOptimizer(metaopt, {"sharpness": {"weight": 0.1}},
                                         plugin_manager=isolated_plugin_manager())
    assert list(wrapped.state_dict()) == list(metaopt.state_dict())
    assert [p for p in wrapped.parameters()] == [p for p in metaopt.parameters()]
    assert wrapped.model is model
    with pytest.raises(ConfigError, match="LearnableOptimizer"):
        FlatnessLearnableOptimizer(nn.Linear(2, 2))


def test_no_term_is_evaluated_at_the_first_step_where_it_cannot_reach_the_transforms(l2l):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    metaopt = l2l.optim.LearnableOptimizer(model, _transform(l2l, "module"), lr=0.1)
    flat_opt = FlatnessLearnableOptimizer(metaopt, {"sharpness": {"weight": 1.0, "rho": 0.5}},
                                          plugin_manager=isolated_plugin_manager())
    x, y = torch.randn(12, 4), torch.randn(12, 1)

    def loss_of_model(m):
        return F.mse_loss(m(x), y)

    sharpness = flat_opt.flat.active["sharpness"]
    assert flat_opt.backward(loss_of_model(model), loss_of_model) == {}
    assert sharpness.last_raw is None  # not evaluated: θ_0 is the model's own leaf parameters
    assert flatness_penalty(model, loss_of_model, flat_opt.flat, 0).requires_grad is False
    assert sharpness.last_raw is None
    metaopt.step()
    assert set(flat_opt.backward(loss_of_model(model), loss_of_model)) == {"sharpness"}
    assert sharpness.last_raw is not None


def test_the_regularizer_sees_one_dropout_mask_in_learn2learns_own_train_mode_loop(l2l):
    import repeated_loss_plugin

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 4))  # left in train mode
    metaopt = l2l.optim.LearnableOptimizer(model, _transform(l2l, "kronecker"), lr=0.1)
    flat_opt = FlatnessLearnableOptimizer(metaopt, {"repeated_loss": {"weight": 1.0}},
                                          plugin_manager=isolated_plugin_manager(repeated_loss_plugin))
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))

    def loss_of_model(m):
        return F.cross_entropy(m(x), y)

    for _ in range(3):
        metaopt.zero_grad()
        flat_opt.backward(loss_of_model(model), loss_of_model)
        metaopt.step()
    seen = flat_opt.flat.active["repeated_loss"].regularizer.seen
    assert len(seen) == 2  # steps 1 and 2; none at the first
    assert all(values[0] == values[1] == values[2] for values in seen)
