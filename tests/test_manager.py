"""The plugin manager and the host facade, against the documented contract.

Entry points are faked (see ``fake_entry_points`` in ``conftest.py``) and point at the
fixture plugins in ``tests/plugins/``; nothing here depends on what is installed.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from flat_l2o_plugin import (
    FlatL2O,
    FlatL2OError,
    RegularizerInfo,
    create_regularizer,
    create_task,
    get_plugin_manager,
    hookimpl,
    list_regularizers,
)
from flat_l2o_plugin.errors import (
    ConfigError,
    DuplicateComponentError,
    PluginHookError,
    PluginLoadError,
    PluginLoadWarning,
    PluginValidationError,
    UnknownComponentError,
)
from flat_l2o_plugin.host import Schedule
from flat_l2o_plugin.training import MetaTrainConfig, MetaTrainer

# A plugin warning no test asked for is a failure, not noise.
pytestmark = pytest.mark.filterwarnings("error::flat_l2o_plugin.errors.PluginLoadWarning")

REPO_ROOT = Path(__file__).resolve().parents[1]
PLUGINS_DIR = Path(__file__).parent / "plugins"


def quadratic_problem():
    params = [torch.tensor([3.0, -4.0], requires_grad=True), torch.tensor([[1.0, 2.0]], requires_grad=True)]

    def loss_fn(ps):
        return 0.1 * sum((p * p).sum() for p in ps) + 1.0

    return params, loss_fn


def squared_norm(params) -> torch.Tensor:
    return sum((p * p).sum() for p in params)


def constant_terms_plugin(name: str, **terms: float):
    """An instance plugin whose ``flatness_terms`` returns the given constants."""

    class ConstantTerms:
        @hookimpl
        def flatness_terms(self):
            return {k: torch.tensor(v) for k, v in terms.items()}

    return name, ConstantTerms()


@pytest.fixture
def good(fake_entry_points, entry_point):
    """Installed: the built-ins and ``good`` (distribution ``good-dist`` 1.2.3)."""
    fake_entry_points(entry_point("good", "good_plugin", dist="good-dist", version="1.2.3"))


@pytest.fixture
def good_pm(good):
    return get_plugin_manager()


# ----------------------------------------------------------------- a fresh manager per call


def test_each_call_builds_an_independent_manager():
    first, second = get_plugin_manager(entry_points=False), get_plugin_manager(entry_points=False)
    assert first is not second
    assert first.components.regularizers is not second.components.regularizers

    first.add_plugin(importlib.import_module("good_plugin"), "good")
    FlatL2O(plugin_manager=first)

    assert "l2_norm" in first.components.regularizers
    assert "l2_norm" not in second.components.regularizers
    assert second.get_plugin("good") is None and "good" not in second.records
    assert second.get_plugins() == {second.get_plugin("builtin")}
    assert "l2_norm" not in list_regularizers()


def test_importing_the_package_loads_no_plugin():
    script = textwrap.dedent("""
        import sys
        from importlib import metadata

        real_entry_points = metadata.entry_points

        def guarded(**selection):
            if selection.get("group") == "flat_l2o_plugin":
                raise AssertionError("entry points were discovered at import time")
            return real_entry_points(**selection)

        metadata.entry_points = guarded
        import flat_l2o_plugin
        import flat_l2o_plugin.host, flat_l2o_plugin.manager, flat_l2o_plugin.registry
        metadata.entry_points = real_entry_points

        fixtures = {"good_plugin", "broken_plugin", "misspelled_plugin", "duplicate_plugin",
                    "raising_plugin", "observer_plugins"}
        loaded = sorted(m for m in sys.modules if m == "flat_l2o_plugin.builtin" or m in fixtures)
        assert loaded == [], f"imported at package import: {loaded}"

        flat_l2o_plugin.get_plugin_manager()  # the control: building a manager does load it
        assert "flat_l2o_plugin.builtin" in sys.modules
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAT_L2O_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGINS_DIR), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# ----------------------------------------------------------------- loading entry points


def test_entry_points_load_in_sorted_order_whatever_the_discovery_order(fake_entry_points, entry_point):
    observers = [entry_point(n, f"observer_plugins:{n}", dist=f"{n}-dist") for n in ("zeta", "alpha", "middle")]
    orders = []
    for discovered in (observers, observers[::-1]):
        fake_entry_points(*discovered)
        pm = get_plugin_manager()
        orders.append(pm.loaded_plugins())
        assert list(pm.records) == pm.loaded_plugins()
    assert orders[0] == orders[1] == ["alpha", "builtin", "middle", "zeta"]


