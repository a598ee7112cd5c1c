"""The package as pip users get it: sdist, wheel, and the wheel installed in a fresh venv.

The sdist is built from a copy of the checkout, the wheel from the unpacked sdist (so the
sdist is known to be complete), and the wheel is installed, not editable, into a new
virtual environment. That environment reuses the torch already installed here (a
``.pth`` file puts this interpreter's site-packages after its own), so nothing is
downloaded. The command line then runs from outside the checkout, once with everything
importable (the --quick study on Dask included) and once with every optional package
refused, as in a core-only install.
"""

from __future__ import annotations

import email
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

# The shared helper module beside this file is imported by name.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from core_only import CORE_CHECK, core_only_env  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]
# What the sdist is built from: the package, its metadata, and the tests (which it must not ship).
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "flat_l2o_plugin", "tests")

CORE_REQUIREMENTS = {"torch>=2.1", "pluggy>=1.3", "safetensors>=0.4", "numpy", "pyyaml>=6", "tqdm>=4.60",
                     'tomli>=2; python_version < "3.11"'}


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command}: {done.stderr}"
    return done


def _without_wall_clock(results: dict) -> str:
    from flat_l2o_plugin.study.pipeline import without_wall_clock

    # Through JSON, as results.json holds them: NaN compares equal as the same token.
    return json.dumps(without_wall_clock(results), sort_keys=True, default=str)


def _build(backend_call: str, source: Path, out: Path) -> Path:
    # setuptools' PEP 517 backend, called directly: no isolated environment to download.
    done = _run([sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.{backend_call}({str(out)!r}))"],
                cwd=source)
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("packaging")
    checkout = work / "checkout"
    checkout.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, checkout / name, ignore=ignore)
        else:
            shutil.copy2(source, checkout / name)
    sdist = _build("build_sdist", checkout, work / "dist")
    with tarfile.open(sdist) as archive:
        archive.extractall(work / "unpacked", filter="data")
    wheel = _build("build_wheel", work / "unpacked" / sdist.name.removesuffix(".tar.gz"), work / "dist")
    return {"work": work, "sdist": sdist, "wheel": wheel}


def test_sdist_holds_the_package_the_license_and_no_stray_tests(built: dict[str, Path]) -> None:
    with tarfile.open(built["sdist"]) as archive:
        names = [name.split("/", 1)[1] for name in archive.getnames() if "/" in name]
        metadata = email.message_from_bytes(archive.extractfile(f"{built['sdist'].name[:-7]}/PKG-INFO").read())
    assert "LICENSE" in names and "flat_l2o_plugin/py.typed" in names
    assert not [name for name in names if name.startswith("tests")]
    top_level = {name.split("/")[0] for name in names}
    assert top_level <= {"LICENSE", "MANIFEST.in", "PKG-INFO", "README.md", "pyproject.toml", "setup.cfg",
                         "flat_l2o_plugin", "flat_l2o_plugin.egg-info"}, top_level

    assert metadata["License-Expression"] == "MIT" and metadata.get_all("License-File") == ["LICENSE"]
    classifiers = metadata.get_all("Classifier")
    assert "Framework :: Pytest" not in classifiers
    assert {f"Programming Language :: Python :: 3.{minor}" for minor in (10, 11, 12, 13)} <= set(classifiers)
    requires = metadata.get_all("Requires-Dist")
    assert {r for r in requires if "extra ==" not in r} == CORE_REQUIREMENTS
    assert set(metadata.get_all("Provides-Extra")) >= {"timm", "data", "plot", "all", "learn2learn", "dev"}
    assert 'timm>=1.0; extra == "timm"' in requires and 'matplotlib>=3.7; extra == "plot"' in requires
    assert 'flat-l2o-plugin[data,plot,timm]; extra == "all"' in requires


