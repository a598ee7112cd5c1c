"""The benchmarks run end to end at their --quick budget (their numbers are not checked here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
def test_schedules_quick(tmp_path):
    out = tmp_path / "schedules.json"
    result = _load("schedules").main(["--quick", "--workers", "1", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert {r["config"] for r in result["rows"]} >= {"none", "α=1 from step 0", "scale-free α=0.1, late"}


@pytest.mark.slow
def test_regularizer_cost_quick(tmp_path):
    out = tmp_path / "cost.json"
    result = _load("regularizer_cost").main(["--quick", "--out", str(out)])
    assert result["meta_iteration"]["mlp_digits"]["none"]["ratio"] == 1.0
    assert any(name.startswith("top eigenvalue to 1e-02: ours (lanczos)") for name in result["libraries"])
    assert "trace: ours (100 probes, batched)" in result["libraries"]
    assert {t["verdict"] for t in result["targets"].values()} <= {"met", "not met", "undecided"}
    assert set(result["targets"]) == {"mlp_digits", "conv_digits"}
    assert "top: finite difference (default h)" in result["finite_difference"]["timm ViT"]["rows"]
    assert "hessian_top_eigenvalue (HVP)" in result["batch_norm"]["errors"]  # torch refuses its third derivative
    assert set(result["step_profile"]) == {"mlp_digits", "conv_digits"}
    routes = result["third_order_routes"]
    assert set(routes) == {"mlp_digits", "conv_digits", "timm ViT"}
    # Forward-over-forward mode computes the same derivative as the HVP route.
    assert routes["mlp_digits"]["accuracy"]["forward-over-forward (torch.func.jvp twice)"]["derivative_cosine"] > 0.999
    assert set(result["conv_double_backward"]) == {"data needs no grad", "data needs grad", "the data's gradient alone"}


@pytest.mark.slow
def test_study_executors_on_a_tiny_regime(tmp_path):
    pytest.importorskip("distributed")
    tiny = Path(__file__).resolve().parents[1] / "study" / "tiny_regime.toml"
    out = tmp_path / "executors.json"
    result = _load("study_executors").main(["--rounds", "1", "--config", str(tiny), "--out", str(out)])
    assert result["same_results"] and len(result["seconds"]["local"]) == len(result["seconds"]["dask"]) == 1
    assert result["dask_over_local"] == result["median_dask_s"] / result["median_local_s"] > 0
    assert json.loads(out.read_text())["study"] == f"{tiny} --quick"