def test_observers_are_called_in_plugin_name_order(fake_entry_points, entry_point):
    fake_entry_points(*(entry_point(n, f"observer_plugins:{n}") for n in ("zeta", "middle", "alpha")))
    FlatL2O(plugin_manager=get_plugin_manager()).after_unroll(step=0, meta_loss=torch.tensor(0.0), logs={})
    assert sys.modules["observer_plugins"].CALLS == ["alpha", "middle", "zeta"]


def test_a_good_plugin_regularizer_is_usable_through_the_facade(good_pm):
    assert good_pm.loaded_plugins() == ["builtin", "good"]
    params, loss_fn = quadratic_problem()
    flat = FlatL2O({"l2_norm": {"weight": 0.5}}, plugin_manager=good_pm)
    terms = flat.flatness_terms(params, loss_fn, 0, loss=loss_fn(params))
    assert list(terms) == ["l2_norm"]
    torch.testing.assert_close(terms["l2_norm"], 0.5 * squared_norm(params))
    (grad,) = torch.autograd.grad(terms["l2_norm"], params[0])
    torch.testing.assert_close(grad, params[0].detach())  # d/dθ 0.5‖θ‖² = θ


def test_public_functions_see_installed_plugins(good):
    assert list_regularizers("l2_*") == ["l2_norm"]
    assert ("l2_norm", "Sum of squared parameters.") in list_regularizers(with_description=True)
    assert {"hessian_top_eigenvalue", "l2_norm"} <= set(list_regularizers())
    reg = create_regularizer("l2_norm", scale=2.0)
    params, loss_fn = quadratic_problem()
    torch.testing.assert_close(reg(params, loss_fn), 2.0 * squared_norm(params))


def test_the_builtin_plugin_loads_from_a_source_tree_without_an_entry_point(fake_entry_points, entry_point):
    fake_entry_points(entry_point("good", "good_plugin"), builtin=False)
    pm = get_plugin_manager()
    assert pm.loaded_plugins() == ["good", "builtin"]
    assert pm.records["builtin"].distribution == "flat-l2o-plugin"
    assert pm.records["builtin"].value == "flat_l2o_plugin.builtin"
    assert "hessian_top_eigenvalue" in pm.components.regularizers


def test_a_broken_plugin_warns_naming_entry_point_and_distribution(fake_entry_points, entry_point):
    fake_entry_points(entry_point("broken", "broken_plugin", dist="broken-dist", version="2.0"),
                      entry_point("good", "good_plugin", dist="good-dist"))
    with pytest.warns(PluginLoadWarning) as caught:
        pm = get_plugin_manager()
    (warning,) = caught
    message = str(warning.message)
    for expected in ("'broken'", "'broken-dist'", "ImportError", "flat_l2o_missing_dependency"):
        assert expected in message

    record = pm.records["broken"]
    assert record.status == "failed" and "flat_l2o_missing_dependency" in record.error
    assert pm.failures == {"broken": record.error}
    assert pm.loaded_plugins() == ["builtin", "good"]
    # Everything else keeps working: the built-ins and the other third-party plugin.
    assert {"hessian_top_eigenvalue", "l2_norm"} <= set(pm.components.regularizers.names())
    params, loss_fn = quadratic_problem()
    value = pm.components.regularizers.get("hessian_top_eigenvalue").create()(params, loss_fn)
    assert value.dim() == 0 and torch.isfinite(value)


@pytest.mark.parametrize("how", ["env=1", "env=true", "argument"])
def test_strict_mode_raises_with_the_import_error_chained(fake_entry_points, entry_point, monkeypatch, how):
    fake_entry_points(entry_point("broken", "broken_plugin", dist="broken-dist"))
    if how.startswith("env"):
        monkeypatch.setenv("FLAT_L2O_STRICT_PLUGINS", how.split("=")[1])
    with pytest.raises(PluginLoadError, match=r"'broken'.*'broken-dist'") as raised:
        get_plugin_manager(strict=True if how == "argument" else None)
    assert isinstance(raised.value.__cause__, ImportError)
    assert "flat_l2o_missing_dependency" in str(raised.value.__cause__)
    assert isinstance(raised.value, FlatL2OError)


def test_strict_false_overrides_the_environment(fake_entry_points, entry_point, monkeypatch):
    fake_entry_points(entry_point("broken", "broken_plugin"))
    monkeypatch.setenv("FLAT_L2O_STRICT_PLUGINS", "1")
    with pytest.warns(PluginLoadWarning, match="broken"):
        pm = get_plugin_manager(strict=False)
    assert pm.records["broken"].status == "failed"


