"""``flat-l2o study``: resuming from the cache, the report, and one-line errors with exit 2."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from flat_l2o_plugin.cli import main
from flat_l2o_plugin.study.cli import regime_path

HERE = Path(__file__).resolve().parent
TINY = str(HERE / "tiny_regime.toml")


def _drop(cache: Path, count: int) -> list[str]:
    """Remove ``count`` finished evaluations from a study's cache; returns their keys."""
    keys = sorted(p.stem for p in cache.glob("*.json") if not (cache / f"{p.stem}.safetensors").exists())[:count]
    for key in keys:
        (cache / f"{key}.json").unlink()
    return keys


def test_a_rerun_runs_only_the_missing_jobs_and_writes_the_same_results(tiny_study, tmp_path, capsys,
                                                                         same_results):
    source, expected, _ = tiny_study
    out = tmp_path / "study"
    shutil.copytree(source / "cache", out / "cache")
    keys = _drop(out / "cache", 2)
    assert main(["study", "--config", TINY, "--out", str(out), "--no-report"]) == 0
    captured = capsys.readouterr()
    assert sum(int(n) for n in re.findall(r": (\d+) of \d+ jobs to run", captured.err)) == 2, captured.err
    assert all((out / "cache" / f"{key}.json").exists() for key in keys)
    assert "\r" not in captured.err  # no progress line when stderr is not a terminal
    assert captured.out.strip() == f"wrote {out / 'results.json'}"
    same_results(json.loads((out / "results.json").read_text()), expected)
    assert not (out / "report").exists()


def test_the_report_regenerates_from_a_study_folder_and_from_its_compact_json(tiny_study, tmp_path, capsys):
    source, _, _ = tiny_study
    study = tmp_path / "study"
    study.mkdir()
    shutil.copy(source / "results.json", study / "results.json")
    reading = tmp_path / "reading.md"
    reading.write_text("Our reading of the numbers.\n")
    assert main(["study", "report", str(study), "--reading", str(reading)]) == 0
    first = (study / "report" / "results.md").read_text()
    assert "## The answer" in first and "Our reading of the numbers." in first
    assert capsys.readouterr().out.strip() == f"wrote {study / 'report' / 'results.md'}"
    assert json.loads((study / "results.json").read_text()).get("compact") is None  # the study's own file is kept
    # The compact JSON a report folder holds regenerates that folder in place, identically.
    assert main(["study", "report", str(study / "report"), "--reading", str(reading)]) == 0
    assert (study / "report" / "results.md").read_text() == first
    assert main(["study", "report", str(study / "report" / "results.json"), "--to", str(tmp_path / "again"),
                 "--reading", str(reading)]) == 0
    assert (tmp_path / "again" / "results.md").read_text() == first


@pytest.mark.parametrize("argv, words", [
    (["study"], "study needs --config"),
    (["study", "--config", "nope"], "no built-in regime of that name (built-in: gap)"),
    (["study", "--config", "missing.toml"], "missing.toml does not exist"),
    (["study", "--config", TINY, "--executor", "spark"], "--executor: unknown executor 'spark'"),
    (["study", "--config", TINY, "--workers", "0"], "--workers must be >= 1"),
    (["study", "--config", TINY, "--reading", "nowhere.md"], "--reading nowhere.md: no such file"),
    (["study", "report", "nowhere"], "nowhere: no results.json there"),
])
def test_bad_input_is_one_line_and_exit_2(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "runs").exists()


def test_a_missing_engine_is_one_line_naming_the_extra_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    assert main(["study", "--config", TINY, "--executor", "dask", "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'flat-l2o-plugin[dask]'" in err
    assert not (tmp_path / "s").exists()


def test_a_results_file_that_is_not_a_study_is_refused(tmp_path, capsys):
    (tmp_path / "results.json").write_text('{"name": "x"}')
    assert main(["study", "report", str(tmp_path)]) == 2
    assert "is not a study's results.json" in capsys.readouterr().err


def test_config_takes_a_path_or_a_built_in_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert regime_path("gap").name == "gap.toml" and regime_path("gap").is_file()
    (tmp_path / "gap").write_text("")  # a file of that name here wins over the built-in
    assert regime_path("gap") == Path("gap")
