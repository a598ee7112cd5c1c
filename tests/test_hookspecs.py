"""The hook contract: every spec is documented, and the host calls each one as documented."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import flat_l2o_plugin
from flat_l2o_plugin import FlatL2O, RegularizerInfo, get_plugin_manager, hookimpl, hookspecs
from flat_l2o_plugin.registry import ComponentInfo, OptimizerInfo, TaskInfo, WrapperInfo

SPEC_MARKER = f"{hookspecs.PROJECT_NAME}_spec"
SPECS = {name: fn for name, fn in vars(hookspecs).items()
         if inspect.isfunction(fn) and hasattr(fn, SPEC_MARKER)}
REGISTRATION_HOOKS = ("register_regularizers", "register_optimizers", "register_wrappers", "register_tasks",
                      "register_pretrained")
RUNTIME_HOOKS = ("flatness_terms", "after_unroll")


def spec_arguments(hook: str) -> set[str]:
    return set(inspect.signature(SPECS[hook]).parameters)


def quadratic_problem():
    params = [torch.tensor([1.0, -2.0], requires_grad=True), torch.tensor([0.5], requires_grad=True)]

    def loss_fn(ps):
        return sum((p ** 2).sum() for p in ps) * 0.5

    return params, loss_fn


def squared_norm(params, loss_fn):
    return sum((p * p).sum() for p in params)


class Recorder:
    """Implements every hook with the spec's full signature and records each call."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: dict[str, list[dict]] = {hook: [] for hook in SPECS}

    @hookimpl
    def register_regularizers(self, register):
        self.calls["register_regularizers"].append({"register": register})
        register(RegularizerInfo(name="recorded_norm", factory=lambda: squared_norm))

    @hookimpl
    def register_optimizers(self, register):
        self.calls["register_optimizers"].append({"register": register})

    @hookimpl
    def register_wrappers(self, register):
        self.calls["register_wrappers"].append({"register": register})

    @hookimpl
    def register_tasks(self, register):
        self.calls["register_tasks"].append({"register": register})

    @hookimpl
    def register_pretrained(self, register):
        self.calls["register_pretrained"].append({"register": register})

    @hookimpl
    def flatness_terms(self, params, loss_fn, step, optimizer, active, loss, horizon, initial_loss, grads):
        self.calls["flatness_terms"].append(dict(params=params, loss_fn=loss_fn, step=step,
                                                 optimizer=optimizer, active=active, loss=loss,
                                                 horizon=horizon, initial_loss=initial_loss, grads=grads))

    @hookimpl
    def after_unroll(self, step, meta_loss, logs):
        self.calls["after_unroll"].append(dict(step=step, meta_loss=meta_loss, logs=logs))


def test_the_contract_has_the_documented_hooks():
    assert set(SPECS) == {*REGISTRATION_HOOKS, *RUNTIME_HOOKS}


@pytest.mark.parametrize("hook", sorted(SPECS))
def test_every_hookspec_documents_each_argument(hook):
    doc = inspect.getdoc(SPECS[hook])
    assert doc and len(doc.splitlines()) > 3, f"hookspec {hook} needs reference documentation"
    for argument in spec_arguments(hook):
        assert f"{argument}:" in doc, f"hookspec {hook} does not document its argument {argument!r}"


@pytest.mark.parametrize("hook", sorted(SPECS))
def test_no_hook_lets_one_plugin_override_the_others(hook):
    pm = get_plugin_manager(entry_points=False, builtins=False)
    opts = getattr(pm.hook, hook).spec.opts
    assert not opts.get("firstresult"), f"{hook} must not be firstresult"
    assert not opts.get("historic")


def test_plugin_authors_import_everything_from_the_top_level_package():
    assert flat_l2o_plugin.hookimpl is hookspecs.hookimpl
    for name in ("hookimpl", "RegularizerInfo", "OptimizerInfo", "WrapperInfo", "TaskInfo", "FlatL2O",
                 "get_plugin_manager", "create_regularizer", "list_regularizers"):
        assert name in flat_l2o_plugin.__all__
        assert hasattr(flat_l2o_plugin, name)
    assert hookimpl.project_name == hookspecs.PROJECT_NAME == "flat_l2o_plugin"


@pytest.mark.parametrize("info_type", [RegularizerInfo, OptimizerInfo, WrapperInfo, TaskInfo])
def test_component_info_is_a_frozen_dataclass(info_type):
    info = info_type(name="example", factory=dict)
    assert dataclasses.is_dataclass(info) and isinstance(info, ComponentInfo)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.name = "renamed"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.factory = list  # type: ignore[misc]


def test_regularizer_info_has_capability_flags_and_merges_defaults():
    info = RegularizerInfo(name="scaled", factory=lambda scale, power: (scale, power),
                           defaults={"scale": 2.0, "power": 1})
    assert (info.needs_hvp, info.stochastic) == (False, False)
    assert info.create(power=3) == (2.0, 3)
    assert info.defaults == {"scale": 2.0, "power": 1}, "create() must not change the defaults"


@pytest.mark.parametrize("bad_name", ["", "has space", "hessian-trace", "1st", None])
def test_component_names_must_be_identifiers(bad_name):
    with pytest.raises(ValueError, match="identifier"):
        RegularizerInfo(name=bad_name, factory=dict)


def test_component_factory_must_be_callable():
    with pytest.raises(TypeError, match="factory"):
        RegularizerInfo(name="not_callable", factory=42)  # type: ignore[arg-type]


# ----------------------------------------------------------------- the host calls every hook