def test_a_misspelled_hook_is_caught_with_a_hint(fake_entry_points, entry_point):
    fake_entry_points(entry_point("misspelled", "misspelled_plugin", dist="misspelled-dist"))
    with pytest.warns(PluginLoadWarning) as caught:
        pm = get_plugin_manager()
    message = str(caught[0].message)
    assert "'misspelled'" in message
    assert "'register_regularisers' (did you mean 'register_regularizers'?)" in message
    assert "'flatness_term' (did you mean 'flatness_terms'?)" in message
    assert pm.records["misspelled"].status == "failed"
    assert pm.get_plugin("misspelled") is None, "a rejected plugin must not stay registered"
    FlatL2O(plugin_manager=pm)  # check_pending passes: nothing unknown is left behind


def test_a_misspelled_hook_is_an_error_in_strict_mode(fake_entry_points, entry_point):
    fake_entry_points(entry_point("misspelled", "misspelled_plugin"))
    with pytest.raises(PluginValidationError, match="did you mean 'register_regularizers'"):
        get_plugin_manager(strict=True)


def test_the_facade_checks_pending_hooks_of_plugins_registered_behind_the_managers_back():
    pm = get_plugin_manager(entry_points=False)
    pm.register(importlib.import_module("misspelled_plugin"), name="late")
    with pytest.raises(PluginValidationError, match="did you mean"):
        FlatL2O(plugin_manager=pm)


class WrongArgument:
    @hookimpl
    def flatness_terms(self, params, temperature):
        return None


def test_a_hookimpl_with_an_argument_the_spec_lacks_is_rejected():
    with pytest.warns(PluginLoadWarning, match="temperature"):
        pm = get_plugin_manager(entry_points=False, plugins=[("wrong_argument", WrongArgument())])
    assert pm.records["wrong_argument"].status == "failed"
    assert pm.get_plugin("wrong_argument") is None


def test_a_hookimpl_with_an_argument_the_spec_lacks_is_a_validation_error_in_strict_mode():
    # errors.PluginValidationError: "implements a hook ... with arguments the spec lacks".
    with pytest.raises(PluginValidationError, match="temperature"):
        get_plugin_manager(entry_points=False, strict=True, plugins=[("wrong_argument", WrongArgument())])


def test_registering_a_class_instead_of_an_instance_says_what_to_do():
    with pytest.warns(PluginLoadWarning, match=r"forgotten the `\(\)`"):
        pm = get_plugin_manager(entry_points=False, plugins=[("by_class", WrongArgument)])
    assert pm.records["by_class"].status == "failed"


def test_a_duplicate_component_name_names_both_plugins(fake_entry_points, entry_point, monkeypatch):
    fake_entry_points(entry_point("duplicate", "duplicate_plugin", dist="dup-dist"))
    pm = get_plugin_manager()
    with pytest.raises(DuplicateComponentError, match=r"'hessian_top_eigenvalue'.*'builtin'.*'duplicate'"):
        pm.components
    with pytest.raises(DuplicateComponentError):
        create_regularizer("hessian_top_eigenvalue")
    # The message's advice works: disabling one provider resolves the clash.
    monkeypatch.setenv("FLAT_L2O_DISABLE_PLUGINS", "dup-dist")
    assert get_plugin_manager().components.regularizers.provider("hessian_top_eigenvalue") == "builtin"


def test_two_distributions_with_one_entry_point_name_keep_the_first_working(fake_entry_points, entry_point):
    fake_entry_points(entry_point("shared", "good_plugin", dist="a-dist"),
                      entry_point("shared", "observer_plugins:alpha", dist="b-dist"))
    with pytest.warns(PluginLoadWarning) as caught:
        pm = get_plugin_manager()
    # The plugin that did register must stay usable and recorded as loaded.
    assert pm.records["shared"].status == "loaded"
    assert pm.records["shared"].distribution == "a-dist"
    assert "l2_norm" in pm.components.regularizers
    assert "b-dist" in str(caught[0].message)


def test_a_plugin_raising_in_a_registration_hook_is_skipped():
    class FailsToRegister:
        calls: list[int] = []

        @hookimpl
        def register_regularizers(self, register):
            raise RuntimeError("registry service unavailable")

        @hookimpl
        def after_unroll(self, step):
            self.calls.append(step)

    plugin = FailsToRegister()
    pm = get_plugin_manager(entry_points=False, plugins=[("fails_to_register", plugin)])
    with pytest.warns(PluginLoadWarning, match=r"'fails_to_register'.*register_regularizers.*unavailable"):
        regularizers = pm.components.regularizers
    assert "hessian_top_eigenvalue" in regularizers
    assert pm.records["fails_to_register"].status == "failed"
    # "the plugin is skipped": none of its hooks may run afterwards.
    FlatL2O(plugin_manager=pm).after_unroll(step=0, meta_loss=torch.tensor(0.0), logs={})
    assert plugin.calls == []


