"""Where a study's jobs run: this machine's process pool, Dask, Ray, or SLURM through submitit.

Every executor does one thing, ``run(jobs, cache_dir, on_done) -> failures``: it ships
:func:`~.jobs.run_job_captured` with each job's plain data to a worker, which writes the
result into the cache folder, and it calls ``on_done(job)`` as each one ends. The cache
folder is the only thing the workers and the process driving the study share: it must
be the same path on every machine (a shared file system), and before its first job an
executor checks that from the workers' side (:func:`probe_cache`).

A job that raises comes back as an error with its traceback and the others go on. A
worker lost mid-job (killed, out of memory, a node gone) leaves no result, since
results are written atomically, and its job is run again: by the engine itself (Dask's
scheduler, Ray's task retries) or by the executor (a new process pool, a resubmitted
SLURM job), a bounded number of times.

Specs, as given to ``flat-l2o study --executor`` or a regime's ``[executor] use``::

    local                  this machine, `workers` processes (the default)
    dask                   a Dask LocalCluster of `workers` processes, one thread each
    dask://HOST:PORT       a running Dask scheduler
    ray                    Ray started on this machine with `workers` CPUs
    ray://HOST:PORT        a running Ray cluster (Ray Client)
    slurm:FOLDER           SLURM jobs through submitit, logs in FOLDER (on the shared file system)
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import socket
import time
import uuid
from collections import deque
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping, Sequence

from ..errors import ConfigError
from .jobs import Job, JobFailure, run_job_captured

__all__ = ["DaskExecutor", "Executor", "ExecutorSpec", "LocalExecutor", "RayExecutor", "SlurmExecutor",
           "executor_spec", "make_executor", "probe_cache"]

SPECS = "local, dask, dask://HOST:PORT, ray, ray://HOST:PORT or slurm:FOLDER"
OnDone = Callable[[Job], None]


# ---------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ExecutorSpec:
    """An executor as a regime file names it (its ``executor`` key).

    Attributes:
        use: The spec (see the module docstring), e.g. ``"dask://head:8786"``.
        slurm: submitit parameters for ``slurm:`` (``timeout_min``, ``mem_gb``,
            ``slurm_partition``, ``slurm_account``, ...).
    """

    use: str = "local"
    slurm: dict[str, Any] = field(default_factory=dict)


def _split(spec: str, where: str) -> tuple[str, str | None]:
    """``(engine, address or folder)`` of a spec; raises a one-line ConfigError naming ``where``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{where}: expected an executor ({SPECS}), got {spec!r}")
    spec = spec.strip()
    if spec in ("local", "dask", "ray"):
        return spec, None
    for engine in ("dask", "ray"):
        if spec.startswith(f"{engine}://"):
            host, _, port = spec[len(engine) + 3:].rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"{where}: {spec!r} must be {engine}://HOST:PORT with a port number")
            return engine, f"{host}:{port}"
    if spec.startswith("slurm:"):
        folder = spec[len("slurm:"):]
        if not folder:
            raise ConfigError(f"{where}: slurm:FOLDER needs a folder for submitit's job files, e.g. "
                              "slurm:/shared/me/study-jobs")
        return "slurm", folder
    raise ConfigError(f"{where}: unknown executor {spec!r}; expected {SPECS}")


def executor_spec(data: Any, where: str = "executor") -> ExecutorSpec:
    """A regime's ``executor`` value: a spec string or a table ``{use = ..., slurm = {...}}``.

    Raises:
        ConfigError: Naming the offending key.
    """
    if isinstance(data, str):
        data = {"use": data}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be an executor string ({SPECS}) or a table, got {data!r}")
    unknown = sorted(set(data) - {"use", "slurm"})
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; expected use or slurm")
    use = data.get("use", "local")
    _split(use, f"{where}.use")
    slurm = data.get("slurm", {})
    if not isinstance(slurm, Mapping):
        raise ConfigError(f"{where}.slurm must be a table of submitit parameters, got {slurm!r}")
    return ExecutorSpec(use=use.strip(), slurm=dict(slurm))


