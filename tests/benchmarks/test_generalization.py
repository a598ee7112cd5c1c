"""The generalization study: its statistics, its config handling, and its --quick run end to end."""

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


report = _load("generalization_report")
study = _load("generalization")


def _run(optimizer, task, seed, acc, meta_seed=None):
    return {"optimizer": optimizer, "task": task, "seed": seed, "meta_seed": meta_seed, "test_accuracy": acc}


def test_t_interval_matches_the_textbook_value():
    mean, half = report.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.302652729911275 * 1.0 / math.sqrt(3))
    assert math.isnan(report.t_interval([5.0])[1])
    assert report.t_interval([1.0, float("nan"), 3.0])[0] == 2.0


def test_learned_runs_are_clustered_by_meta_seed():
    runs = [_run("l", "t", s, acc, meta_seed=m) for m, accs in ((0, (0.5, 0.7)), (1, (0.9, 0.9)))
            for s, acc in enumerate(accs)]
    assert report.clustered(runs, "test_accuracy") == [pytest.approx(0.6), pytest.approx(0.9)]
    baseline = [_run("adam", "t", s, a) for s, a in enumerate((0.1, 0.2, 0.3))]
    assert report.clustered(baseline, "test_accuracy") == [0.1, 0.2, 0.3]


def test_paired_differences_pair_seeds_and_cluster_by_meta_seed():
    runs = []
    for m in (0, 1, 2):
        for s in (0, 1):
            runs.append(_run("plain", "t", s, 0.5 + 0.01 * s, meta_seed=m))
            runs.append(_run("treated", "t", s, 0.5 + 0.01 * s + 0.04 + 0.01 * m, meta_seed=m))
    p = report.paired(runs, "t", "treated", "plain")
    # Per meta-seed differences 0.04, 0.05, 0.06: mean 0.05, t-interval over 3 clusters.
    assert p["mean"] == pytest.approx(0.05)
    assert p["half"] == pytest.approx(4.302652729911275 * 0.01 / math.sqrt(3))
    assert (p["wins"], p["pairs"]) == (6, 6)
    assert report.verdict(p) == "better"
    # Against a baseline, pairs share the optimizee seed only.
    runs += [_run("adam", "t", 0, 0.56), _run("adam", "t", 1, 0.58)]
    q = report.paired(runs, "t", "plain", "adam")
    assert q["mean"] == pytest.approx((0.50 - 0.56 + 0.51 - 0.58) / 2)
    assert report.verdict(q) == "worse"
    assert report.paired(runs, "other task", "treated", "plain") is None


def test_references_resolve_from_validation_picks_and_unknown_ones_are_named():
    picks = {"adam": {"lr": 0.003}, "sam": {"lr": 0.01, "rho": 0.5}}
    entry = {"options": {"lr": "@adam.lr"}, "wrappers": [{"name": "sam_gradient", "rho": "@sam.rho"}], "label": "x"}
    assert study.resolve(entry, picks) == {"options": {"lr": 0.003}, "wrappers": [{"name": "sam_gradient", "rho": 0.5}],
                                           "label": "x"}
    with pytest.raises(SystemExit, match="'@sgd.lr'"):
        study.resolve("@sgd.lr", picks)


def test_the_config_shipped_is_complete_and_quick_mode_shrinks_it():
    full = study.load_config(study.DEFAULT_CONFIG, quick=False)
    for name, regime in full["regimes"].items():
        assert len(regime["held_out"]) >= 5, name
        assert set(regime["baselines"]) == {"adam", "sgd_momentum", "sam", "entropy_sgd"}
        assert set(regime["regularizers"]) == {"hessian_top_eigenvalue", "local_entropy", "sharpness"}
        assert regime["eval_steps"] > regime["trainer"]["horizon"], "held-out runs must outlast the horizon"
    assert len(full["study"]["meta_seeds"]) >= 3 and full["study"]["eval_seeds"] >= 5
    quick = study.load_config(study.DEFAULT_CONFIG, quick=True)
    assert list(quick["regimes"]) == ["gap"]
    assert quick["regimes"]["gap"]["trainer"]["meta_steps"] < full["regimes"]["gap"]["trainer"]["meta_steps"]


@pytest.mark.slow
def test_quick_study_and_its_report(tmp_path):
    results = study.main(["--quick", "--out", str(tmp_path / "run"), "--workers", "1"], log=lambda _: None)
    regime = results["regimes"]["gap"]
    contenders = {r["optimizer"] for r in regime["runs"]}
    assert {"adam", "sgd_momentum", "sam", "entropy_sgd", "rnnprop", "rnnprop+sharpness", "l2o_dm"} <= contenders
    assert all(math.isfinite(r["test_accuracy"]) for r in regime["runs"])
    docs = tmp_path / "docs"
    text = report.main([str(tmp_path / "run" / "results.json"), "--docs", str(docs)])
    assert "Quick mode" in text and "Paired differences" in text
    assert (docs / "img" / "results_gap_curves.png").stat().st_size > 0
    # The compact JSON regenerates the same report.
    assert report.main([str(docs / "results.json"), "--docs", str(docs)]) == text
    # A rerun finds every job in the cache.
    logs = []
    study.main(["--quick", "--out", str(tmp_path / "run"), "--workers", "1"], log=logs.append)
    assert all("(0 cached)" not in line for line in logs if "jobs" in line)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["quick"] is True


def test_the_recipe_tally_counts_meta_loss_terms_only():
    runs = []
    for m in (0, 1, 2):
        for s in (0, 1):
            runs.append(_run("rnnprop", "t", s, 0.5, meta_seed=m))
            runs.append(_run("rnnprop+sharpness", "t", s, 0.54 + 0.01 * m, meta_seed=m))
            runs.append(_run("rnnprop+sam_gradient", "t", s, 0.9, meta_seed=m))
    regime = {"held_out_contenders": ["rnnprop", "rnnprop+sharpness", "rnnprop+sam_gradient"],
              "chosen_regularizers": {"sharpness": {"weight": 0.1}}, "held_out": [{"name": "t"}], "runs": runs}
    assert report.regularized_pairs(regime) == [("rnnprop+sharpness", "rnnprop"), ("rnnprop+sam_gradient", "rnnprop")]
    assert report.recipe_tally({"regimes": {"r": regime}}) == {"better": 1, "worse": 0, "within noise": 0}
