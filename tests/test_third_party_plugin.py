"""A real third-party distribution, installed with pip, works with no change to the host.

``tests/plugins/example_dist`` is the package a plugin author would publish: it uses only
``hookimpl`` and ``RegularizerInfo``. It is installed into a temporary directory and
exercised from a fresh interpreter, so discovery goes through real distribution metadata.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EXAMPLE_DIST = Path(__file__).parent / "plugins" / "example_dist"
REPO_ROOT = Path(__file__).resolve().parents[1]

HOST_SCRIPT = textwrap.dedent("""
    import copy
    import json
    import os

    import torch

    from flat_l2o_plugin import (FlatL2O, create_optimizer, create_regularizer, create_task,
                                 get_plugin_manager, list_regularizers)
    from flat_l2o_plugin.errors import UnknownComponentError
    from flat_l2o_plugin.training import MetaTrainConfig, MetaTrainer

    report = {}

    pm = get_plugin_manager(strict=True)
    pm.components
    report["record"] = pm.records["example"].as_dict()
    report["listed"] = "param_norm" in list_regularizers()

    reg = create_regularizer("param_norm")
    theta = [torch.tensor([3.0, 4.0], requires_grad=True)]
    value = reg(theta, lambda ps: ps[0].sum())
    (grad,) = torch.autograd.grad(value, theta)
    report["value"], report["grad"] = float(value), grad.tolist()

    torch.manual_seed(0)
    base = create_optimizer("rnnprop")
    task = create_task("mlp_digits")

    def meta_step(regularizers):
        optimizer = copy.deepcopy(base)
        before = [p.detach().clone() for p in optimizer.parameters()]
        trainer = MetaTrainer(optimizer, lambda generator: (task, 0), flat=FlatL2O(regularizers),
                              config=MetaTrainConfig(meta_steps=1, unroll=2, horizon=2, val_every=0))
        (logs,) = trainer.train().history
        delta = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(optimizer.parameters(), before)])
        grad = torch.cat([p.grad.reshape(-1) for p in optimizer.parameters()])
        return {k: v for k, v in logs.items() if isinstance(v, (int, float, bool))}, delta, grad

    logs_with, delta_with, grad_with = meta_step({"param_norm": {"weight": 1.0}})
    logs_without, delta_without, grad_without = meta_step({})
    report["logs_with"], report["logs_without"] = logs_with, logs_without
    report["delta_moved"] = bool(delta_with.abs().max() > 0)
    report["delta_differs"] = not torch.allclose(delta_with, delta_without)
    report["grad_cosine"] = float(torch.nn.functional.cosine_similarity(grad_with, grad_without, dim=0))

    os.environ["FLAT_L2O_DISABLE_PLUGINS"] = "Flat_L2O.Example-Plugin"
    disabled = get_plugin_manager()
    report["disabled_status"] = disabled.records["example"].status
    try:
        create_regularizer("param_norm")
        report["disabled_error"] = None
    except UnknownComponentError as exc:
        report["disabled_error"] = str(exc)

    print("REPORT " + json.dumps(report))
""")


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory) -> Path:
    """The example distribution pip-installed into a fresh target directory."""
    work = tmp_path_factory.mktemp("example_dist")
    source = work / "src"
    shutil.copytree(EXAMPLE_DIST, source)  # building in place would leave build/ in the tests tree
    target = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "--target", str(target), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    assert list(target.glob("flat_l2o_example_plugin-0.2.0.dist-info"))
    return target


@pytest.fixture(scope="module")
def host_report(installed_example: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAT_L2O_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(installed_example), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    done = subprocess.run([sys.executable, "-c", HOST_SCRIPT], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("REPORT ")]
    return json.loads(line.removeprefix("REPORT "))


def test_the_installed_plugin_is_discovered_with_its_distribution(host_report):
    record = host_report["record"]
    assert record["status"] == "loaded" and record["error"] is None
    assert (record["distribution"], record["version"]) == ("flat-l2o-example-plugin", "0.2.0")
    assert record["value"] == "flat_l2o_example_plugin"
    assert record["hooks"] == ["register_regularizers"]
    assert record["components"] == {"regularizers": ["param_norm"]}
    assert host_report["listed"]


def test_its_regularizer_is_created_by_name(host_report):
    assert host_report["value"] == pytest.approx(5.0)
    assert host_report["grad"] == pytest.approx([0.6, 0.8])


def test_installing_changes_nothing_until_configuration_activates_it(host_report):
    assert not any(key.startswith("term/") for key in host_report["logs_without"])
    assert "param_norm/value" not in host_report["logs_without"]


def test_activated_it_enters_meta_training(host_report):
    logs_with, logs_without = host_report["logs_with"], host_report["logs_without"]
    assert logs_with["term/param_norm"] > 0
    assert logs_with["skipped"] is False and logs_without["skipped"] is False
    assert logs_with["meta_loss"] > logs_without["meta_loss"]
    assert host_report["delta_moved"]
    assert host_report["delta_differs"], "the regularizer did not change the learned optimizer's update"
    assert host_report["grad_cosine"] < 0.999


def test_it_can_be_disabled_by_its_pip_name(host_report):
    assert host_report["disabled_status"] == "disabled"
    assert host_report["disabled_error"] is not None and "param_norm" in host_report["disabled_error"]
