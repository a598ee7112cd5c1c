"""benchmarks/deploy.py runs end to end at its --quick budget (its numbers are not checked here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "deploy.py"


@pytest.mark.slow
def test_deploy_quick_prints_every_optimizer_and_marks_every_target(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("bench_deploy", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, report = tmp_path / "deploy.json", tmp_path / "deploy.md"
    result = module.main(["--quick", "--out", str(out), "--report", str(report)])
    assert json.loads(out.read_text())["targets"] == json.loads(json.dumps(result["targets"]))
    learned = set(module.learned_names())
    for row in result["steps"]:
        assert set(row["results"]) == learned | {"adam", "adamw"}
        assert all({"ms", "ratio", "ratio_adamw"} <= set(r) for r in row["results"].values())
    assert {row["optimizer"] for row in result["end_to_end"]["rows"]} == learned | {"adam"}
    assert {row["optimizer"] for row in result["flops"]} >= set(module.TARGETS)
    assert {m["target"].split()[0] for m in result["targets"]} == set(module.TARGETS)
    assert any("end to end" in m["target"] for m in result["targets"])
    text = report.read_text()
    assert "Targets" in text and "bytes/param" in text and "GFLOP/s" in text