def test_a_plugin_raising_in_a_registration_hook_is_an_error_in_strict_mode():
    class FailsToRegister:
        @hookimpl
        def register_regularizers(self, register):
            raise RuntimeError("registry service unavailable")

    pm = get_plugin_manager(entry_points=False, strict=True, plugins=[("fails_to_register", FailsToRegister())])
    with pytest.raises(PluginLoadError, match="fails_to_register") as raised:
        pm.components
    assert isinstance(raised.value.__cause__, RuntimeError)


# ----------------------------------------------------------------- allow and deny lists


@pytest.fixture
def example_and_good(fake_entry_points, entry_point):
    fake_entry_points(entry_point("example", "good_plugin", dist="flat-l2o-example-plugin"),
                      entry_point("observer", "observer_plugins:alpha", dist="observer-dist"))


@pytest.mark.parametrize("disable", ["example", "flat-l2o-example-plugin", "Flat_L2O.Example-Plugin",
                                     " observer-dist , flat_l2o_example_plugin "])
def test_disable_by_entry_point_or_pip_name(example_and_good, monkeypatch, disable):
    monkeypatch.setenv("FLAT_L2O_DISABLE_PLUGINS", disable)
    pm = get_plugin_manager()
    record = pm.records["example"]
    assert (record.status, record.disabled_by) == ("disabled", "FLAT_L2O_DISABLE_PLUGINS")
    assert pm.disabled["example"] == "FLAT_L2O_DISABLE_PLUGINS"
    assert "good_plugin" not in sys.modules, "a disabled plugin must not even be imported"
    assert "l2_norm" not in pm.components.regularizers
    assert "hessian_top_eigenvalue" in pm.components.regularizers
    assert ("observer" in pm.loaded_plugins()) == ("observer" not in disable)


@pytest.mark.parametrize("load", ["example", "Flat_L2O.Example-Plugin", "FLAT-L2O-EXAMPLE-PLUGIN,unrelated"])
def test_load_list_by_entry_point_or_pip_name(example_and_good, monkeypatch, load):
    monkeypatch.setenv("FLAT_L2O_LOAD_PLUGINS", load)
    pm = get_plugin_manager()
    assert pm.loaded_plugins() == ["builtin", "example"]
    assert (pm.records["observer"].status, pm.records["observer"].disabled_by) == ("disabled",
                                                                                   "FLAT_L2O_LOAD_PLUGINS")
    assert {"hessian_top_eigenvalue", "l2_norm"} <= set(pm.components.regularizers.names())


def test_an_empty_load_list_loads_no_third_party_plugin(fake_entry_points, entry_point, monkeypatch):
    # The recovery path: a broken plugin is installed, and an empty allow-list skips it quietly.
    fake_entry_points(entry_point("broken", "broken_plugin"), entry_point("good", "good_plugin"))
    monkeypatch.setenv("FLAT_L2O_LOAD_PLUGINS", "")
    pm = get_plugin_manager()
    assert pm.loaded_plugins() == ["builtin"]
    assert pm.failures == {}
    assert "broken_plugin" not in sys.modules and "good_plugin" not in sys.modules
    assert "hessian_top_eigenvalue" in pm.components.regularizers


def test_disable_wins_over_load(good, monkeypatch):
    monkeypatch.setenv("FLAT_L2O_LOAD_PLUGINS", "good")
    monkeypatch.setenv("FLAT_L2O_DISABLE_PLUGINS", "good-dist")
    assert get_plugin_manager().loaded_plugins() == ["builtin"]


def test_explicit_lists_take_precedence_over_the_environment(good, monkeypatch):
    monkeypatch.setenv("FLAT_L2O_DISABLE_PLUGINS", "good")
    assert get_plugin_manager(disable=[]).loaded_plugins() == ["builtin", "good"]
    monkeypatch.delenv("FLAT_L2O_DISABLE_PLUGINS")
    monkeypatch.setenv("FLAT_L2O_LOAD_PLUGINS", "good")
    pm = get_plugin_manager(load=[])
    assert pm.loaded_plugins() == ["builtin"]
    assert pm.records["good"].disabled_by != "FLAT_L2O_LOAD_PLUGINS"


@pytest.mark.parametrize("disable", ["builtin", "flat-l2o-plugin", "Flat_L2O_Plugin"])
@pytest.mark.parametrize("installed", [True, False], ids=["installed", "source-tree"])
def test_disabling_the_builtin_plugin(fake_entry_points, entry_point, monkeypatch, disable, installed):
    fake_entry_points(entry_point("good", "good_plugin", dist="good-dist"), builtin=installed)
    monkeypatch.setenv("FLAT_L2O_DISABLE_PLUGINS", disable)
    pm = get_plugin_manager()
    assert pm.loaded_plugins() == ["good"]
    assert pm.records["builtin"].status == "disabled"
    assert pm.components.regularizers.names() == ["l2_norm"]
    with pytest.raises(UnknownComponentError, match=r"'hessian_top_eigenvalue'.*'builtin'.*FLAT_L2O_DISABLE_PLUGINS"):
        FlatL2O({"hessian_top_eigenvalue": {"weight": 1.0}}, plugin_manager=pm)


