"""SLURM's path through submitit, with its local executor: every job a real subprocess, as on a node."""

from __future__ import annotations

import pytest

from flat_l2o_plugin.study import builtin_regime, load_regime, run_study
from flat_l2o_plugin.study.executors import SlurmExecutor
from flat_l2o_plugin.study.jobs import Job, JobCache

pytest.importorskip("submitit")

pytestmark = pytest.mark.slow

TASK = ["mlp", {"dataset": "digits", "hidden_sizes": [4], "batch_size": 16, "train_subset": 100}]


def test_the_quick_study_through_submitit_matches_local(quick_study, tmp_path, same_results):
    with SlurmExecutor(tmp_path / "jobs", workers=2, cluster="local") as executor:
        results = run_study(load_regime(builtin_regime("gap"), quick=True), tmp_path / "study", executor=executor)
    same_results(results, quick_study[1])
    # submitit's files (pickled submissions, logs) went to the folder the spec names, not the study's.
    assert list((tmp_path / "jobs").glob("*_log.out")) and not list((tmp_path / "study").glob("*.pkl"))


def test_a_job_that_raises_through_submitit_is_reported_and_the_others_go_on(tmp_path):
    jobs = [Job("evaluate", {"task": TASK, "seed": 0, "steps": 2, "split": "val", "flatness": False,
                             "curve_points": 1, "baseline": {"name": "adam", "lr": lr}}) for lr in (0.01, -1.0)]
    done = []
    with SlurmExecutor(tmp_path / "jobs", workers=2, cluster="local") as executor:
        failures = executor.run(jobs, tmp_path / "cache", done.append)
    assert sorted(j.key for j in done) == sorted(j.key for j in jobs)
    assert [f.job for f in failures] == [jobs[1]] and "Invalid learning rate" in failures[0].error
    assert JobCache(tmp_path / "cache").has(jobs[0].key)
