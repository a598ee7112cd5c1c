"""A job computes the same wherever it runs: the worker's dtype and threads do not leak into it."""

from __future__ import annotations

import json

import torch

from flat_l2o_plugin.study.jobs import JobCache, run_job

ARGS = {"task": ["mlp", {"dataset": "digits", "hidden_sizes": [4], "batch_size": 16, "train_subset": 100}],
        "seed": 0, "steps": 3, "split": "val", "flatness": False, "curve_points": 1,
        "baseline": {"name": "adam", "lr": 0.01}}


def _result(folder) -> dict:
    key = run_job("evaluate", ARGS, str(folder))
    result = JobCache(folder).load(key)
    result.pop("seconds")
    return result


def test_a_worker_left_in_float64_computes_what_a_fresh_one_does(tmp_path):
    fresh = _result(tmp_path / "fresh")
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        dirty = _result(tmp_path / "dirty")
        assert torch.get_default_dtype() == torch.float64, "the worker's own setting is given back"
    finally:
        torch.set_default_dtype(before)
    assert json.dumps(dirty, sort_keys=True) == json.dumps(fresh, sort_keys=True)