def test_unknown_component_lists_available_names_and_failed_plugins(fake_entry_points, entry_point):
    fake_entry_points(entry_point("broken", "broken_plugin", dist="broken-dist"), entry_point("good", "good_plugin"))
    with pytest.warns(PluginLoadWarning):
        with pytest.raises(UnknownComponentError) as raised:
            create_regularizer("l2_nrom")
    message = str(raised.value)
    assert "'l2_nrom'" in message and "did you mean 'l2_norm'" in message
    for available in ("hessian_top_eigenvalue", "hessian_trace", "l2_norm"):
        assert available in message
    assert "broken" in message and "flat_l2o_missing_dependency" in message
    assert isinstance(raised.value, KeyError) and isinstance(raised.value, FlatL2OError)


def test_unknown_task_lists_the_registered_tasks():
    with pytest.raises(UnknownComponentError, match="mlp_digits"):
        create_task("no_such_task")


# ----------------------------------------------------------------- records


def test_plugin_records_describe_each_plugin(good_pm):
    record = good_pm.records["good"]
    assert (record.name, record.distribution, record.version, record.value) == (
        "good", "good-dist", "1.2.3", "good_plugin")
    assert (record.status, record.error, record.disabled_by) == ("loaded", None, None)
    assert record.hooks == ["after_unroll", "register_regularizers"]

    components = good_pm.components
    assert record.components == {"regularizers": ["l2_norm"]}
    assert components.regularizers.provider("l2_norm") == "good"

    builtin = good_pm.records["builtin"]
    assert (builtin.distribution, builtin.version, builtin.value) == (
        "flat-l2o-plugin", "0.1.0", "flat_l2o_plugin.builtin")
    assert {"register_regularizers", "register_optimizers", "register_tasks"} <= set(builtin.hooks)
    assert {"hessian_top_eigenvalue", "hessian_trace"} <= set(builtin.components["regularizers"])
    assert "rnnprop" in builtin.components["optimizers"]
    assert "mlp_digits" in builtin.components["tasks"]

    as_dict = record.as_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["distribution"] == "good-dist" and as_dict["components"] == {"regularizers": ["l2_norm"]}


def test_records_of_disabled_and_failed_plugins_keep_their_distribution(fake_entry_points, entry_point, monkeypatch):
    fake_entry_points(entry_point("broken", "broken_plugin", dist="broken-dist", version="2.0"),
                      entry_point("good", "good_plugin", dist="good-dist", version="1.2.3"))
    monkeypatch.setenv("FLAT_L2O_DISABLE_PLUGINS", "good")
    with pytest.warns(PluginLoadWarning):
        pm = get_plugin_manager()
    assert (pm.records["good"].distribution, pm.records["good"].version) == ("good-dist", "1.2.3")
    assert (pm.records["broken"].distribution, pm.records["broken"].version) == ("broken-dist", "2.0")
    assert pm.records["good"].hooks == [] and pm.records["broken"].hooks == []


# ----------------------------------------------------------------- runtime hooks


@pytest.fixture
def raising_pm(fake_entry_points, entry_point):
    fake_entry_points(entry_point("raising", "raising_plugin", dist="raising-dist"))
    return get_plugin_manager()


def test_a_plugin_raising_in_flatness_terms_is_named(raising_pm):
    params, loss_fn = quadratic_problem()
    with pytest.raises(PluginHookError, match=r"'raising'.*flatness_terms.*step 7") as raised:
        FlatL2O(plugin_manager=raising_pm).flatness_terms(params, loss_fn, 7)
    assert isinstance(raised.value.__cause__, sys.modules["raising_plugin"].RaisingPluginFailure)
    assert "failed at step 7" in str(raised.value)


def test_a_plugin_raising_in_after_unroll_is_named(raising_pm):
    with pytest.raises(PluginHookError, match=r"'raising'.*after_unroll.*step 3") as raised:
        FlatL2O(plugin_manager=raising_pm).after_unroll(step=3, meta_loss=torch.tensor(0.0), logs={})
    assert isinstance(raised.value.__cause__, sys.modules["raising_plugin"].RaisingPluginFailure)


def test_a_failing_regularizer_is_named_with_its_plugin():
    class Exploding:
        @hookimpl
        def register_regularizers(self, register):
            def factory():
                def reg(params, loss_fn):
                    raise FloatingPointError("Hessian-vector product overflowed")
                return reg
            register(RegularizerInfo(name="exploding", factory=factory))

    pm = get_plugin_manager(entry_points=False, plugins=[("exploder", Exploding())])
    flat = FlatL2O({"exploding": {"weight": 1.0}}, plugin_manager=pm)
    params, loss_fn = quadratic_problem()
    with pytest.raises(PluginHookError) as raised:
        flat.flatness_terms(params, loss_fn, 2)
    assert isinstance(raised.value.__cause__, FloatingPointError)
    message = str(raised.value)
    assert "step 2" in message
    assert "'exploding'" in message and "'exploder'" in message, message


