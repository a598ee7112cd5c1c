"""The repository's study scripts are thin callers of ``flat-l2o study``; --quick runs end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_study_and_its_report(tmp_path):
    study, report = _load("generalization"), _load("generalization_report")
    assert study.main(["--quick", "--out", str(tmp_path / "run"), "--workers", "1", "--no-progress"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["headline"] and all(math.isfinite(r["test_accuracy"]) for r in results["runs"])
    compared = results["budget"]["held_out_baselines"] or list(results["grids"])
    assert {r["optimizer"] for r in results["runs"]} >= {*compared, *results["headline"]}
    assert "asam" in results["grids"]  # tuned on validation even when not run on the held-out test
    assert (tmp_path / "run" / "report" / "results.md").exists()
    assert report.main([str(tmp_path / "run" / "results.json"), "--to", str(tmp_path / "docs")]) == 0
    text = (tmp_path / "docs" / "results.md").read_text()
    assert "## The answer" in text
