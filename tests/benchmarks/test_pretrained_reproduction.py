"""benchmarks/pretrained_reproduction.py: the study's values of a shipped row and the verdict on a rerun."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from flat_l2o_plugin.study.shipping import meta_train_job, shipped

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "pretrained_reproduction.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_pretrained_reproduction", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_row_s_meta_seeds_come_from_the_study_or_its_cache(bench, tmp_path) -> None:
    entry = shipped("l2o-correction-sam")
    for seed, value in ((0, 0.31), (2, 0.33)):
        key, _ = meta_train_job(replace(entry, meta_seed=seed))
        (tmp_path / f"{key}.json").write_text(json.dumps({"best_val_accuracy": value}))
    assert bench.study_values(entry, None, tmp_path, 5) == {0: 0.31, 2: 0.33}
    study = {"meta_runs": [{"label": entry.candidate, "meta_seed": 1, "best_val_accuracy": 0.4},
                           {"label": "other", "meta_seed": 0, "best_val_accuracy": 0.9},
                           {"label": entry.candidate, "meta_seed": 2, "failed": True}]}
    assert bench.study_values(entry, study, tmp_path, 5) == {1: 0.4}


def test_the_verdict_is_exact_within_the_prediction_interval_or_outside(bench) -> None:
    spread = {0: 0.30, 1: 0.32, 2: 0.31}
    low, high = bench.prediction_interval(list(spread.values()))
    # mean 0.31, sd 0.01, t(0.975, 2) = 4.303, sqrt(4/3)
    assert high - 0.31 == pytest.approx(4.302653 * 0.01 * math.sqrt(4 / 3), rel=1e-5)
    assert bench.verdict(0.3333, 0.3333, {}) == "reproduced"
    assert bench.verdict(0.33, 0.3333, spread) == "within"
    assert bench.verdict(high + 1e-6, 0.3333, spread) == "OUTSIDE"
    assert bench.verdict(0.33, 0.3333, {0: 0.3}).startswith("differs")