def test_a_term_name_returned_by_two_plugins_is_an_error():
    pm = get_plugin_manager(entry_points=False, plugins=[constant_terms_plugin("first", shared=1.0),
                                                         constant_terms_plugin("second", shared=2.0)])
    params, loss_fn = quadratic_problem()
    with pytest.raises(DuplicateComponentError, match=r"'shared'.*'first'.*'second'"):
        FlatL2O(plugin_manager=pm).flatness_terms(params, loss_fn, 0)


def test_a_plugin_term_may_not_shadow_an_active_regularizer(good):
    pm = get_plugin_manager(plugins=[constant_terms_plugin("shadow", l2_norm=1.0)])
    params, loss_fn = quadratic_problem()
    with pytest.raises(DuplicateComponentError, match=r"'l2_norm'.*'shadow'"):
        FlatL2O({"l2_norm": {}}, plugin_manager=pm).flatness_terms(params, loss_fn, 0)


def test_a_term_must_be_a_scalar_tensor():
    pm = get_plugin_manager(entry_points=False, builtins=False)

    class NotATensor:
        @hookimpl
        def flatness_terms(self):
            return {"bad": 0.5}

    pm.add_plugin(NotATensor(), "not_a_tensor")
    params, loss_fn = quadratic_problem()
    with pytest.raises(PluginHookError, match=r"'not_a_tensor'.*'bad'"):
        FlatL2O(plugin_manager=pm).flatness_terms(params, loss_fn, 0)


def test_the_penalty_is_the_sum_of_terms_whatever_the_registration_order(good):
    a, b = constant_terms_plugin("a_terms", a=0.25), constant_terms_plugin("b_terms", b=4.0, c=-1.5)
    params, loss_fn = quadratic_problem()
    results = []
    for plugins in ([a, b], [b, a]):
        flat = FlatL2O({"l2_norm": {"weight": 0.5}}, plugin_manager=get_plugin_manager(plugins=plugins))
        terms = flat.flatness_terms(params, loss_fn, 0)
        penalty = flat.penalty(params, loss_fn, 0)
        assert set(terms) == {"a", "b", "c", "l2_norm"}
        torch.testing.assert_close(penalty, sum(terms.values()))
        results.append(penalty)
    expected = 0.25 + 4.0 - 1.5 + 0.5 * squared_norm(params)
    torch.testing.assert_close(results[0], expected)
    assert torch.equal(results[0], results[1])
    (grad,) = torch.autograd.grad(results[0], params[0])
    torch.testing.assert_close(grad, params[0].detach())


def test_registration_order_cannot_change_the_penalty_even_by_rounding():
    # In float32, 1 + 1e8 - 1e8 is 0 or 1 depending on the order of summation.
    cancelling = constant_terms_plugin("cancelling", big=1e8, minus_big=-1e8)
    small = constant_terms_plugin("small", one=1.0)
    params, loss_fn = quadratic_problem()
    penalties = []
    for plugins in ([cancelling, small], [small, cancelling]):
        pm = get_plugin_manager(entry_points=False, plugins=plugins)
        penalties.append(FlatL2O(plugin_manager=pm).penalty(params, loss_fn, 0))
    assert torch.equal(penalties[0], penalties[1]), penalties


def test_a_zero_weight_computes_nothing(good_pm):
    params, loss_fn = quadratic_problem()
    flat = FlatL2O({"l2_norm": {"weight": 0.0}}, plugin_manager=good_pm)
    for step in range(3):
        assert flat.flatness_terms(params, loss_fn, step) == {}
        assert flat.penalty(params, loss_fn, step).item() == 0.0
        assert flat.optimizee_penalty(params, loss_fn, step) is None
    assert flat.active["l2_norm"].regularizer.calls == 0


# ----------------------------------------------------------------- schedules


def due_steps(pm, spec, steps, **trajectory):
    flat = FlatL2O({"l2_norm": spec}, plugin_manager=pm)
    return [t for t in steps if flat.due(t, **trajectory)]


@pytest.mark.parametrize(("spec", "expected"), [
    ({}, list(range(10))),
    ({"every": 3}, [0, 3, 6, 9]),
    ({"warmup": 4}, [5, 6, 7, 8, 9]),  # θ_1..θ_4, the first 4 updates, go unpenalized
    ({"start_fraction": 0.5}, [5, 6, 7, 8, 9]),
    ({"every": 2, "warmup": 3}, [4, 6, 8]),
])
def test_schedule_steps(good_pm, spec, expected):
    assert due_steps(good_pm, spec, range(10), horizon=10) == expected


