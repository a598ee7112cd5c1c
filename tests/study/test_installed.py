"""``flat-l2o study --quick --executor dask`` from a wheel installed in a fresh environment, outside the checkout.

The wheel is built from a copy of the package and installed, not editable, into a new
virtual environment that reuses this interpreter's installed packages (torch, Dask) through a
``.pth`` file placed after its own, so nothing is downloaded and the package that runs
is the wheel's: Dask's worker processes import it from there too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{command}:\n{done.stdout}\n{done.stderr}"
    return done


def test_the_quick_study_runs_on_dask_from_an_installed_wheel(tmp_path, quick_study, same_results):
    pytest.importorskip("distributed")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "flat_l2o_plugin", source / "flat_l2o_plugin",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    built = _run([sys.executable, "-c", f"from setuptools import build_meta; "
                                        f"print(build_meta.build_wheel({str(tmp_path / 'dist')!r}))"], cwd=source)
    wheel = tmp_path / "dist" / built.stdout.strip().splitlines()[-1]

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).stdout.strip())
    (site / "reuse_installed_packages.pth").write_text(f"{Path(torch.__file__).resolve().parents[1]}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME") and not k.startswith("FLAT_L2O")}
    env["OMP_NUM_THREADS"] = "1"
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check",
          str(wheel)], cwd=tmp_path, env=env)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(python), "-c", "import flat_l2o_plugin.study as s; print(s.__file__)"], elsewhere, env)
    assert where.stdout.strip().startswith(str(site))
    done = _run([str(venv / "bin" / "flat-l2o"), "study", "--config", "gap", "--quick", "--executor", "dask",
                 "--workers", "2", "--out", "quick"], elsewhere, env)
    assert "jobs on dask" in done.stderr
    assert (elsewhere / "quick" / "report" / "results.md").exists()
    same_results(json.loads((elsewhere / "quick" / "results.json").read_text()), quick_study[1])
