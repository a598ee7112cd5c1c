"""benchmarks/deploy.py runs end to end at its --quick budget (its numbers are not checked here)."""

from __future__ import annotations

import argparse
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


def test_the_full_run_times_one_and_all_threads_and_runs_the_cnn_at_batch_32() -> None:
    spec = importlib.util.spec_from_file_location("bench_deploy", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = argparse.Namespace(quick=False, model="resnet50", resolution=160)
    sizes, rounds, thread_counts, target_size, e2e = module.plan(args, cpus=4)
    assert sizes == [10**4, 10**5, 10**6, 10**7] and set(rounds) == set(sizes)
    assert thread_counts == [1, 4] and target_size == 10**6
    assert e2e["model_name"] == "resnet50" and e2e["batch"] == 32 and e2e["resolution"] == 160
    assert module.plan(args, cpus=1)[2] == [1]
    quick = module.plan(argparse.Namespace(quick=True, model="resnet18", resolution=224), cpus=4)
    assert quick[2] == [1] and quick[3] in quick[0]