def test_schedule_at_last_is_due_once_per_trajectory(good_pm):
    horizon = 6
    assert len(due_steps(good_pm, {"at": "last"}, range(horizon + 1), horizon=horizon)) == 1


def test_schedule_after_loss_drop(good_pm):
    flat = FlatL2O({"l2_norm": {"after_loss_drop": 0.1}}, plugin_manager=good_pm)
    assert not flat.due(5, loss=1.9, initial_loss=2.0)
    assert flat.due(5, loss=1.8, initial_loss=2.0)
    assert flat.due(5, loss=torch.tensor(0.5), initial_loss=2.0)


@pytest.mark.parametrize(("spec", "missing"), [
    ({"at": "last"}, "horizon"), ({"start_fraction": 0.5}, "horizon"), ({"after_loss_drop": 0.2}, "initial_loss"),
])
def test_a_schedule_needing_trajectory_information_says_what_the_host_must_pass(good_pm, spec, missing):
    params, loss_fn = quadratic_problem()
    flat = FlatL2O({"l2_norm": spec}, plugin_manager=good_pm)
    with pytest.raises(ConfigError, match=missing):
        flat.flatness_terms(params, loss_fn, 3, loss=loss_fn(params))


def test_regularizers_are_only_computed_when_due(good_pm):
    params, loss_fn = quadratic_problem()
    flat = FlatL2O({"l2_norm": {"every": 4, "warmup": 1}}, plugin_manager=good_pm)
    with_term = [t for t in range(12) if flat.flatness_terms(params, loss_fn, t)]
    assert with_term == [4, 8]
    assert flat.active["l2_norm"].regularizer.calls == 2


class ScalarQuadratic:
    """A functional optimizee: f(θ) = ½‖θ‖², batches unused."""

    name = "scalar_quadratic"

    def init_params(self, seed):
        return [torch.randn(3, generator=torch.Generator().manual_seed(seed))]

    def sample_batch(self, generator):
        return None

    def loss(self, params, batch):
        return 0.5 * (params[0] ** 2).sum()

    def evaluate(self, params, split="test"):
        return {"loss": float(self.loss(params, None)), "accuracy": 0.0}


class LearnedStepSize(nn.Module):
    """The smallest learned optimizer: θ ← θ - exp(φ)·g."""

    def __init__(self) -> None:
        super().__init__()
        self.log_lr = nn.Parameter(torch.tensor(-2.0))

    def init_state(self, params):
        return {}

    def step(self, params, grads, state):
        return [p - self.log_lr.exp() * g for p, g in zip(params, grads)], dict(state)


def test_at_last_applies_at_the_final_iterate_of_the_reference_host(good):
    seen: list[tuple[int, bool]] = []

    class Watcher:
        @hookimpl
        def flatness_terms(self, step, active):
            seen.append((step, "l2_norm" in active))

    pm = get_plugin_manager(plugins=[("watcher", Watcher())])
    flat = FlatL2O({"l2_norm": {"weight": 1.0, "at": "last"}}, plugin_manager=pm)
    trainer = MetaTrainer(LearnedStepSize(), lambda g: (ScalarQuadratic(), 0), flat=flat,
                          config=MetaTrainConfig(meta_steps=2, unroll=2, horizon=4, val_every=0))
    trainer.train()
    assert len(seen) == 4
    assert [active for _, active in seen] == [False, False, False, True], seen


# ----------------------------------------------------------------- weighting and mode


def test_scale_free_weighting_makes_the_term_weight_times_the_loss(good_pm):
    params, loss_fn = quadratic_problem()
    loss = loss_fn(params)
    grads = {}
    for scale in (1.0, 1000.0):
        flat = FlatL2O({"l2_norm": {"weight": 0.1, "weighting": "scale_free", "scale": scale}},
                       plugin_manager=good_pm)
        for step in range(3):
            term = flat.flatness_terms(params, loss_fn, step, loss=loss)["l2_norm"]
            torch.testing.assert_close(term, 0.1 * loss.detach())
        grads[scale] = torch.autograd.grad(term, params)
        # Without the host's loss it computes the loss itself.
        torch.testing.assert_close(flat.flatness_terms(params, loss_fn, 3)["l2_norm"], 0.1 * loss.detach())
    for small, large in zip(grads[1.0], grads[1000.0]):
        torch.testing.assert_close(small, large)
        assert small.abs().sum() > 0


