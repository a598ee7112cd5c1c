"""Optional packages: a missing extra is named in a one-line error, and the core needs none.

Missing packages are simulated with ``None`` in ``sys.modules``, which makes importing
them raise ``ModuleNotFoundError`` exactly as when they are not installed.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flat_l2o_plugin._extras import import_extra
from flat_l2o_plugin.cli import main
from flat_l2o_plugin.errors import FlatL2OError, MissingExtraError

# The shared helper module beside this file is imported by name.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from core_only import CORE_CHECK, core_only_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _block(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    for name in names:
        for key in [k for k in sys.modules if k == name or k.startswith(f"{name}.")]:
            monkeypatch.setitem(sys.modules, key, None)
        monkeypatch.setitem(sys.modules, name, None)


def test_import_extra_names_the_extra_and_keeps_other_import_errors(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _block(monkeypatch, "sklearn")
    with pytest.raises(MissingExtraError) as caught:
        import_extra("sklearn.datasets", "data", "dataset 'digits'")
    assert str(caught.value) == ("dataset 'digits' needs 'sklearn.datasets', which is not installed: "
                                 "pip install 'flat-l2o-plugin[data]'")
    assert isinstance(caught.value, ImportError) and isinstance(caught.value, FlatL2OError)

    # An installed package that fails for another reason keeps its own error.
    (tmp_path / "broken_extra_module.py").write_text("raise ImportError('its own problem')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="its own problem") as caught:
        import_extra("broken_extra_module", "data", "something")
    assert not isinstance(caught.value, MissingExtraError)


def test_datasets_name_the_data_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from flat_l2o_plugin.tasks import data, load_dataset, mnist1d_data, vision_data

    _block(monkeypatch, "sklearn", "mnist1d", "torchvision")
    for cached in (data._digits, mnist1d_data._build, mnist1d_data._generate):
        cached.cache_clear()  # loaded by other tests: clear, so the import is attempted again
    for name in ("digits", "mnist1d"):
        with pytest.raises(MissingExtraError, match=rf"dataset '{name}' needs .*pip install 'flat-l2o-plugin\[data\]'"):
            load_dataset(name)
    folder = tmp_path / vision_data.MNIST_FOLDER
    folder.mkdir(parents=True)
    for name in vision_data.MNIST_FILES:
        (folder / name).write_bytes(b"")
    with pytest.raises(MissingExtraError, match=r"dataset 'mnist' needs 'torchvision.*\[data\]'"):
        load_dataset("mnist", root=tmp_path)


def test_timm_features_name_the_timm_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from flat_l2o_plugin.tasks.timm_model import TimmTask

    _block(monkeypatch, "timm")
    with pytest.raises(MissingExtraError, match=r"TimmTask needs 'timm'.*\[timm\]'"):
        TimmTask("resnet10t")
    for module in ("flat_l2o_plugin.integrations.timm", "flat_l2o_plugin.integrations.timm_train"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(MissingExtraError, match=r"flat_l2o_plugin.integrations.timm needs 'timm(.optim)?'.*\[timm\]'"):
        importlib.import_module("flat_l2o_plugin.integrations.timm_train")
    import flat_l2o_plugin.integrations as integrations

    monkeypatch.delitem(integrations.__dict__, "register_with_timm", raising=False)
    with pytest.raises(MissingExtraError, match=r"\[timm\]"):
        integrations.register_with_timm  # noqa: B018 - the lazy attribute imports the module


def test_plots_name_the_plot_extra_and_the_cli_says_it_in_one_line(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flat_l2o_plugin.diagnostics import plot_density
    from flat_l2o_plugin.training.plot import plot_metrics

    _block(monkeypatch, "matplotlib")
    with pytest.raises(MissingExtraError, match=r"plot_metrics needs 'matplotlib'.*\[plot\]'"):
        plot_metrics(tmp_path)
    with pytest.raises(MissingExtraError, match=r"plot_density needs 'matplotlib'.*\[plot\]'"):
        plot_density(None, tmp_path / "density.png")  # type: ignore[arg-type]
    assert main(["plot", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'flat-l2o-plugin[plot]'" in err


def test_flatness_without_the_plot_extra_writes_the_numbers_and_says_why_no_plot(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flat_l2o_plugin import create_task
    from flat_l2o_plugin.tasks.checkpoint import save_optimizee

    checkpoint = save_optimizee(tmp_path / "mlp.safetensors", "mlp_digits", {},
                                create_task("mlp_digits").init_params(seed=0))
    _block(monkeypatch, "matplotlib")
    out = tmp_path / "report"
    assert main(["flatness", str(checkpoint), "--out", str(out), "--top-k", "1", "--gammas", "100"]) == 0
    assert (out / "flatness.json").is_file() and not (out / "spectral_density.png").exists()
    captured = capsys.readouterr()
    assert captured.err == ("flat-l2o: note: no spectral_density.png: plot_density needs 'matplotlib', which is "
                            "not installed: pip install 'flat-l2o-plugin[plot]'\n")
    assert f"wrote {out / 'flatness.json'}\n" in captured.out


def test_the_demo_checks_its_extras_before_it_starts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from flat_l2o_plugin.demo import DemoConfig, run_demo

    _block(monkeypatch, "scipy")
    with pytest.raises(MissingExtraError, match=r"flat-l2o demo needs 'scipy.*\[data,plot\]'"):
        run_demo(tmp_path / "demo", config=DemoConfig.quick(), progress=False, log=lambda line: None)
    assert not (tmp_path / "demo").exists()


def test_the_core_works_with_no_extra_installed(tmp_path: Path) -> None:
    env = core_only_env(tmp_path / "blocker")
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(ROOT)])
    done = subprocess.run([sys.executable, "-c", CORE_CHECK], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"core ok {ROOT / 'flat_l2o_plugin'}" in done.stdout
    assert "hessian_top_eigenvalue" in done.stdout  # flat-l2o list regularizers
    assert "flat_l2o_plugin.integrations.timm needs 'timm', which is not installed: " \
           "pip install 'flat-l2o-plugin[timm]'" in done.stdout
    assert ("plot exit 1 \"flat-l2o: error: plot_metrics needs 'matplotlib', which is not installed: "
            "pip install 'flat-l2o-plugin[plot]'\\n\"") in done.stdout
