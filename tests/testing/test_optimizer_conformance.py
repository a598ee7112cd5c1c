"""Every registered learned optimizer passes the conformance check that plugin authors reuse.

The second half breaks a working optimizer in one specific way at a time and checks
that the conformance check names the property that broke.
"""

from __future__ import annotations


import pytest
import torch

from flat_l2o_plugin import OptimizerInfo, hookimpl, list_optimizers
from flat_l2o_plugin.optimizers import RNNProp
from flat_l2o_plugin.testing import check_learned_optimizer, isolated_plugin_manager


@pytest.mark.parametrize("name", list_optimizers())
def test_registered_optimizer_conforms(name):
    # With meta-training on mlp_digits: 3-12 s per optimizer on a busy two-core machine,
    # under the 15 s past which we would mark it slow.
    check_learned_optimizer(name, plugin_manager=isolated_plugin_manager(), meta_training=True)


def test_every_builtin_optimizer_declares_whether_it_is_coordinatewise():
    infos = {info.name: info for info in isolated_plugin_manager().components.optimizers}
    assert infos["rnnprop"].coordinatewise and infos["l2o_dm"].coordinatewise
    assert not infos["l2o_scale"].coordinatewise


# ---------------------------------------------------------------------------- broken optimizers


class _Plugin:
    def __init__(self, factory, coordinatewise=True):
        self.factory, self.coordinatewise = factory, coordinatewise

    @hookimpl
    def register_optimizers(self, register):
        register(OptimizerInfo(name="candidate", factory=self.factory, coordinatewise=self.coordinatewise))


def _check(factory, coordinatewise=True):
    pm = isolated_plugin_manager(("candidate", _Plugin(factory, coordinatewise)), builtins=False)
    check_learned_optimizer("candidate", plugin_manager=pm, meta_training=False)


class DetachedStep(RNNProp):
    def step(self, params, grads, state):
        new_params, new_state = super().step(params, grads, state)
        return [p.detach() for p in new_params], new_state


class DetachedHiddenState(RNNProp):
    """Cuts the graph between steps: the recurrent path no longer reaches the meta-loss."""

    def step(self, params, grads, state):
        new_params, new_state = super().step(params, grads, state)
        return new_params, {k: (v.detach() if k.startswith("lstm_") else v) for k, v in new_state.items()}


class MutatesStateInPlace(RNNProp):
    def step(self, params, grads, state):
        new_params, new_state = super().step(params, grads, state)
        with torch.no_grad():
            state["exp_avg"].copy_(new_state["exp_avg"])
        return new_params, new_state


class ReplacesStateEntries(RNNProp):
    def step(self, params, grads, state):
        new_params, new_state = super().step(params, grads, state)
        state["step"] = new_state["step"]  # the caller's dict, not a copy
        return new_params, new_state


class GlobalMean(RNNProp):
    """Adds the mean gradient over all coordinates: layout-invariant but not coordinatewise."""

    def step(self, params, grads, state):
        new_params, new_state = super().step(params, grads, state)
        mean = torch.cat([g.reshape(-1) for g in grads]).mean()
        return [p - 1e-2 * mean for p in new_params], new_state


class PerTensorMean(RNNProp):
    """Adds each tensor's mean gradient: the update depends on the tensor layout."""

    def step(self, params, grads, state):
        new_params, new_state = super().step(params, grads, state)
        return [p - 1e-2 * g.mean() for p, g in zip(new_params, grads)], new_state


class LosesDtype(RNNProp):
    def step(self, params, grads, state):
        new_params, new_state = super().step(params, grads, state)
        return [p.float() for p in new_params], new_state


class PythonState(RNNProp):
    def init_state(self, params, **kwargs):
        return {**super().init_state(params, **kwargs), "note": "not a tensor"}

    def step(self, params, grads, state):
        return super().step(params, grads, {k: v for k, v in state.items() if k != "note"})


class SharedMemoryState(RNNProp):
    def state_keys(self):
        return super().state_keys() + ["alias"]

    def init_state(self, params, **kwargs):
        state = super().init_state(params, **kwargs)
        return {**state, "alias": state["exp_avg"]}

    def step(self, params, grads, state):
        new_params, new_state = super().step(params, grads, state)
        return new_params, {**new_state, "alias": new_state["exp_avg"]}


class HiddenCounter(RNNProp):
    """Keeps part of its state on the module, where a saved state cannot restore it."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def step(self, params, grads, state):
        self.calls += 1
        new_params, new_state = super().step(params, grads, state)
        return [p + 1e-3 * self.calls for p in new_params], new_state


@pytest.mark.parametrize("factory, message", [
    (DetachedStep, r"differentiable: the new params carry no graph"),
    (DetachedHiddenState, r"differentiable: .*finite difference"),
    (MutatesStateInPlace, r"state not mutated: step\(\) modified state\['exp_avg'\] in place"),
    (ReplacesStateEntries, r"state not mutated: step\(\) replaced state\['step'\]"),
    (GlobalMean, r"coordinatewise: changing the gradients of coordinate 7"),
    (PerTensorMean, r"coordinatewise: the same coordinates split into three tensors"),
    (LosesDtype, r"shapes and dtypes: param 0 went from .* torch.float64 to .* torch.float32"),
    (PythonState, r"flat tensor state: init_state\(\) returned state\['note'\] of type str"),
    (SharedMemoryState, r"state round trip: safetensors cannot save the state"),
    (HiddenCounter, r"state round trip: param 0 differs after resuming"),
], ids=lambda x: x.__name__ if isinstance(x, type) else None)
def test_the_check_catches_a_broken_optimizer(factory, message):
    with pytest.raises(AssertionError, match=rf"^learned optimizer 'candidate': {message}"):
        _check(factory)


def test_optimizers_that_share_information_skip_only_the_coordinatewise_property():
    _check(GlobalMean, coordinatewise=False)
    _check(PerTensorMean, coordinatewise=False)
    with pytest.raises(AssertionError, match="coordinatewise"):
        check_learned_optimizer(OptimizerInfo(name="candidate", factory=GlobalMean), meta_training=False)


def test_a_bare_factory_is_named_in_the_message():
    with pytest.raises(AssertionError, match=r"^learned optimizer 'DetachedStep': differentiable"):
        check_learned_optimizer(DetachedStep, meta_training=False)


def test_an_exception_inside_the_optimizer_names_the_property():
    class Raises(RNNProp):
        def init_state(self, params, **kwargs):
            raise RuntimeError("boom")

    with pytest.raises(AssertionError, match=r"'candidate': shapes and dtypes: raised RuntimeError: boom"):
        _check(Raises)


def test_options_reach_the_factory():
    seen = []

    def factory(**options):
        seen.append(options)
        return RNNProp(**options)

    check_learned_optimizer(factory, options={"hidden_size": 8}, meta_training=False)
    assert seen and all(o == {"hidden_size": 8} for o in seen)