def test_fixed_weighting_scales_with_the_regularizer(good_pm):
    params, loss_fn = quadratic_problem()
    terms = [FlatL2O({"l2_norm": {"weight": 0.1, "scale": s}}, plugin_manager=good_pm)
             .flatness_terms(params, loss_fn, 0)["l2_norm"] for s in (1.0, 1000.0)]
    torch.testing.assert_close(terms[1], 1000.0 * terms[0])


def test_optimizee_loss_mode_moves_the_regularizer_out_of_the_meta_loss(good_pm):
    params, loss_fn = quadratic_problem()
    flat = FlatL2O({"l2_norm": {"weight": 0.5, "mode": "optimizee_loss"}}, plugin_manager=good_pm)
    assert flat.flatness_terms(params, loss_fn, 0) == {}
    assert flat.penalty(params, loss_fn, 0).item() == 0.0
    torch.testing.assert_close(flat.optimizee_penalty(params, loss_fn, 0), 0.5 * squared_norm(params))

    meta = FlatL2O({"l2_norm": {"weight": 0.5}}, plugin_manager=good_pm)
    assert meta.optimizee_penalty(params, loss_fn, 0) is None
    assert list(meta.flatness_terms(params, loss_fn, 0)) == ["l2_norm"]


# ----------------------------------------------------------------- configuration errors


@pytest.mark.parametrize(("spec", "field"), [
    ({"every": -1}, "regularizers.l2_norm.every"),
    ({"every": 0}, "regularizers.l2_norm.every"),
    ({"every": 1.5}, "regularizers.l2_norm.every"),
    ({"at": "first"}, "regularizers.l2_norm.at"),
    ({"warmup": -2}, "regularizers.l2_norm.warmup"),
    ({"start_fraction": 1.5}, "regularizers.l2_norm.start_fraction"),
    ({"after_loss_drop": 1.0}, "regularizers.l2_norm.after_loss_drop"),
    ({"weight": "0.1"}, "regularizers.l2_norm.weight"),
    ({"weight": math.nan}, "regularizers.l2_norm.weight"),
    ({"weight": True}, "regularizers.l2_norm.weight"),
    ({"weighting": "adaptive"}, "regularizers.l2_norm.weighting"),
    ({"mode": "both"}, "regularizers.l2_norm.mode"),
    ({"scale_momentum": 1.0}, "regularizers.l2_norm.scale_momentum"),
    ({"no_such_option": 3}, "no_such_option"),
    ({"scale": -1.0}, "scale must be > 0"),
])
def test_bad_config_values_name_the_field(good_pm, spec, field):
    with pytest.raises(ConfigError) as raised:
        FlatL2O({"l2_norm": spec}, plugin_manager=good_pm)
    message = str(raised.value)
    assert field in message and "l2_norm" in message, message
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, FlatL2OError)


def test_an_unknown_estimator_option_names_the_providing_plugin(good):
    with pytest.raises(ConfigError, match=r"'l2_norm'.*'good'.*no_such_option"):
        create_regularizer("l2_norm", no_such_option=1)


def test_a_regularizer_config_must_be_a_table(good_pm):
    with pytest.raises(ConfigError, match=r"regularizers\.l2_norm"):
        FlatL2O({"l2_norm": 0.1}, plugin_manager=good_pm)  # type: ignore[dict-item]


def test_schedule_validates_its_own_fields():
    with pytest.raises(ConfigError, match="every"):
        Schedule(every=0)
    assert Schedule() == Schedule(every=1, at="all", warmup=0, start_fraction=0.0, after_loss_drop=0.0)


# ----------------------------------------------------------------- tracing


def _run_every_hook(pm):
    pm.components
    params, loss_fn = quadratic_problem()
    flat = FlatL2O({"l2_norm": {}}, plugin_manager=pm)
    flat.flatness_terms(params, loss_fn, 0)
    flat.after_unroll(step=0, meta_loss=torch.tensor(0.0), logs={})


def test_trace_hooks_logs_every_hook_call(good, monkeypatch, caplog):
    monkeypatch.setenv("FLAT_L2O_TRACE_HOOKS", "1")
    caplog.set_level(logging.INFO, logger="flat_l2o_plugin.hooks")
    _run_every_hook(get_plugin_manager())
    messages = [r.getMessage() for r in caplog.records if r.name == "flat_l2o_plugin.hooks"]
    for hook, plugin in [("register_regularizers", "good"), ("register_regularizers", "builtin"),
                         ("flatness_terms", "flat_l2o.active_regularizers"), ("after_unroll", "good")]:
        assert any(hook in m and plugin in m for m in messages), (hook, plugin, messages)


def test_hooks_are_not_traced_by_default(good, caplog):
    caplog.set_level(logging.DEBUG, logger="flat_l2o_plugin.hooks")
    _run_every_hook(get_plugin_manager())
    assert [r for r in caplog.records if r.name == "flat_l2o_plugin.hooks"] == []
