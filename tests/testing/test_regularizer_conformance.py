"""Every registered regularizer passes the conformance check that plugin authors reuse."""

from __future__ import annotations

import pytest
import torch

from flat_l2o_plugin import RegularizerInfo, hookimpl, list_regularizers
from flat_l2o_plugin.testing import check_regularizer, isolated_plugin_manager


@pytest.mark.parametrize("name", list_regularizers())
def test_registered_regularizer_conforms(name):
    check_regularizer(name, plugin_manager=isolated_plugin_manager())


class _Plugin:
    def __init__(self, factory):
        self.factory = factory

    @hookimpl
    def register_regularizers(self, register):
        register(RegularizerInfo(name="candidate", factory=self.factory))


def _broken(kind):
    class Broken:
        def __call__(self, params, loss_fn):
            loss = loss_fn(params)
            if kind == "detached":
                return loss.detach()
            if kind == "vector":
                return torch.stack([loss, loss])
            if kind == "nan":
                return loss * float("nan")
            if kind == "random":
                return loss + torch.rand(()).to(loss.dtype)  # drawn per call, not per seed
            if kind == "float32":
                return loss.float()
            raise AssertionError(kind)
    return Broken


@pytest.mark.parametrize("kind, message", [
    ("detached", "not differentiable"), ("vector", "0-dim"), ("nan", "not finite"),
    ("float32", "returned torch.float32"),
])
def test_the_check_catches_broken_regularizers(kind, message):
    pm = isolated_plugin_manager(("candidate", _Plugin(_broken(kind))), builtins=False)
    with pytest.raises(AssertionError, match=message):
        check_regularizer("candidate", plugin_manager=pm, dtypes=(torch.float64,))


def test_the_check_catches_hidden_global_randomness():
    counter = {"n": 0}

    class Drifting:
        def __call__(self, params, loss_fn):
            counter["n"] += 1  # state outside the seed: differs between two fresh instances
            return loss_fn(params) * (1 + 1e-3 * counter["n"])

    with pytest.raises(AssertionError, match="deterministic"):
        check_regularizer(Drifting, dtypes=(torch.float64,))


def test_the_check_catches_a_regularizer_that_misreads_the_hosts_values():
    class SquaredGradient:
        """‖∇f‖², but from the host's gradient it drops the graph (and so the derivative)."""

        def __call__(self, params, loss_fn, *, grads=None):
            if grads is None:
                grads = torch.autograd.grad(loss_fn(params), params, create_graph=True)
            else:
                grads = [g.detach() for g in grads]
            return sum((g * g).sum() for g in grads) + 0.0 * sum(p.sum() for p in params)

    with pytest.raises(AssertionError, match="gradient changes when the host hands over"):
        check_regularizer(SquaredGradient, dtypes=(torch.float64,))
