"""Ray, for real, started on this machine with 2 CPUs: the --quick study gives local's results."""

from __future__ import annotations

import pytest

from flat_l2o_plugin.study import builtin_regime, load_regime, run_study
from flat_l2o_plugin.study.executors import RayExecutor
from flat_l2o_plugin.study.jobs import Job, JobCache

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

TASK = ["mlp", {"dataset": "digits", "hidden_sizes": [4], "batch_size": 16, "train_subset": 100}]


@pytest.fixture(scope="module")
def ray_executor():
    """``flat-l2o study --executor ray``: Ray on this machine, 2 CPUs, one job per CPU."""
    with RayExecutor(workers=2) as executor:
        yield executor
    assert not ray.is_initialized(), "the Ray it started is shut down"


def test_the_quick_study_on_ray_matches_local(ray_executor, quick_study, tmp_path, same_results):
    assert ray.cluster_resources()["CPU"] == 2
    results = run_study(load_regime(builtin_regime("gap"), quick=True), tmp_path, executor=ray_executor)
    same_results(results, quick_study[1])


def test_a_job_that_raises_on_ray_is_reported_and_the_others_go_on(ray_executor, tmp_path):
    jobs = [Job("evaluate", {"task": TASK, "seed": 0, "steps": 2, "split": "val", "flatness": False,
                             "curve_points": 1, "baseline": {"name": "adam", "lr": lr}}) for lr in (0.01, -1.0)]
    done = []
    failures = ray_executor.run(jobs, tmp_path, done.append)
    assert sorted(j.key for j in done) == sorted(j.key for j in jobs)
    assert [f.job for f in failures] == [jobs[1]] and "Invalid learning rate" in failures[0].error
    assert JobCache(tmp_path).has(jobs[0].key)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_running_cluster_is_joined_through_ray_client(tmp_path, monkeypatch):
    """``--executor ray://HOST:PORT``: a head node started apart (``ray start``), reached through Ray Client."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile

    if ray.is_initialized():
        ray.shutdown()
    # The head and this client agree to run without Ray's token (see the README for a cluster that has one).
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    gcs, client = _free_port(), _free_port()
    ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    # A short folder: Ray's unix sockets live there, and their paths have a length limit.
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                             "--num-cpus=2", f"--ray-client-server-port={client}", "--include-dashboard=false",
                             "--disable-usage-stats", f"--temp-dir={temp}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        jobs = [Job("evaluate", {"task": TASK, "seed": 0, "steps": 2, "split": "val", "flatness": False,
                                 "curve_points": 1, "baseline": {"name": "adam", "lr": lr}}) for lr in (0.01, -1.0)]
        for attempt in range(3):  # the head takes a while to open its client port
            try:
                with RayExecutor(f"127.0.0.1:{client}") as executor:
                    failures = executor.run(jobs, tmp_path / "cache", None)
                break
            except Exception:  # noqa: BLE001
                if attempt == 2:
                    raise
        assert [f.job for f in failures] == [jobs[1]] and JobCache(tmp_path / "cache").has(jobs[0].key)
        assert not ray.is_initialized(), "the client disconnects; the cluster is not ours to stop"
        assert head.poll() is None
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
