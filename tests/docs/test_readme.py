"""The README's Python blocks run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


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