def make_executor(spec: str, *, workers: int = 2, options: ExecutorSpec | None = None,
                  where: str = "--executor") -> Executor:
    """The executor a spec names, not started yet (use it as a context manager).

    Args:
        spec: See the module docstring.
        workers: Jobs at once where this side decides (``local``, ``dask``, ``ray``, and
            the SLURM jobs in flight); a running Dask or Ray cluster uses what it has.
        options: The regime's executor table, for the ``slurm`` parameters.
        where: Names the setting in error messages.

    Raises:
        ConfigError: An unknown spec.
        MissingExtraError: The engine's extra is not installed (the message names it).
    """
    engine, target = _split(spec, where)
    if engine == "local":
        return LocalExecutor(workers)
    if engine == "dask":
        return DaskExecutor(target, workers=workers)
    if engine == "ray":
        return RayExecutor(target, workers=workers)
    return SlurmExecutor(target, workers=workers, parameters=(options or ExecutorSpec()).slurm)


def _engine(module: str, extra: str, spec: str) -> ModuleType:
    from .._extras import import_extra

    return import_extra(module, extra, f"executor {spec!r}")


# ---------------------------------------------------------------------------- the cache probe


def _version() -> str | None:
    from importlib import metadata

    from .._extras import DISTRIBUTION

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def probe_cache(cache_dir: str, token: str) -> dict[str, Any]:
    """Run on a worker: does it see the driver's token file in ``cache_dir``, and can it write there?

    Writes ``.probe-<token>-<host>-<pid>`` next to the token for the driver to find and
    remove. Returns the worker's host, package version, the file's name, and an error
    (``None`` when all is well).
    """
    host, pid = socket.gethostname(), os.getpid()
    reply: dict[str, Any] = {"host": host, "pid": pid, "version": _version(), "error": None, "ack": None}
    folder = Path(cache_dir)
    if not (folder / f".probe-{token}").is_file():
        reply["error"] = "does not see the file the study wrote there, so it is not the same folder"
        return reply
    ack = folder / f".probe-{token}-{host}-{pid}"
    try:
        ack.write_text(host)
    except OSError as exc:
        reply["error"] = f"cannot write it ({exc.strerror or exc})"
        return reply
    reply["ack"] = ack.name
    return reply


def _check_cache(name: str, cache_dir: str, ask: Callable[[str], list[dict[str, Any]]]) -> None:
    """Write a token into ``cache_dir``, let ``ask(token)`` probe it from the workers, and judge the replies."""
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    mine = folder / f".probe-{token}"
    mine.write_text("flat-l2o study cache probe")
    try:
        replies = ask(token)
        where = (f"every worker must see the study's folder at the same path (a shared file system) and be "
                 f"able to write it")
        for reply in replies:
            if reply["error"] is not None:
                raise ConfigError(f"executor {name}: the worker on {reply['host']} {reply['error']}: "
                                  f"{cache_dir}; {where}")
            if not (folder / reply["ack"]).is_file():
                raise ConfigError(f"executor {name}: the worker on {reply['host']} wrote {reply['ack']} in "
                                  f"{cache_dir}, which this machine does not see; {where}")
            ours = _version()
            if None not in (ours, reply["version"]) and reply["version"] != ours:
                raise ConfigError(f"executor {name}: the worker on {reply['host']} runs flat-l2o-plugin "
                                  f"{reply['version']}, this machine {ours}; install the same version everywhere")
    finally:
        for path in folder.glob(f".probe-{token}*"):
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- executors


def _outcome(job: Job, get: Callable[[], tuple[str, str | None, str]]) -> JobFailure | None:
    """The failure ``get()`` reports for ``job``, if any; an engine error means the worker was lost."""
    try:
        _, error, trace = get()
    except Exception as exc:  # noqa: BLE001 - KilledWorker, WorkerCrashedError, UncompletedJobError...
        error, trace = f"the worker running it was lost: {type(exc).__name__}: {exc}", ""
    return None if error is None else JobFailure(job, error, trace)