def test_wheel_installed_in_a_fresh_venv_runs_from_outside_the_checkout(built: dict[str, Path]) -> None:
    work = built["work"]
    with zipfile.ZipFile(built["wheel"]) as archive:
        names = archive.namelist()
    assert all(name.startswith(("flat_l2o_plugin/", "flat_l2o_plugin-0.1.0.dist-info/")) for name in names)
    assert "flat_l2o_plugin-0.1.0.dist-info/licenses/LICENSE" in names

    venv = work / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=work)
    python, command = venv / "bin" / "python", venv / "bin" / "flat-l2o"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=work).stdout.strip())
    # torch (and pip) from this interpreter's site-packages, after the venv's own: a path
    # in a .pth file is added as it is, its own .pth files (an editable install) are not run.
    (site / "reuse_installed_torch.pth").write_text(f"{Path(torch.__file__).resolve().parents[1]}\n")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
          "--disable-pip-version-check", str(built["wheel"])], cwd=work, env=env)

    outside = work / "elsewhere"
    outside.mkdir()
    plugins = _run([str(command), "plugins"], outside, env).stdout
    assert "builtin" in plugins and "flat-l2o-plugin" in plugins
    regularizers = _run([str(command), "list", "regularizers"], outside, env).stdout
    assert "hessian_top_eigenvalue" in regularizers and "sharpness" in regularizers

    # The study from the wheel, on a Dask LocalCluster whose worker processes import the
    # installed package too (Dask comes from the [dask] extra, installed here by setup),
    # and on the local pool: the same results but for wall-clock fields.
    study_env = {key: value for key, value in env.items() if not key.startswith("FLAT_L2O")}
    study_env["OMP_NUM_THREADS"] = "1"
    results = {}
    for executor in ("dask", "local"):
        study = _run([str(command), "study", "--config", "gap", "--quick", "--executor", executor, "--workers", "2",
                      "--out", executor, "--no-progress"], outside, study_env)
        assert f"jobs on {executor}" in study.stderr
        assert (outside / executor / "report" / "results.md").is_file()
        results[executor] = json.loads((outside / executor / "results.json").read_text())
    assert results["dask"]["headline"] and results["dask"]["environment"]["flat_l2o_plugin"] == "0.1.0"
    assert _without_wall_clock(results["dask"]) == _without_wall_clock(results["local"])

    # The shipped pre-trained optimizers travel in the wheel and load from the installed package.
    from flat_l2o_plugin.builtin import shipped_pretrained

    shipped = shipped_pretrained()
    assert shipped and all(info.weights.startswith("pretrained/") for info in shipped)
    for info in shipped:
        assert f"flat_l2o_plugin/{info.weights}" in names and f"flat_l2o_plugin/{info.config}" in names
    listed = _run([str(command), "list", "pretrained", "--json"], outside, env).stdout
    assert {row["name"]: row["status"] for row in json.loads(listed)} == {info.name: "ok" for info in shipped}
    trained = _run([str(python), "-c", "import torch, flat_l2o_plugin as f; "
                    "from flat_l2o_plugin.integrations.torch_optim import LearnedOptimizerTorch as L; "
                    f"o = L(torch.nn.Linear(2, 1).parameters(), {shipped[0].name!r}); "
                    "print(f.__file__, o.learned_identity['weights_file'])"], outside, env).stdout
    assert str(site / "flat_l2o_plugin") in trained and str(site / "flat_l2o_plugin" / "pretrained") in trained

    # A core-only install: every optional package refused at import. The package
    # imported is the installed one.
    checked = _run([str(python), "-c", CORE_CHECK], outside, core_only_env(work / "core-only", env)).stdout
    assert f"core ok {site / 'flat_l2o_plugin'}" in checked
    assert "hessian_top_eigenvalue" in checked
    assert "flat_l2o_plugin.integrations.timm needs 'timm', which is not installed: " \
           "pip install 'flat-l2o-plugin[timm]'" in checked
    assert "plot exit 1" in checked and "pip install 'flat-l2o-plugin[plot]'" in checked
