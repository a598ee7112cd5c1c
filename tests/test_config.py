"""The typed configuration: sources, precedence, validation errors, and a fuzzed loader."""

from __future__ import annotations

import json
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flat_l2o_plugin.config import (
    Config, ConfigValueError, UnknownKeyError, config_from_dict, load_config, parse_override, provenance,
    validate_components,
)
from flat_l2o_plugin.errors import ConfigError, FlatL2OError, UnknownComponentError

TOML = textwrap.dedent("""
    run_dir = "from-file"
    [optimizer]
    name = "l2o_dm"
    [task.options]
    activation = "relu"
    [regularizers.hessian_top_eigenvalue]
    weight = 0.1
    start_fraction = 0.5
    [trainer]
    meta_steps = 7
    seed = 3
""")


def test_defaults():
    config = load_config(environ={})
    assert config.optimizer.name == "rnnprop" and config.task.name == "mlp_digits"
    assert config.regularizers == {} and config.trainer.meta_steps > 0


def test_toml_yaml_json_and_pyproject_give_the_same_config(tmp_path):
    (tmp_path / "run.toml").write_text(TOML)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'host'\n" + TOML.replace("\n[", "\n[tool.flat_l2o.")
                                             .replace('run_dir = "from-file"', '[tool.flat_l2o]\nrun_dir = "from-file"'))
    from_toml = load_config(tmp_path / "run.toml", environ={})
    (tmp_path / "run.json").write_text(json.dumps(from_toml.as_dict()))
    import yaml

    (tmp_path / "run.yaml").write_text(yaml.safe_dump(from_toml.as_dict()))
    for name in ("pyproject.toml", "run.json", "run.yaml"):
        assert load_config(tmp_path / name, environ={}) == from_toml, name
    assert load_config(from_toml.as_dict(), environ={}) == from_toml
    assert from_toml.optimizer.name == "l2o_dm" and from_toml.task.options == {"activation": "relu"}
    assert from_toml.trainer.meta_steps == 7 and from_toml.run_dir == "from-file"


def test_precedence_defaults_file_env_overrides(tmp_path):
    (tmp_path / "run.toml").write_text(TOML)
    env = {"FLAT_L2O_RUN_DIR": "from-env", "FLAT_L2O_SEED": "11"}
    config = load_config(tmp_path / "run.toml", environ=env)
    assert config.run_dir == "from-env" and config.trainer.seed == 11 and config.trainer.meta_steps == 7
    config = load_config(tmp_path / "run.toml", environ=env,
                         overrides=["run_dir=from-cli", "trainer.seed=5", "regularizers.sharpness.rho=0.1"])
    assert config.run_dir == "from-cli" and config.trainer.seed == 5
    assert config.regularizers["sharpness"] == {"rho": 0.1}
    assert config.regularizers["hessian_top_eigenvalue"]["weight"] == 0.1  # merged, not replaced


def test_override_values_parse_as_toml_literals():
    assert parse_override("trainer.meta_steps=100") == (["trainer", "meta_steps"], 100)
    assert parse_override("trainer.curriculum=[20, 40]") == (["trainer", "curriculum"], [20, 40])
    assert parse_override("optimizer.name=l2o_dm") == (["optimizer", "name"], "l2o_dm")
    assert parse_override("plugins.strict=true") == (["plugins", "strict"], True)
    assert load_config(overrides=["trainer.curriculum=[20, 40]", "trainer.unroll=20"],
                       environ={}).trainer.curriculum == (20, 40)
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("trainer.meta_steps")


@pytest.mark.parametrize("data, error, message", [
    ({"trainer": {"meta_step": 3}}, UnknownKeyError, r"'trainer\.meta_step'.*did you mean 'meta_steps'"),
    ({"optimiser": {}}, UnknownKeyError, r"'optimiser'.*did you mean 'optimizer'"),
    ({"wrappers": [{"nam": "x"}]}, UnknownKeyError, r"'wrappers\[0\]\.nam'.*did you mean 'name'"),
    ({"trainer": {"meta_steps": "x"}}, ConfigValueError, r"trainer\.meta_steps must be an integer, got 'x'"),
    ({"trainer": {"unroll": 0}}, ConfigValueError, r"trainer\.unroll must be an integer >= 1, got 0"),
    ({"trainer": {"meta_lr": float("nan")}}, ConfigValueError, r"trainer\.meta_lr must be a finite number"),
    ({"plugins": {"load": "abc"}}, ConfigValueError, r"plugins\.load must be a list"),
    ({"run_dir": 3}, ConfigValueError, r"run_dir must be a string, got 3"),
    ({"regularizers": {"hessian_top_eigenvalue": 0.1}}, ConfigValueError, r"regularizers\.hessian_top_eigenvalue"),
    ([], ConfigValueError, r"must be a table"),
])
def test_errors_name_the_field_and_value(data, error, message):
    with pytest.raises(error, match=message):
        config_from_dict(data)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[trainer\nmeta_steps = 1")
    with pytest.raises(ConfigError, match="bad.toml.*could not be parsed"):
        load_config(bad, environ={})
    (tmp_path / "pyproject.toml").write_text("[project]\nname='x'\n")
    with pytest.raises(ConfigError, match=r"no \[tool.flat_l2o\] table"):
        load_config(tmp_path / "pyproject.toml", environ={})


def test_unknown_component_lists_available_and_failed_plugins(monkeypatch, fake_entry_points, entry_point):
    fake_entry_points(entry_point("broken", "broken_plugin", dist="flat-l2o-broken"))
    with pytest.warns(UserWarning):
        config = load_config({"optimizer": {"name": "rnnprp"}}, environ={})
        with pytest.raises(UnknownComponentError) as info:
            validate_components(config)
    message = str(info.value)
    assert "optimizer.name" in message and "did you mean 'rnnprop'" in message
    assert "l2o_dm" in message and "broken" in message


def test_component_of_a_disabled_plugin_names_the_variable(monkeypatch):
    from flat_l2o_plugin.errors import DisabledComponentError

    monkeypatch.setenv("FLAT_L2O_DISABLE_PLUGINS", "builtin")
    config = load_config({"regularizers": {"hessian_top_eigenvalue": {"weight": 0.1}}})
    with pytest.raises(DisabledComponentError, match=r"optimizer.*'rnnprop'.*'builtin'.*FLAT_L2O_DISABLE_PLUGINS"):
        validate_components(config)
    monkeypatch.delenv("FLAT_L2O_DISABLE_PLUGINS")
    config = load_config({"plugins": {"disable": ["builtin"]}}, environ={})
    with pytest.raises(DisabledComponentError, match=r"config \[plugins\]\.disable"):
        validate_components(config)


def test_plugins_table_and_environment(monkeypatch):
    config = load_config({"plugins": {"disable": ["builtin"]}}, environ={})
    assert config.plugin_manager().disabled == {"builtin": "config [plugins].disable"}
    monkeypatch.setenv("FLAT_L2O_LOAD_PLUGINS", "")
    pm = load_config({"plugins": {"load": ["something"]}}, environ={}).plugin_manager()
    assert "builtin" in pm.loaded_plugins()  # the allow-list governs third-party plugins only


def test_estimator_options_are_checked_with_a_suggestion():
    config = load_config({"regularizers": {"hessian_top_eigenvalue": {"iterz": 3}}}, environ={})
    with pytest.raises(ConfigError, match=r"regularizers.*no option 'iterz'.*did you mean 'iters'"):
        validate_components(config)
    config = load_config({"optimizer": {"options": {"hidden": 3}}}, environ={})
    with pytest.raises(ConfigError, match=r"optimizer\.options.*did you mean 'hidden_size'"):
        validate_components(config)
    validate_components(load_config(TOML_DICT := {"regularizers": {"sharpness": {"weight": 0.1}}}, environ={}))
    assert TOML_DICT


def test_wrapper_options_have_one_spelling_and_are_checked_with_a_suggestion(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[[wrappers]]\nname = "flatness_aware"\nhorizon = 4\n'
                    '[wrappers.regularizers.sharpness]\nweight = 0.1\n')
    config = load_config(path, environ={})
    # The table of a file is the entry wrap() takes: name and options side by side.
    assert config.wrappers == [{"name": "flatness_aware", "horizon": 4, "regularizers": {"sharpness": {"weight": 0.1}}}]
    validate_components(config)
    config = load_config({"wrappers": [{"name": "flatness_aware", "horizn": 4}]}, environ={})
    with pytest.raises(ConfigError, match=r"wrappers\[0\] \('flatness_aware', from plugin 'builtin'\): wrapper "
                                          r"'flatness_aware' has no option 'horizn' \(did you mean 'horizon'\?\); "
                                          r"its options: regularizers, plugin_manager, horizon"):
        validate_components(config)
    config = load_config({"wrappers": [{"name": "sam_gradient", "options": {"rho": 0.1}}]}, environ={})
    with pytest.raises(ConfigError, match=r"no option 'options'.*written flat in its entry"):
        validate_components(config)
    with pytest.raises(ConfigError, match=r"wrappers\[0\].name is missing"):
        load_config({"wrappers": [{"rho": 0.1}]}, environ={})


def test_provenance_records_versions_and_plugins():
    from flat_l2o_plugin import get_plugin_manager

    info = provenance(get_plugin_manager())
    assert {"python", "torch", "pluggy", "timm", "learn2learn", "flat-l2o-plugin"} <= set(info)
    assert info["torch"] and info["plugins"]["builtin"]["status"] == "loaded"


def test_config_round_trips_through_plain_data():
    config = load_config(overrides=["trainer.curriculum=[20, 40]", "wrappers=[{name='flatness_aware'}]"], environ={})
    assert config_from_dict(json.loads(json.dumps(config.as_dict()))) == config
    assert isinstance(config, Config) and config.wrappers == [{"name": "flatness_aware"}]


# ---------------------------------------------------------------------------- fuzzing

_KEYS = ["optimizer", "task", "regularizers", "wrappers", "trainer", "plugins", "run_dir", "val_tasks", "name",
         "options", "meta_steps", "unroll", "horizon", "seed", "load", "disable", "strict", "weight", "curriculum",
         "meta_lr", "hessian_top_eigenvalue", "x"]
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=8))
_values = st.recursive(_scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.one_of(st.sampled_from(_KEYS), st.text(max_size=6)), children,
                                                    max_size=5)), max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_KEYS), _values, max_size=6))
def test_fuzzed_dicts_give_a_config_or_a_config_error(data):
    try:
        config = load_config(data, environ={})
    except FlatL2OError:
        return
    assert isinstance(config, Config)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=4))
def test_fuzzed_overrides_give_a_config_or_a_config_error(overrides):
    try:
        config = load_config(overrides=overrides, environ={})
    except FlatL2OError:
        return
    assert isinstance(config, Config)
