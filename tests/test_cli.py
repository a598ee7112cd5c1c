"""The real ``flat-l2o`` command in a subprocess, including the error paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def flat_l2o(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FLAT_L2O_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "flat_l2o_plugin", *args], capture_output=True, text=True,
                          env=full_env, timeout=300)


def test_list_regularizers_names_and_describes_them():
    out = flat_l2o("list", "regularizers")
    assert out.returncode == 0, out.stderr
    names = [line.split()[0] for line in out.stdout.splitlines()]
    assert {"hessian_top_eigenvalue", "hessian_trace", "local_entropy", "sharpness"} <= set(names)
    assert "Hessian" in out.stdout


def test_plugins_json_lists_the_builtin_plugin_with_its_components():
    out = flat_l2o("plugins", "--json")
    assert out.returncode == 0, out.stderr
    records = {r["name"]: r for r in json.loads(out.stdout)}
    builtin = records["builtin"]
    assert builtin["status"] == "loaded" and builtin["distribution"] == "flat-l2o-plugin"
    assert "register_regularizers" in builtin["hooks"]
    assert "hessian_top_eigenvalue" in builtin["components"]["regularizers"]
    assert "rnnprop" in builtin["components"]["optimizers"]


def test_disabled_builtin_shows_with_all_and_the_variable_that_disabled_it():
    out = flat_l2o("plugins", "--all", "--json", env={"FLAT_L2O_DISABLE_PLUGINS": "builtin"})
    records = {r["name"]: r for r in json.loads(out.stdout)}
    assert records["builtin"]["status"] == "disabled"
    assert records["builtin"]["disabled_by"] == "FLAT_L2O_DISABLE_PLUGINS"
    assert flat_l2o("list", "regularizers", env={"FLAT_L2O_DISABLE_PLUGINS": "builtin"}).stdout == ""


@pytest.mark.parametrize("args", [("list", "bogus"), ("frobnicate",), ()])
def test_usage_errors_exit_2(args):
    out = flat_l2o(*args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr


def test_every_verb_has_help_with_examples():
    for verb in ("plugins", "list", "demo"):
        out = flat_l2o(verb, "--help")
        assert out.returncode == 0 and "examples:" in out.stdout


def test_demo_quick_prints_the_table_and_writes_its_outputs(tmp_path):
    out = flat_l2o("demo", "--quick", "--workers", "1", "--no-progress", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "test acc" in out.stdout and "rnnprop+hessian" in out.stdout and "adam" in out.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["table"]
    assert {r["task"] for r in rows} == {"mlp_sigmoid_unseen_seeds", "mlp_relu", "mlp_deeper"}
    assert len(rows) == 9
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows)
    assert results["alpha"] in results["config"]["alphas"]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert (tmp_path / "table.txt").read_text().strip() in out.stdout
