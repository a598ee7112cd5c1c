"""Executors without their engines: specs, missing extras, the cache probe, SLURM's resubmission, progress."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from flat_l2o_plugin.errors import ConfigError, MissingExtraError
from flat_l2o_plugin.study import executors as ex
from flat_l2o_plugin.study import load_regime, run_study
from flat_l2o_plugin.study.executors import ExecutorSpec, LocalExecutor, executor_spec, make_executor, probe_cache
from flat_l2o_plugin.study.jobs import Job, JobCache
from flat_l2o_plugin.study.progress import TerminalProgress, format_duration

HERE = Path(__file__).resolve().parent
TASK = ["mlp", {"dataset": "digits", "hidden_sizes": [4], "batch_size": 16, "train_subset": 100}]


def evaluation(lr: float) -> Job:
    """A small evaluation job; a negative learning rate makes it raise."""
    return Job("evaluate", {"task": TASK, "seed": 0, "steps": 2, "split": "val", "flatness": False,
                            "curve_points": 1, "baseline": {"name": "adam", "lr": lr}})


# ---------------------------------------------------------------------------- specs


def test_each_spec_names_its_executor():
    assert isinstance(make_executor("local", workers=3), LocalExecutor)
    assert make_executor("local", workers=3).workers == 3
    assert ex._split("dask", "x") == ("dask", None)
    assert ex._split("dask://head.cluster:8786", "x") == ("dask", "head.cluster:8786")
    assert ex._split("ray://10.0.0.1:10001", "x") == ("ray", "10.0.0.1:10001")
    assert ex._split("slurm:/shared/jobs", "x") == ("slurm", "/shared/jobs")


@pytest.mark.parametrize("spec, words", [
    ("dusk", "unknown executor 'dusk'"), ("", "expected an executor"), ("dask://head", "dask://HOST:PORT"),
    ("dask://:8786", "dask://HOST:PORT"), ("ray://h:99999", "ray://HOST:PORT"), ("slurm:", "needs a folder"),
])
def test_a_bad_spec_is_one_line_naming_the_setting(spec, words):
    with pytest.raises(ConfigError) as error:
        make_executor(spec, where="--executor")
    assert str(error.value).startswith("--executor: ") and words in str(error.value)
    assert "\n" not in str(error.value)


def test_a_regime_names_its_executor_as_a_string_or_a_table():
    assert executor_spec("dask://h:1") == ExecutorSpec(use="dask://h:1")
    spec = executor_spec({"use": "slurm:/s/jobs", "slurm": {"slurm_partition": "cpu"}})
    assert spec.slurm == {"slurm_partition": "cpu"}
    with pytest.raises(ConfigError, match="executor: unknown key 'partition'"):
        executor_spec({"use": "local", "partition": "cpu"})
    with pytest.raises(ConfigError, match="executor.slurm must be a table"):
        executor_spec({"use": "local", "slurm": "cpu"})
    with pytest.raises(ConfigError, match="executor.use: unknown executor 'spark'"):
        executor_spec({"use": "spark"})


@pytest.mark.parametrize("spec, module, extra", [
    ("dask", "distributed", "dask"), ("dask://h:1", "distributed", "dask"), ("ray", "ray", "ray"),
    ("ray://h:1", "grpc", "ray"),
    ("slurm:/tmp/x", "submitit", "slurm"),
])
def test_a_missing_engine_names_the_extra_to_install(monkeypatch, spec, module, extra):
    if module == "grpc":
        pytest.importorskip("ray")  # Ray Client's own requirement is checked once Ray imports
    monkeypatch.setitem(sys.modules, module, None)  # import refused, as when not installed
    with pytest.raises(MissingExtraError) as error:
        make_executor(spec)
    message = str(error.value)
    assert f"pip install 'flat-l2o-plugin[{extra}]'" in message and repr(module) in message
    assert "\n" not in message


# ---------------------------------------------------------------------------- the cache probe


class ProbeElsewhere(LocalExecutor):
    """A worker whose view of the cache is another folder: the study's folder is not shared."""

    def __init__(self, view: Path) -> None:
        super().__init__(workers=1)
        self.view = view

    def _probe(self, cache_dir, token):
        self.view.mkdir(parents=True, exist_ok=True)
        return [probe_cache(str(self.view), token)]


