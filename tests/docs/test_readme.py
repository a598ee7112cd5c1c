"""The README's Python blocks run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    # A fresh interpreter per block, as a reader would run it: blocks register things in
    # process-wide registries (timm's) that must not leak into other tests.
    result = subprocess.run([sys.executable, "-c", BLOCKS[index]], capture_output=True, text=True, timeout=300,
                            env={k: v for k, v in os.environ.items() if not k.startswith("FLAT_L2O_")})
    assert result.returncode == 0, f"README python block {index} failed:\n{result.stderr}"


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in README.read_text()


def test_readme_plugin_example_is_a_working_plugin():
    import types

    from flat_l2o_plugin.testing import check_regularizer, isolated_plugin_manager

    (source,) = [b for b in BLOCKS if "register_regularizers" in b]
    module = types.ModuleType("readme_plugin")
    exec(compile(source, "README.md[plugin]", "exec"), module.__dict__)
    check_regularizer("gradient_norm", plugin_manager=isolated_plugin_manager(module))


def test_readme_run_config_is_valid(tmp_path):
    from flat_l2o_plugin.config import load_config, validate_components

    (block,) = [b for b in re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.S) if "[trainer]" in b]
    path = tmp_path / "run.toml"
    path.write_text(block)
    config = load_config(path, environ={})
    validate_components(config)
    assert config.regularizers["hessian_top_eigenvalue"]["weight"] == 0.1


def test_readme_retrofit_config_is_the_examples_and_is_valid(tmp_path):
    from flat_l2o_plugin.config import load_config, validate_components

    (block,) = [b for b in re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.S) if "module = " in b]
    folder = README.parent / "examples" / "retrofit_l2o_dm_port"
    path = tmp_path / "meta_train.toml"
    path.write_text(block)
    shown = load_config(path, environ={}, overrides=[f"optimizer.python_path=['{folder}']"])
    validate_components(shown)
    example = load_config(folder / "meta_train.toml", environ={})
    assert shown.optimizer == example.optimizer
    assert (shown.wrappers, shown.regularizers, shown.task) == (example.wrappers, example.regularizers, example.task)


def test_readme_gives_the_lr_rule_the_warning_quotes():
    from flat_l2o_plugin.integrations.torch_optim import LR_RULE

    prose = " ".join(README.read_text().replace("`", "").split())
    assert " ".join(LR_RULE.split()) in prose


def test_readme_executor_table_is_a_valid_regime_executor(tmp_path):
    import tomllib

    pytest.importorskip("submitit")
    from flat_l2o_plugin.study.executors import SlurmExecutor, executor_spec

    (block,) = [b for b in re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.S) if "[executor]" in b]
    spec = executor_spec(tomllib.loads(block)["executor"])
    assert spec.use.startswith("slurm:")
    # submitit accepts its parameters (checked against its SLURM executor even when running locally).
    SlurmExecutor(tmp_path, cluster="local", parameters=spec.slurm).start()


def test_readme_dependency_table_names_every_extra():
    import tomllib

    extras = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    section = README.read_text().split("## Install, extras and dependencies", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"^\|[^|]+\| `([a-z0-9]+)` \|", section, flags=re.M))
    # "all" is a set of the others, not a package of its own.
    assert set(extras) - {"all"} <= named, sorted(set(extras) - {"all"} - named)
