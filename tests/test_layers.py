"""Layers depend downward: contract -> manager -> host facade -> trainer; tasks and estimators know no trainer.

Every import counts, including those inside functions and under ``TYPE_CHECKING``: a
type-only import still ties the lower layer to the upper one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flat_l2o_plugin"

CONTRACT = ("errors", "protocols", "registry", "hookspecs", "activation")
ABOVE_THE_CONTRACT = ("manager", "host", "builtin", "config", "cli", "demo", "training", "tasks", "optimizers",
                      "regularizers", "wrappers", "integrations", "diagnostics", "testing")
COMPONENTS = ("builtin", "regularizers", "optimizers", "wrappers", "tasks", "integrations", "diagnostics")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every ``flat_l2o_plugin`` module ``path`` imports, as dotted names relative to the package."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name.removeprefix("flat_l2o_plugin.") for name in found if name.startswith("flat_l2o_plugin.")}


def _sources(*names: str) -> list[Path]:
    paths = []
    for name in names:
        if (PACKAGE / name).is_dir():
            paths += sorted((PACKAGE / name).rglob("*.py"))
        else:
            paths.append(PACKAGE / f"{name}.py")
    return paths


def _offending(paths: list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    out = {}
    for path in paths:
        bad = sorted(i for i in imports_of(path) if i.split(".")[0] in forbidden)
        if bad:
            out[str(path.relative_to(PACKAGE))] = bad
    return out


def test_the_import_scanner_sees_relative_type_only_and_function_level_imports():
    assert {"host", "host.FlatL2O"} <= imports_of(PACKAGE / "training" / "meta_trainer.py")
    assert "training.runner" in imports_of(PACKAGE / "training" / "__init__.py")  # inside a function


@pytest.mark.parametrize("module", CONTRACT)
def test_the_contract_depends_on_nothing_above_it(module):
    assert _offending(_sources(module), ABOVE_THE_CONTRACT) == {}


def test_the_plugin_loader_knows_no_component():
    assert _offending(_sources("manager", "registry"), COMPONENTS) == {}


@pytest.mark.parametrize("layer", ["tasks", "regularizers", "optimizers", "diagnostics"])
def test_tasks_estimators_and_models_know_no_trainer(layer):
    assert _offending(_sources(layer), ("training", "cli", "config", "demo")) == {}


def test_the_meta_training_loop_fits_on_a_screen():
    # The checkpoint side lives in training/trainer_checkpoint.py; the loop stays readable.
    import inspect

    from flat_l2o_plugin.training.meta_trainer import MetaTrainer

    assert len(inspect.getsource(MetaTrainer.train).splitlines()) <= 60
    assert len(inspect.getsource(MetaTrainer).splitlines()) <= 480  # it was 590 lines with the checkpoint side
    checkpoint_side = {"_capture", "_save", "_read_checkpoint", "_restore", "_check_compatible", "_restore_state",
                       "_export_trajectory", "_import_trajectory"}
    assert checkpoint_side.isdisjoint(vars(MetaTrainer))