class Executor:
    """What the study needs of an executor; a context manager that starts and stops its engine.

    Subclasses implement :meth:`_run` (and :meth:`_start`, :meth:`_probe`, :meth:`close`
    where they hold an engine).
    """

    name = "executor"

    def __init__(self) -> None:
        self._started = False
        self._checked: set[str] = set()

    def __enter__(self) -> Executor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start or join the engine (done by the first :meth:`run` otherwise)."""
        if not self._started:
            self._start()
            self._started = True

    def close(self) -> None:
        """Stop what :meth:`start` started; a cluster it only joined keeps running."""

    def run(self, jobs: Sequence[Job], cache_dir: str | Path, on_done: OnDone | None = None) -> list[JobFailure]:
        """Run ``jobs`` (none of them cached) and return the ones that failed.

        Raises:
            ConfigError: A worker does not see ``cache_dir``, cannot write it, or runs
                another version of the package.
        """
        cache_dir = self.prepare(cache_dir)
        return self._run(list(jobs), cache_dir, on_done or (lambda job: None)) if jobs else []

    def prepare(self, cache_dir: str | Path) -> str:
        """Start the engine and check, once per folder, that its workers share ``cache_dir``.

        Returns:
            The folder's absolute path, as workers are given it.

        Raises:
            ConfigError: A worker does not see the folder, cannot write it, or runs another
                version of the package.
        """
        # Workers elsewhere resolve a relative path against their own working folder.
        cache_dir = str(Path(cache_dir).resolve())
        self.start()
        if cache_dir not in self._checked:
            _check_cache(self.name, cache_dir, lambda token: self._probe(cache_dir, token))
            self._checked.add(cache_dir)
        return cache_dir

    def _start(self) -> None:
        pass

    def _probe(self, cache_dir: str, token: str) -> list[dict[str, Any]]:
        return [probe_cache(cache_dir, token)]

    def _run(self, jobs: list[Job], cache_dir: str, on_done: OnDone) -> list[JobFailure]:
        raise NotImplementedError  # abstract: each engine runs its batch its own way


class LocalExecutor(Executor):
    """A pool of ``workers`` spawned processes on this machine (``workers`` = 1: in this process).

    The pool lives until :meth:`close`, so the study's many small batches do not each pay
    for starting Python and torch. A pool whose worker dies (killed, out of memory) is
    replaced and the jobs it lost run again, each at most ``attempts`` times in all.
    """

    name = "local"

    def __init__(self, workers: int = 2, *, attempts: int = 3) -> None:
        super().__init__()
        self.workers = max(1, int(workers))
        self.attempts = attempts
        self._pool: ProcessPoolExecutor | None = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        self._started = False

    def _run(self, jobs: list[Job], cache_dir: str, on_done: OnDone) -> list[JobFailure]:
        failures: list[JobFailure] = []
        if self.workers == 1:
            for job in jobs:
                failure = _outcome(job, lambda job=job: run_job_captured(job.kind, job.args, cache_dir))
                failures += [failure] if failure else []
                on_done(job)
            return failures
        tries = {job.key: 0 for job in jobs}
        todo = jobs
        while todo:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"))
            futures = {self._pool.submit(run_job_captured, job.kind, job.args, cache_dir): job for job in todo}
            lost: list[Job] = []
            for future in as_completed(futures):
                job = futures[future]
                if isinstance(future.exception(), BrokenProcessPool):
                    tries[job.key] += 1
                    if tries[job.key] < self.attempts:
                        lost.append(job)
                        continue
                failure = _outcome(job, future.result)
                failures += [failure] if failure else []
                on_done(job)
            if lost:  # a broken pool takes no more work: start another
                self.close()
                self._started = True
            todo = lost
        return failures


class DaskExecutor(Executor):
    """Jobs as Dask tasks: on a LocalCluster it starts (``address`` None) or a running scheduler.

    The scheduler runs a task again on another worker when its worker dies (up to its
    ``distributed.scheduler.allowed-failures`` setting, 3 by default).
    """

    def __init__(self, address: str | None = None, *, workers: int = 2) -> None:
        super().__init__()
        self.address, self.workers = address, max(1, int(workers))
        self.name = f"dask://{address}" if address else "dask"
        self._distributed = _engine("distributed", "dask", self.name)
        self.client: Any = None
        self._cluster: Any = None

    def _start(self) -> None:
        distributed = self._distributed
        try:
            if self.address is None:
                import dask

                # Dask's nanny sets OMP/MKL/OpenBLAS threads to 1 in every worker it starts and
                # hands it this configuration. Its stack sampler (100 Hz) takes the GIL from jobs
                # that are mostly small Python-level torch calls (benchmarks/study_executors.py).
                with dask.config.set({"distributed.worker.profile.enabled": False}):
                    self._cluster = distributed.LocalCluster(
                        n_workers=self.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                        dashboard_address=":0", silence_logs=logging.ERROR)
                self.client = distributed.Client(self._cluster)
            else:
                self.client = distributed.Client(f"tcp://{self.address}", timeout="30s")
        except OSError as exc:
            self.close()
            raise ConfigError(f"executor {self.name}: cannot reach the scheduler: {exc}") from exc

    def close(self) -> None:
        for thing in (self.client, self._cluster):
            if thing is not None:
                thing.close()
        self.client = self._cluster = None
        self._started = False

    def _probe(self, cache_dir: str, token: str) -> list[dict[str, Any]]:
        try:
            self.client.wait_for_workers(1, timeout=120)
        except TimeoutError as exc:
            raise ConfigError(f"executor {self.name}: the scheduler has no workers (waited 120 s)") from exc
        # client.run reaches every worker the scheduler knows.
        return list(self.client.run(probe_cache, cache_dir, token).values())

    def _run(self, jobs: list[Job], cache_dir: str, on_done: OnDone) -> list[JobFailure]:
        distributed = self._distributed
        futures = {self.client.submit(run_job_captured, job.kind, job.args, cache_dir, pure=False,
                                      key=f"{job.kind}-{job.key}-{uuid.uuid4().hex[:8]}"): job for job in jobs}
        failures: list[JobFailure] = []
        try:
            for future in distributed.as_completed(list(futures)):
                job = futures[future]
                failure = _outcome(job, future.result)
                failures += [failure] if failure else []
                on_done(job)
        finally:
            self.client.cancel([f for f in futures if not f.done()])
        return failures


class RayExecutor(Executor):
    """Jobs as Ray tasks (one CPU each): Ray started here (``address`` None) or a running cluster.

    Ray runs a task again when its worker process dies (``retries`` times).
    """

    def __init__(self, address: str | None = None, *, workers: int = 2, retries: int = 3) -> None:
        super().__init__()
        self.address, self.workers, self.retries = address, max(1, int(workers)), retries
        self.name = f"ray://{address}" if address else "ray"
        self._ray = _engine("ray", "ray", self.name)
        if address is not None:
            _engine("grpc", "ray", self.name)  # Ray Client talks gRPC; a bare `pip install ray` lacks it
        self._owned = False
        self._task: Any = None

    def _start(self) -> None:
        ray = self._ray
        if not ray.is_initialized():
            quiet = {"log_to_driver": False, "logging_level": logging.ERROR, "configure_logging": False}
            try:
                if self.address is None:
                    ray.init(num_cpus=self.workers, include_dashboard=False, **quiet)
                else:
                    ray.init(address=f"ray://{self.address}", **quiet)
            except ConnectionError as exc:
                raise ConfigError(f"executor {self.name}: cannot reach the cluster: {exc}") from exc
            self._owned = True
        self._task = ray.remote(num_cpus=1, max_retries=self.retries, retry_exceptions=False)(run_job_captured)

    def close(self) -> None:
        if self._owned:
            self._ray.shutdown()
            self._owned = False
        self._started = False

    def _probe(self, cache_dir: str, token: str) -> list[dict[str, Any]]:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ray = self._ray
        probes = [ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))(
            probe_cache).remote(cache_dir, token) for node in ray.nodes() if node["Alive"]]
        return ray.get(probes)

    def _run(self, jobs: list[Job], cache_dir: str, on_done: OnDone) -> list[JobFailure]:
        ray = self._ray
        refs = {self._task.remote(job.kind, job.args, cache_dir): job for job in jobs}
        waiting, failures = list(refs), []
        try:
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1)
                for ref in ready:
                    failure = _outcome(refs[ref], lambda ref=ref: ray.get(ref))
                    failures += [failure] if failure else []
                    on_done(refs[ref])
        finally:
            for ref in waiting:
                ray.cancel(ref, force=True)
        return failures


def _run_chunk(specs: list[tuple[str, dict[str, Any]]], cache_dir: str) -> list[tuple[str, str | None, str]]:
    """Run a SLURM job's share of a batch, one study job after another."""
    return [run_job_captured(kind, args, cache_dir) for kind, args in specs]