def test_a_cache_the_workers_do_not_share_is_refused_and_nothing_is_left(tmp_path):
    out = tmp_path / "study"
    with pytest.raises(ConfigError) as error:
        run_study(load_regime(HERE / "tiny_regime.toml"), out, executor=ProbeElsewhere(tmp_path / "elsewhere"))
    message = str(error.value)
    assert "does not see the file the study wrote there" in message and str(out / "cache") in message
    assert "shared file system" in message
    assert not out.exists()
    assert not list((tmp_path / "elsewhere").iterdir())


def test_a_cache_a_worker_cannot_write_is_refused(tmp_path, monkeypatch):
    real = Path.write_text

    def read_only(self, *args, **kwargs):
        if self.name.startswith(".probe-") and self.name.count("-") >= 3:  # the worker's file, not the token
            raise PermissionError(13, "Permission denied")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    with pytest.raises(ConfigError, match=r"cannot write it \(Permission denied\)"):
        LocalExecutor(1).prepare(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_worker_file_this_machine_does_not_see_or_another_version_is_refused(tmp_path):
    if ex._version() is None:
        pytest.skip("the package is not installed, so it has no version to compare")

    class Replying(LocalExecutor):
        def __init__(self, reply):
            super().__init__(1)
            self.reply = reply

        def _probe(self, cache_dir, token):
            reply = probe_cache(cache_dir, token)
            return [{**reply, **self.reply}]

    with pytest.raises(ConfigError, match="which this machine does not see"):
        Replying({"ack": ".probe-elsewhere"}).prepare(tmp_path)
    with pytest.raises(ConfigError, match="runs flat-l2o-plugin 0.0.1, this machine"):
        Replying({"version": "0.0.1"}).prepare(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_probe_runs_once_per_folder(tmp_path):
    calls = []

    class Counting(LocalExecutor):
        def _probe(self, cache_dir, token):
            calls.append(cache_dir)
            return super()._probe(cache_dir, token)

    executor = Counting(1)
    assert executor.run([], tmp_path / "a") == [] and executor.run([], tmp_path / "a") == []
    executor.run([], tmp_path / "b")
    assert calls == [str((tmp_path / "a").resolve()), str((tmp_path / "b").resolve())]


def test_a_failing_job_is_reported_with_its_key_and_arguments_locally(tmp_path):
    good, bad = evaluation(0.01), evaluation(-1.0)
    done = []
    failures = LocalExecutor(1).run([good, bad], tmp_path, done.append)
    assert done == [good, bad]
    assert [f.job for f in failures] == [bad] and "Invalid learning rate" in failures[0].error
    assert "Traceback" in failures[0].trace
    assert JobCache(tmp_path).has(good.key) and not JobCache(tmp_path).has(bad.key)


# ---------------------------------------------------------------------------- SLURM's loop, without SLURM


class FakeSubmission:
    def __init__(self, outcome):
        self.outcome, self.job_id, self.cancelled = outcome, f"job{id(self)}", False

    def done(self):
        return True

    def result(self):
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome

    def cancel(self, check=True):
        self.cancelled = True


class FakeSubmitit:
    """Runs each chunk in this process; the SLURM jobs listed in ``lose`` vanish without a result."""

    def __init__(self, cache_dir, lose=()):
        self.cache_dir, self.lose, self.arrays, self.count = cache_dir, set(lose), [], 0

    def map_array(self, fn, chunks, dirs):
        self.arrays.append([len(c) for c in chunks])
        out = []
        for chunk in chunks:
            self.count += 1  # this SLURM job's number, counted over all submissions
            if self.count in self.lose:
                out.append(FakeSubmission(RuntimeError("UncompletedJobError: job was preempted")))
            else:
                out.append(FakeSubmission(fn(chunk, dirs[0])))
        return out


def test_slurm_deals_jobs_into_chunks_and_resubmits_a_lost_one(tmp_path):
    pytest.importorskip("submitit")
    jobs = [evaluation(lr) for lr in (0.001, 0.002, 0.003, 0.004, 0.005, -1.0)]
    executor = ex.SlurmExecutor(tmp_path / "jobs", workers=1, cluster="local")
    executor._executor = FakeSubmitit(str(tmp_path), lose={1})
    executor._started = True
    done = []
    failures = executor._run(jobs, str(tmp_path), done.append)
    # 6 jobs, 1 worker: 2 chunks dealt round-robin, one SLURM job at a time; the first is lost once.
    assert executor._executor.arrays == [[3], [3], [3]]
    assert sorted(j.key for j in done) == sorted(j.key for j in jobs)
    assert [f.job for f in failures] == [jobs[5]] and "Invalid learning rate" in failures[0].error
    assert all(JobCache(tmp_path).has(j.key) for j in jobs[:5])


def test_slurm_gives_up_on_a_job_lost_too_often(tmp_path):
    pytest.importorskip("submitit")
    jobs = [evaluation(0.01)]
    executor = ex.SlurmExecutor(tmp_path / "jobs", workers=1, cluster="local", retries=1)
    executor._executor = FakeSubmitit(str(tmp_path), lose={1, 2})
    executor._started = True
    failures = executor._run(jobs, str(tmp_path), lambda job: None)
    assert len(failures) == 1 and "was lost 2 times" in failures[0].error and "preempted" in failures[0].error


def test_slurm_without_sbatch_says_where_to_run(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setattr(ex.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="sbatch, which is not on PATH here"):
        ex.SlurmExecutor(tmp_path).start()


def test_slurm_parameters_submitit_refuses_are_named(tmp_path):
    pytest.importorskip("submitit")
    with pytest.raises(ConfigError, match="executor.slurm: submitit refuses the parameters.*partitionn"):
        ex.SlurmExecutor(tmp_path, cluster="local", parameters={"partitionn": "cpu"}).start()


# ---------------------------------------------------------------------------- progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_counts_jobs_and_estimates_the_time_left():
    now = [100.0]
    stream = Terminal()
    progress = TerminalProgress(stream, clock=lambda: now[0])
    progress.start("held-out evaluation", 4)
    assert progress.line() == "  held-out evaluation: 0/4 jobs done, estimating the time left"
    now[0] += 30
    progress.done(None)
    assert progress.line() == "  held-out evaluation: 1/4 jobs done, about 1 min 30 s left"
    now[0] += 90
    progress.done(None)
    progress.done(None)
    assert progress.line().endswith("3/4 jobs done, about 40 s left")
    progress.finish()
    assert stream.getvalue().count("\r") == 5 and stream.getvalue().endswith("\r\033[K")


def test_progress_is_quiet_when_not_on_a_terminal():
    stream = io.StringIO()
    progress = TerminalProgress(stream)
    progress.start("grids", 2)
    progress.done(None)
    progress.finish()
    assert stream.getvalue() == ""


def test_durations_read_naturally():
    assert [format_duration(s) for s in (0.4, 59, 61, 3599, 3600 + 5 * 60)] == \
        ["0 s", "59 s", "1 min 01 s", "59 min 59 s", "1 h 05 min"]


@pytest.mark.slow
def test_a_local_worker_killed_mid_study_is_replaced_and_its_jobs_run_again(tiny_study, tmp_path, same_results):
    import multiprocessing as mp
    import os
    import signal

    from flat_l2o_plugin.study.progress import Progress

    class KillAPoolProcess(Progress):
        killed: int | None = None

        def done(self, job):
            pool = [p for p in mp.active_children() if p.name.startswith("SpawnProcess")]
            if self.killed is None and pool:
                self.killed = pool[0].pid
                os.kill(self.killed, signal.SIGKILL)

    killer = KillAPoolProcess()
    with LocalExecutor(2) as executor:
        results = run_study(load_regime(HERE / "tiny_regime.toml"), tmp_path, executor=executor, progress=killer)
        pool = [p.pid for p in mp.active_children() if p.name.startswith("SpawnProcess")]
        assert killer.killed is not None and killer.killed not in pool and len(pool) == 2
    assert not [p for p in mp.active_children() if p.name.startswith("SpawnProcess")], "close() ends the pool"
    same_results(results, tiny_study[1])
