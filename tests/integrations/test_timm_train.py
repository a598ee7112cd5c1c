"""timm's train.py, unchanged, with a learned optimizer chosen by ``--opt``.

The script is ``timm_train_flow.py``, which builds its optimizer, scheduler,
checkpoints and resumption exactly as ``train.py`` does; it runs in a subprocess, as
``train.py`` would, through both routes: ``--device-modules`` and the launcher.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flat_l2o_plugin import create_optimizer
from flat_l2o_plugin.integrations.torch_optim import LR_RULE
from flat_l2o_plugin.optimizers.weights import save_learned_optimizer

pytestmark = pytest.mark.integration  # runs the script in subprocesses

FLOW = Path(__file__).with_name("timm_train_flow.py")
ROOT = Path(__file__).resolve().parents[2]
REGISTER = "flat_l2o_plugin.integrations.timm_train"
# A real timm architecture shrunk to 26k parameters, so that each run takes seconds.
TINY_MODEL = ["--model", "convnext_atto", "--model-kwargs", "dims=(8,16,24,32)", "depths=(1,1,1,1)"]


def _run(args: list[str], cwd: Path, *, launcher: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    prefix = ["-m", REGISTER] if launcher else []
    return subprocess.run([sys.executable, *prefix, str(FLOW), *TINY_MODEL, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _result(done: subprocess.CompletedProcess[str]) -> dict:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_train_py_flow_with_lookahead_derived_lr_checkpoints_and_resume(weights: Path, tmp_path: Path) -> None:
    # train.py's defaults: no --lr, so lr = 0.1 * batch / 256, a learning rate for SGD.
    # 7 steps an epoch: Lookahead (k=6) syncs inside each epoch, so the epoch-0
    # checkpoint holds its slow weights next to the learned optimizer's state.
    common = ["--opt", "lookahead_l2o-rnnprop", "--opt-kwargs", f"weights={weights}", "-b", "8",
              "--warmup-epochs", "0", "--steps-per-epoch", "7"]
    straight = _run(["--device-modules", REGISTER, *common, "--epochs", "2", "--output", "straight"], tmp_path)
    result = _result(straight)
    assert result["optimizer"] == "Lookahead" and result["lr"] == 0.1 * 8 / 256
    assert [e["epoch"] for e in result["epochs"]] == [0, 1]
    assert "StepMultiplierWarning" in straight.stderr and "lr=0.003125" in straight.stderr
    assert LR_RULE in straight.stderr

    # Interrupted after one epoch (the launcher route), resumed (the import route).
    _result(_run([*common, "--epochs", "1", "--output", "first"], tmp_path, launcher=True))
    checkpoint = tmp_path / "first" / "last.pth.tar"
    resumed = _result(_run(["--device-modules", REGISTER, *common, "--epochs", "2", "--output", "second",
                            "--resume", str(checkpoint)], tmp_path))
    assert resumed["epochs"] == result["epochs"][1:]
    assert resumed["params_sha256"] == result["params_sha256"]
    saved = torch.load(checkpoint, weights_only=False)["optimizer"]
    assert saved["learned_optimizer"]["optimizer"] == "rnnprop"
    assert all("lookahead_slow_buff" in s and "lstm_h_0" in s for s in saved["state"].values())

    # Resuming with other weights is refused, with what to do instead.
    torch.manual_seed(1)
    other = save_learned_optimizer(tmp_path / "other.safetensors", create_optimizer("rnnprop"), name="rnnprop")
    refused = _run(["--opt", "l2o-rnnprop", "--opt-kwargs", f"weights={other}", "--epochs", "2",
                    "--steps-per-epoch", "7", "--output", "again", "--resume", str(checkpoint)],
                   tmp_path, launcher=True)
    assert refused.returncode != 0
    last = refused.stderr.strip().splitlines()[-1]
    assert "OptimizerStateError" in last and "saved with another learned optimizer" in last
    assert "--no-resume-opt" in last and str(weights) in last and str(other) in last


def test_train_py_flow_with_pretrained_names_and_no_opt_kwargs(tmp_path: Path) -> None:
    """A shipped name trains with no --opt-kwargs; one that needs step(closure) stops with one clear line."""
    common = ["--device-modules", REGISTER, "--lr", "1.0", "-b", "8", "--epochs", "1", "--steps-per-epoch", "2",
              "--warmup-epochs", "0"]
    result = _result(_run([*common, "--opt", "l2o-correction-adam", "--output", "adam"], tmp_path))
    assert result["optimizer"] == "LearnedOptimizerTorch" and len(result["epochs"]) == 1
    refused = _run([*common, "--opt", "l2o-correction-sam", "--output", "sam"], tmp_path)
    assert refused.returncode != 0
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("flat_l2o_plugin.integrations.torch_optim.ClosureRequiredError: ")
    assert "step(closure)" in last and "train.py" in last and "use a pre-trained optimizer that needs no closure: " \
        "l2o-correction-adam" in last