class SlurmExecutor(Executor):
    """SLURM jobs through submitit, at most ``workers`` in flight; submitit's files in ``folder``.

    A batch of study jobs is dealt round-robin into at most ``2 × workers`` SLURM jobs,
    each running its share in sequence: a scheduler handles hundreds of second-long
    evaluations badly, and every SLURM job pays for starting Python and torch. Each
    asks for one CPU; ``parameters`` are submitit's (``timeout_min``, default 180, must
    cover a share; ``slurm_partition``, ``mem_gb``...). A SLURM job that ends without a
    result (preempted, killed, out of time) is submitted again, ``retries`` times; the
    study jobs it had finished are cached and not run again. ``cluster="local"`` runs the
    same jobs as subprocesses of this machine (submitit's local executor), as tests do.
    """

    def __init__(self, folder: str | Path, *, workers: int = 2, parameters: Mapping[str, Any] | None = None,
                 cluster: str = "slurm", retries: int = 2, poll_seconds: float | None = None) -> None:
        super().__init__()
        self.folder, self.workers, self.cluster, self.retries = Path(folder), max(1, int(workers)), cluster, retries
        self.parameters = {"timeout_min": 180, **dict(parameters or {})}
        self.poll_seconds = poll_seconds if poll_seconds is not None else (0.2 if cluster == "local" else 10.0)
        self.name = f"slurm:{folder}"
        self._submitit = _engine("submitit", "slurm", self.name)
        self._executor: Any = None

    def _start(self) -> None:
        if self.cluster == "slurm" and shutil.which("sbatch") is None:
            raise ConfigError(f"executor {self.name} submits with sbatch, which is not on PATH here: run the study "
                              "on a SLURM login node")
        self._executor = self._submitit.AutoExecutor(folder=str(self.folder.resolve()), cluster=self.cluster)
        try:
            self._executor.update_parameters(**{"name": "flat-l2o-study", "nodes": 1, "tasks_per_node": 1,
                                                "cpus_per_task": 1, "slurm_array_parallelism": self.workers,
                                                **self.parameters})
        except (NameError, AssertionError, TypeError, ValueError) as exc:
            raise ConfigError(f"executor.slurm: submitit refuses the parameters {self.parameters}: "
                              f"{' '.join(str(exc).split())}") from exc

    def _probe(self, cache_dir: str, token: str) -> list[dict[str, Any]]:
        job = self._executor.submit(probe_cache, cache_dir, token)
        try:
            return [job.result()]
        except Exception as exc:  # noqa: BLE001 - the probe job itself never got to run
            raise ConfigError(f"executor {self.name}: the probe job {job.job_id} failed: "
                              f"{' '.join(str(exc).split())[:300]}") from exc

    def _run(self, jobs: list[Job], cache_dir: str, on_done: OnDone) -> list[JobFailure]:
        count = min(len(jobs), 2 * self.workers)
        queue = deque((jobs[i::count], 1) for i in range(count))
        running: dict[Any, tuple[list[Job], int]] = {}
        failures: list[JobFailure] = []
        try:
            while queue or running:
                free = min(self.workers - len(running), len(queue))
                if free > 0:
                    batch = [queue.popleft() for _ in range(free)]
                    submitted = self._executor.map_array(
                        _run_chunk, [[(job.kind, job.args) for job in chunk] for chunk, _ in batch],
                        [cache_dir] * len(batch))
                    running.update(zip(submitted, batch))
                ended = [submission for submission in running if submission.done()]
                if not ended:
                    time.sleep(self.poll_seconds)
                    continue
                for submission in ended:
                    chunk, attempt = running.pop(submission)
                    try:
                        outcomes = submission.result()
                    except Exception as exc:  # noqa: BLE001 - it ended without returning: killed, preempted
                        if attempt <= self.retries:
                            queue.appendleft((chunk, attempt + 1))
                            continue
                        lost = (f"the SLURM job running it ({submission.job_id}) was lost {attempt} times; last: "
                                f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
                        outcomes = [(job.key, lost, "") for job in chunk]
                    for job, (_, error, trace) in zip(chunk, outcomes):
                        if error is not None:
                            failures.append(JobFailure(job, error, trace))
                        on_done(job)
        finally:
            for submission in running:
                submission.cancel(check=False)
        return failures
