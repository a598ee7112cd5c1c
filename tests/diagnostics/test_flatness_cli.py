"""``flat-l2o flatness`` in a subprocess, on a checkpoint of the default digits MLP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flat_l2o_plugin import create_task
from flat_l2o_plugin.tasks.checkpoint import save_optimizee


def flat_l2o(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAT_L2O_")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", "flat_l2o_plugin", *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    task = create_task("mlp_digits")
    path = tmp_path_factory.mktemp("optimizee") / "mlp.safetensors"
    return save_optimizee(path, "mlp_digits", {}, task.init_params(seed=0)), task


@pytest.mark.integration
def test_flatness_writes_the_json_and_the_png_and_prints_a_summary(checkpoint, tmp_path):
    path, task = checkpoint
    out = tmp_path / "report"
    result = flat_l2o("flatness", str(path), "--out", str(out), "--top-k", "2", "--gammas", "100,1000")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "flatness.json").read_text())
    assert report["task"] == task.name and report["split"] == "train"
    assert report["num_params"] == 1510
    assert len(report["top_eigenvalues"]) == 2
    assert [r["gamma"] for r in report["local_entropy"]] == [100.0, 1000.0]
    assert (out / "spectral_density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "top eigenvalues" in result.stdout and "trace" in result.stdout
    assert str(out / "flatness.json") in result.stdout and str(out / "spectral_density.png") in result.stdout


@pytest.mark.integration
def test_flatness_json_goes_to_stdout_and_the_files_next_to_the_checkpoint(checkpoint):
    path, _ = checkpoint
    result = flat_l2o("flatness", str(path), "--json", "--top-k", "1", "--gammas", "100")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    written = path.parent / "mlp_flatness"
    assert printed == json.loads((written / "flatness.json").read_text())
    assert (written / "spectral_density.png").is_file()


@pytest.mark.integration
@pytest.mark.parametrize("case", ["missing", "corrupt", "bad_gammas"])
def test_flatness_errors_exit_2_with_one_line(checkpoint, tmp_path, case):
    path, _ = checkpoint
    args = [str(tmp_path / "absent.safetensors")]
    if case == "corrupt":
        broken = tmp_path / "broken.safetensors"
        broken.write_bytes(b"\x00" * 64)
        args = [str(broken)]
    elif case == "bad_gammas":
        args = [str(path), "--gammas", "10,-1"]
    result = flat_l2o("flatness", *args, "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("flat-l2o: error:")
    if case != "bad_gammas":
        assert args[0] in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_flatness_help_has_examples():
    result = flat_l2o("flatness", "--help")
    assert result.returncode == 0 and "examples:" in result.stdout and "--gammas" in result.stdout
