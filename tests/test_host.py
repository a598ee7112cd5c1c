"""The host facade hands regularizers one function (the same random state on every loss
evaluation), and what the host already computed at the iterate when they ask for it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import good_plugin
import host_values_plugin
import repeated_loss_plugin
from flat_l2o_plugin import FlatL2O
from flat_l2o_plugin.activation import accepted_host_values
from flat_l2o_plugin.testing import isolated_plugin_manager


class DropoutModel(nn.Module):
    """A classifier left in train mode, as learn2learn's and many users' loops leave it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))
        self.x, self.y = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def loss_fn(self, params):
        names = [n for n, _ in self.body.named_parameters()]
        logits = torch.func.functional_call(self.body, dict(zip(names, params)), (self.x,))
        return nn.functional.cross_entropy(logits, self.y)

    def params(self):
        return [p.detach().requires_grad_(True) for p in self.body.parameters()]


@pytest.fixture
def model():
    return DropoutModel()


def _same(values):
    return all(v == values[0] for v in values)


def test_the_losses_differ_between_dropout_masks(model):
    params = model.params()
    assert not _same([float(model.loss_fn(params).detach()) for _ in range(3)])  # what the estimators must not see


@pytest.mark.parametrize("mode", ["meta_loss", "optimizee_loss"])
def test_every_evaluation_in_one_regularizer_call_sees_one_dropout_mask(model, mode):
    hook = repeated_loss_plugin.RepeatedLossHook()
    flat = FlatL2O({"repeated_loss": {"weight": 1.0, "mode": mode}},
                   plugin_manager=isolated_plugin_manager(repeated_loss_plugin, hook))
    params = model.params()
    rng = torch.get_rng_state()
    for step in range(3):
        if mode == "meta_loss":
            terms = flat.flatness_terms(params, model.loss_fn, step)
            assert set(terms) == {"repeated_loss", "repeated_hook"}
        else:
            assert flat.optimizee_penalty(params, model.loss_fn, step) is not None
    estimator = flat.active["repeated_loss"].regularizer
    assert len(estimator.seen) == 3 and all(_same(values) for values in estimator.seen)
    assert all(_same(values) for values in hook.seen)  # a plugin implementing the hook itself too
    # The evaluations replay a fork of the host's random stream and leave it as it was.
    assert torch.equal(torch.get_rng_state(), rng)
    # Between calls the host's stream moves on, and so do the masks.
    model.loss_fn(params)
    later = flat.flatness_terms(params, model.loss_fn, 0) if mode == "meta_loss" else \
        flat.optimizee_penalty(params, model.loss_fn, 0)
    assert later is not None and estimator.seen[-1] != estimator.seen[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_random_state_is_replayed_too():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.5), nn.Linear(32, 1)).cuda()
    x = torch.randn(16, 6, device="cuda")
    names = [n for n, _ in body.named_parameters()]

    def loss_fn(params):
        return torch.func.functional_call(body, dict(zip(names, params)), (x,)).pow(2).mean()

    flat = FlatL2O({"repeated_loss": {"weight": 1.0}}, plugin_manager=isolated_plugin_manager(repeated_loss_plugin))
    flat.flatness_terms([p.detach().requires_grad_(True) for p in body.parameters()], loss_fn, 0)
    assert _same(flat.active["repeated_loss"].regularizer.seen[0])


# ----------------------------------------------------------------- what the host hands over


def _host_values_facade(**extra):
    config = {name: {"weight": 1.0} for name in ("sees_loss", "sees_grads", "takes_keywords", "l2_norm")}
    return FlatL2O({**config, **extra}, plugin_manager=isolated_plugin_manager(host_values_plugin, good_plugin))


def test_regularizers_get_the_hosts_loss_and_gradient_when_they_name_them(model):
    flat = _host_values_facade()
    params = model.params()
    loss, loss_fn = flat.evaluate_loss(model.loss_fn, params)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    terms = flat.flatness_terms(params, loss_fn, 0, loss=loss, grads=grads)
    assert set(terms) == {"sees_loss", "sees_grads", "takes_keywords", "l2_norm"}
    ((given, again),) = flat.active["sees_loss"].regularizer.seen
    # The very tensor, and of the function the regularizer evaluates: the same dropout mask.
    assert given is loss and again == float(loss.detach())
    (handed,) = flat.active["sees_grads"].regularizer.seen
    assert len(handed) == len(grads) and all(a is b for a, b in zip(handed, grads))
    assert flat.active["takes_keywords"].regularizer.seen == [{}]
    # A plugin written as reg(params, loss_fn) runs as before.
    assert flat.active["l2_norm"].regularizer.calls == 1


def test_nothing_is_handed_over_without_the_hosts_own_evaluation(model):
    flat = _host_values_facade()
    params = model.params()
    loss = model.loss_fn(params)  # a plain call: its dropout mask is not the one replayed below
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat.flatness_terms(params, model.loss_fn, 0, loss=loss, grads=grads)
    assert flat.active["sees_loss"].regularizer.seen[0][0] is None
    assert flat.active["sees_grads"].regularizer.seen == [None]


def test_evaluate_loss_advances_the_random_stream_as_a_plain_call_does(model):
    params = model.params()
    start = torch.get_rng_state()
    plain = float(model.loss_fn(params).detach())
    after_plain = torch.get_rng_state()
    torch.set_rng_state(start)
    loss, loss_fn = FlatL2O.evaluate_loss(model.loss_fn, params)
    assert float(loss.detach()) == plain
    assert torch.equal(torch.get_rng_state(), after_plain)
    # The returned function replays that evaluation, and leaves the stream where it is.
    assert [float(loss_fn(params).detach()) for _ in range(2)] == [plain, plain]
    assert torch.equal(torch.get_rng_state(), after_plain)


def test_wants_gradient_asks_for_due_regularizers_that_name_grads():
    from flat_l2o_plugin.regularizers import HessianTopEigenvalue, HessianTrace, Sharpness

    assert FlatL2O().wants_gradient(5) is False
    assert _host_values_facade().wants_gradient(5) is True
    flat = FlatL2O({"sees_grads": {"weight": 1.0, "warmup": 3}, "l2_norm": {"weight": 1.0}},
                   plugin_manager=isolated_plugin_manager(host_values_plugin, good_plugin))
    assert flat.wants_gradient(2) is False and flat.wants_gradient(4) is True
    assert flat.wants_gradient(4, mode="optimizee_loss") is False
    assert FlatL2O({"l2_norm": {"weight": 1.0}},
                   plugin_manager=isolated_plugin_manager(good_plugin)).wants_gradient(4) is False
    for estimator in (HessianTopEigenvalue, HessianTrace, Sharpness):
        assert "grads" in accepted_host_values(estimator())


def test_a_hosts_gradient_with_unused_params_or_the_wrong_length():
    from flat_l2o_plugin.errors import ConfigError

    flat = _host_values_facade()
    params = [torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)]
    loss, loss_fn = flat.evaluate_loss(lambda ps: (ps[0] ** 2).sum(), params)  # ps[1] unused
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    assert grads[1] is None
    flat.flatness_terms(params, loss_fn, 0, loss=loss, grads=grads)
    (handed,) = flat.active["sees_grads"].regularizer.seen
    assert handed[0] is grads[0] and torch.equal(handed[1], torch.zeros(2))
    with pytest.raises(ConfigError, match="grads: the host handed 1 gradient tensors for 2 params"):
        flat.flatness_terms(params, loss_fn, 0, loss=loss, grads=grads[:1])