@pytest.fixture
def recorder():
    rec = Recorder()
    pm = get_plugin_manager(entry_points=False, plugins=[rec])
    return rec, pm


@pytest.mark.parametrize("hook", REGISTRATION_HOOKS)
def test_registration_hooks_run_once_per_manager_with_a_register_callback(recorder, hook):
    rec, pm = recorder
    assert rec.calls[hook] == [], "registration must wait until the registries are needed"
    pm.components
    pm.components
    assert len(rec.calls[hook]) == 1
    (call,) = rec.calls[hook]
    assert set(call) == spec_arguments(hook)
    assert callable(call["register"])


def test_flatness_terms_receives_the_documented_arguments(recorder):
    rec, pm = recorder
    params, loss_fn = quadratic_problem()
    loss = loss_fn(params)
    optimizer = object()
    flat = FlatL2O({"recorded_norm": {"weight": 0.5}}, plugin_manager=pm)

    terms = flat.flatness_terms(params, loss_fn, 7, optimizer=optimizer, loss=loss, horizon=20, initial_loss=2.5)

    assert list(terms) == ["recorded_norm"]
    torch.testing.assert_close(terms["recorded_norm"], 0.5 * squared_norm(params, loss_fn))
    (call,) = rec.calls["flatness_terms"]
    assert set(call) == spec_arguments("flatness_terms")
    assert call["params"] is params and call["loss"] is loss
    # The host's loss_fn, replaying one random state on every evaluation (see FlatL2O.flatness_terms).
    assert torch.equal(call["loss_fn"](params), loss_fn(params))
    assert call["step"] == 7 and call["optimizer"] is optimizer
    assert call["horizon"] == 20 and call["initial_loss"] == 2.5
    assert list(call["active"]) == ["recorded_norm"]
    assert call["active"]["recorded_norm"] is flat.active["recorded_norm"]
    assert call["grads"] is None


def test_flatness_terms_hands_over_the_gradient_of_the_hosts_own_evaluation(recorder):
    rec, pm = recorder
    params, plain_loss_fn = quadratic_problem()
    flat = FlatL2O({"recorded_norm": {"weight": 0.5}}, plugin_manager=pm)
    loss, loss_fn = flat.evaluate_loss(plain_loss_fn, params)
    grads = torch.autograd.grad(loss, params, create_graph=True)

    flat.flatness_terms(params, loss_fn, 3, loss=loss, grads=grads)
    # A loss_fn the host did not get from evaluate_loss says nothing about its gradient.
    flat.flatness_terms(params, plain_loss_fn, 3, loss=loss, grads=grads)

    handed, withheld = rec.calls["flatness_terms"]
    assert handed["grads"] is grads and handed["loss_fn"] is loss_fn and handed["loss"] is loss
    assert withheld["grads"] is None and withheld["loss"] is loss


def test_flatness_terms_passes_none_for_what_the_host_does_not_have(recorder):
    rec, pm = recorder
    params, loss_fn = quadratic_problem()
    FlatL2O(plugin_manager=pm).flatness_terms(params, loss_fn, 0)
    (call,) = rec.calls["flatness_terms"]
    assert call["optimizer"] is None and call["loss"] is None and call["active"] == {}
    assert call["horizon"] is None and call["initial_loss"] is None


def test_after_unroll_receives_the_documented_arguments(recorder):
    rec, pm = recorder
    meta_loss = torch.tensor(1.25)
    logs = {"meta_loss": 1.25}
    FlatL2O(plugin_manager=pm).after_unroll(step=3, meta_loss=meta_loss, logs=logs)
    (call,) = rec.calls["after_unroll"]
    assert set(call) == spec_arguments("after_unroll")
    assert call == {"step": 3, "meta_loss": meta_loss, "logs": logs}


def test_after_unroll_observers_may_add_log_keys():
    class Annotator:
        @hookimpl
        def after_unroll(self, logs):
            logs["annotator/seen"] = True

    logs: dict = {}
    pm = get_plugin_manager(entry_points=False, plugins=[("annotator", Annotator())])
    FlatL2O(plugin_manager=pm).after_unroll(step=0, meta_loss=torch.tensor(0.0), logs=logs)
    assert logs == {"annotator/seen": True}


def test_a_hookimpl_may_accept_a_subset_of_the_spec_arguments():
    seen = []

    class StepOnly:
        @hookimpl
        def flatness_terms(self, step):
            seen.append(step)
            return {"constant": torch.tensor(0.25)}

        @hookimpl
        def after_unroll(self):
            seen.append("after")

    pm = get_plugin_manager(entry_points=False, builtins=False, plugins=[("step_only", StepOnly())])
    assert pm.records["step_only"].status == "loaded"
    flat = FlatL2O(plugin_manager=pm)
    params, loss_fn = quadratic_problem()
    assert flat.penalty(params, loss_fn, 4).item() == 0.25
    flat.after_unroll(step=0, meta_loss=torch.tensor(0.0), logs={})
    assert seen == [4, "after"]


def test_installed_but_inactive_regularizers_do_not_change_the_meta_loss():
    # The built-ins are installed; with no activation config no term may appear.
    params, loss_fn = quadratic_problem()
    flat = FlatL2O(plugin_manager=get_plugin_manager(entry_points=False))
    assert "hessian_top_eigenvalue" in flat.components.regularizers
    assert flat.flatness_terms(params, loss_fn, 5, loss=loss_fn(params)) == {}
    assert flat.penalty(params, loss_fn, 5).item() == 0.0
