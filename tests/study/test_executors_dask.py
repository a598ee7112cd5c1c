"""Dask, for real, on loopback: a LocalCluster of 2 worker processes, a scheduler joined by address,
a worker killed mid-study, and remote workers that cannot use the study's folder."""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flat_l2o_plugin.cli import main
from flat_l2o_plugin.study import builtin_regime, load_regime, run_study
from flat_l2o_plugin.study.executors import DaskExecutor
from flat_l2o_plugin.study.jobs import Job, JobCache
from flat_l2o_plugin.study.progress import Progress

distributed = pytest.importorskip("distributed")

HERE = Path(__file__).resolve().parent
TINY = HERE / "tiny_regime.toml"
TASK = ["mlp", {"dataset": "digits", "hidden_sizes": [4], "batch_size": 16, "train_subset": 100}]


@pytest.fixture(scope="module")
def dask_executor():
    """``flat-l2o study --executor dask``: a LocalCluster of 2 processes on 127.0.0.1, one thread each."""
    with DaskExecutor(workers=2) as executor:
        yield executor


def test_the_tiny_study_on_a_dask_local_cluster_matches_local(dask_executor, tiny_study, tmp_path, same_results):
    workers = dask_executor.client.scheduler_info()["workers"]
    assert len(workers) == 2 and all(w["host"] == "127.0.0.1" and w["nthreads"] == 1 for w in workers.values())
    assert len(set(dask_executor.client.run(os.getpid).values()) - {os.getpid()}) == 2  # separate processes
    # No stack sampler in the workers: it costs the jobs time (benchmarks/study_executors.py).
    profiling = dask_executor.client.run(lambda: __import__("dask").config.get("distributed.worker.profile.enabled"))
    assert set(profiling.values()) == {False}
    results = run_study(load_regime(TINY), tmp_path, executor=dask_executor)
    same_results(results, tiny_study[1])


def test_the_command_line_joins_a_running_scheduler_and_resumes(dask_executor, tiny_study, tmp_path, capsys,
                                                                same_results):
    source, expected, _ = tiny_study
    out = tmp_path / "study"
    shutil.copytree(source / "cache", out / "cache")
    missing = sorted(p for p in (out / "cache").glob("*.json") if not p.with_suffix(".safetensors").exists())[:3]
    for path in missing:
        path.unlink()
    address = dask_executor.client.scheduler.address.removeprefix("tcp://")
    assert main(["study", "--config", str(TINY), "--executor", f"dask://{address}", "--out", str(out),
                 "--no-report"]) == 0
    err = capsys.readouterr().err
    assert f"jobs on dask://{address}" in err
    assert sum(int(n) for n in re.findall(r": (\d+) of \d+ jobs to run", err)) == 3
    assert all(path.exists() for path in missing)
    same_results(json.loads((out / "results.json").read_text()), expected)
    assert dask_executor.client.status == "running", "joining a scheduler leaves it running"


def test_a_job_that_raises_on_dask_is_reported_and_the_others_go_on(dask_executor, tmp_path):
    jobs = [Job("evaluate", {"task": TASK, "seed": 0, "steps": 2, "split": "val", "flatness": False,
                             "curve_points": 1, "baseline": {"name": "adam", "lr": lr}}) for lr in (0.01, -1.0, 0.02)]
    done = []
    failures = dask_executor.run(jobs, tmp_path, done.append)
    assert sorted(j.key for j in done) == sorted(j.key for j in jobs)
    assert [f.job for f in failures] == [jobs[1]]
    assert "Invalid learning rate" in failures[0].error and "Traceback" in failures[0].trace
    assert JobCache(tmp_path).has(jobs[0].key) and JobCache(tmp_path).has(jobs[2].key)


class KillAWorker(Progress):
    """Kills (SIGKILL) a worker that is running a job, a few jobs into the held-out batch."""

    def __init__(self, client) -> None:
        self.client, self.what, self.count, self.killed = client, "", 0, None

    def start(self, what, total):
        self.what, self.count = what, 0

    def done(self, job):
        self.count += 1
        if self.killed is not None or not self.what.startswith("held-out") or self.count < 3:
            return
        busy = [(worker, keys) for worker, keys in self.client.processing().items() if keys]
        if busy:
            worker, keys = busy[0]
            pid = self.client.run(os.getpid, workers=[worker])[worker]
            os.kill(pid, signal.SIGKILL)
            self.killed = (pid, list(keys))


@pytest.mark.slow
def test_the_quick_study_survives_a_worker_killed_mid_job(dask_executor, quick_study, tmp_path, same_results):
    killer = KillAWorker(dask_executor.client)
    results = run_study(load_regime(builtin_regime("gap"), quick=True), tmp_path, executor=dask_executor,
                        progress=killer)
    assert killer.killed is not None, "no worker was busy to kill"
    pid, keys = killer.killed
    assert pid not in dask_executor.client.run(os.getpid).values()
    # The jobs it was running ran again elsewhere, and nothing half-written was taken for a result.
    cache = JobCache(tmp_path / "cache")
    assert all(cache.has(key.split("-")[1]) for key in keys)
    same_results(results, quick_study[1])


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("view, words", [
    ("not shared", "does not see the file the study wrote there"),
    ("read-only", "cannot write it (Read-only file system)"),
])
def test_a_remote_worker_that_cannot_use_the_study_folder_is_refused(tmp_path, capsys, view, words):
    if not _can_unshare():
        pytest.skip("needs root and mount namespaces (unshare -m) to give a worker its own view of the folder")
    out = tmp_path / "study"
    (out / "cache").mkdir(parents=True)
    # The worker sees, at the same path, an empty file system or a read-only one.
    mount = f"mount -t tmpfs tmpfs {out}" if view == "not shared" else f"mount --bind -o ro {out} {out}"
    with distributed.LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address=":0") as scheduler:
        address = scheduler.scheduler_address
        worker = subprocess.Popen(
            ["unshare", "-m", "sh", "-c", f"{mount} && exec {sys.executable} -m distributed.cli.dask_worker "
                                          f"{address} --nworkers 1 --nthreads 1 --no-dashboard"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            code = main(["study", "--config", str(TINY), "--executor", f"dask://{address.removeprefix('tcp://')}",
                         "--out", str(out)])
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
    err = capsys.readouterr().err
    assert code == 2 and words in err and "shared file system" in err, err
    assert list((out / "cache").iterdir()) == [] and not (out / "results.json").exists()
