"""A third-party distribution shipping its own pre-trained optimizer, installed with pip.

``tests/plugins/pretrained_dist`` registers ``example-tiny`` through the entry point with
``PretrainedInfo`` only. Its weights and their digest are written into a copy of the
source, which is pip-installed into a target directory; fresh interpreters then use it
as a user would. A second copy of the installed tree gets its weights file changed
after installation: that plugin's optimizer is refused with one line naming the file
and the plugin, and everything else keeps working.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

DIST = Path(__file__).parent / "plugins" / "pretrained_dist"
REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "flat_l2o_pretrained_example"

HOST = textwrap.dedent("""
    import json, os, sys, warnings
    import torch
    from flat_l2o_plugin import get_plugin_manager, list_pretrained
    from flat_l2o_plugin.errors import FlatL2OError
    from flat_l2o_plugin.integrations.torch_optim import LearnedOptimizerTorch

    report = {"listed": list_pretrained()}

    def train(name):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 1)
        x = torch.randn(64, 8)
        y = x @ torch.randn(8, 1)  # a linear teacher: the loss can reach 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = LearnedOptimizerTorch(model.parameters(), name)
        losses = []
        def closure():  # sam_gradient re-evaluates the batch at its perturbed point
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        for _ in range(40):
            losses.append(float(opt.step(closure).detach()))
        return {"first": losses[0], "last": losses[-1], "warnings": [str(w.message) for w in caught],
                "identity": opt.state_dict()["learned_optimizer"]["pretrained"]}

    for name in sys.argv[1:]:
        try:
            report[name] = train(name)
        except FlatL2OError as exc:
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
    print("REPORT " + json.dumps(report))
""")


def _make_weights(folder: Path) -> str:
    """Write the plugin's weights (an untrained learned_correction, seeded) and return their SHA-256."""
    code = textwrap.dedent(f"""
        import torch
        from flat_l2o_plugin import create_optimizer
        from flat_l2o_plugin.optimizers.weights import save_learned_optimizer
        torch.manual_seed(0)
        opt = create_optimizer("learned_correction", base="adam", lr=0.05)
        save_learned_optimizer({str(folder / 'tiny.safetensors')!r}, opt, name="learned_correction",
                               options={{"base": "adam", "lr": 0.05}})
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, timeout=300, env=_env())
    return hashlib.sha256((folder / "tiny.safetensors").read_bytes()).hexdigest()


def _env(extra: Path | None = None, **variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAT_L2O_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra) if extra else None, str(REPO_ROOT),
                                                       env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(variables)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("pretrained_dist")
    source = work / "src"
    shutil.copytree(DIST, source)
    digest = _make_weights(source / PACKAGE)
    (source / PACKAGE / "manifest.json").write_text(json.dumps({"sha256": digest}))
    target = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--disable-pip-version-check", "--target", str(target), str(source)],
                   check=True, capture_output=True, text=True, timeout=300)
    assert list(target.glob("flat_l2o_pretrained_example-0.1.0.dist-info"))
    assert (target / PACKAGE / "tiny.safetensors").is_file()
    return target


@pytest.fixture(scope="module")
def damaged(installed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The installed tree with one byte of the plugin's weights changed (a damaged or tampered install)."""
    target = tmp_path_factory.mktemp("damaged") / "site"
    shutil.copytree(installed, target)
    weights = target / PACKAGE / "tiny.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # inside the last tensor: the file still parses, its digest does not match
    weights.write_bytes(bytes(data))
    return target


def _host(site: Path, *names: str, **variables: str) -> dict:
    done = subprocess.run([sys.executable, "-c", HOST, *names], cwd=site.parent, env=_env(site, **variables),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("REPORT ")]
    return json.loads(line.removeprefix("REPORT "))


def _cli(site: Path, *args: str, **variables: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flat_l2o_plugin", *args], cwd=site.parent,
                          env=_env(site, **variables), capture_output=True, text=True, timeout=300)


def test_installed_pretrained_optimizer_is_listed_loads_and_trains(installed: Path) -> None:
    report = _host(installed, "example-tiny", "l2o-correction-adam")
    assert "example-tiny" in report["listed"] and "l2o-correction-adam" in report["listed"]
    tiny = report["example-tiny"]
    assert "error" not in tiny, tiny
    assert tiny["warnings"] == []  # shipped weights: no "untrained" warning
    assert tiny["last"] < 0.5 * tiny["first"]
    assert tiny["identity"] == {"name": "example-tiny", "version": "0.1"}
    assert "error" not in report["l2o-correction-adam"]

    listed = _cli(installed, "list", "pretrained", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["example-tiny"]["plugin"] == "pretrained_example" and rows["example-tiny"]["status"] == "ok"
    assert rows["example-tiny"]["license"] == "Apache-2.0"
    assert rows["example-tiny"]["card"]["summary"]["meta-trained on"].startswith("nothing")


def test_installed_pretrained_optimizer_is_disabled_by_the_plugin_controls(installed: Path) -> None:
    report = _host(installed, "example-tiny", "l2o-correction-adam",
                   FLAT_L2O_DISABLE_PLUGINS="flat-l2o-pretrained-example")
    assert "example-tiny" not in report["listed"]
    assert report["example-tiny"]["error"].startswith("UnknownComponentError")
    assert "pretrained_example (by FLAT_L2O_DISABLE_PLUGINS)" in report["example-tiny"]["error"]
    assert "error" not in report["l2o-correction-adam"]


def test_a_weights_file_that_does_not_match_its_digest_is_refused_and_the_rest_keep_working(damaged: Path) -> None:
    report = _host(damaged, "example-tiny", "l2o-correction-adam", "l2o-correction-sam")
    error = report["example-tiny"]["error"]
    assert error.startswith("PretrainedWeightsError") and "\n" not in error
    assert str(damaged / PACKAGE / "tiny.safetensors") in error and "'pretrained_example'" in error
    assert "SHA-256" in error
    assert "error" not in report["l2o-correction-adam"] and "error" not in report["l2o-correction-sam"]

    listed = _cli(damaged, "list", "pretrained")
    assert listed.returncode == 0, listed.stderr
    assert "refused: pretrained optimizer 'example-tiny' from plugin 'pretrained_example'" in listed.stdout
    assert "l2o-correction-adam" in listed.stdout
