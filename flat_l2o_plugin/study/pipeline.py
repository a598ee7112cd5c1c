"""The study: tune baselines, meta-train candidates, choose on validation, evaluate on held-out tasks.

Phases, each a batch of cached jobs (:mod:`.jobs`):

1. **Baselines** are tuned per task (selection and held-out tasks) on validation
   optimizees: ``val_seeds`` validation init seeds, scored on the ``val`` split after
   ``eval_steps`` steps. Grids grow while a pick sits on an edge (:mod:`.grid`).
2. **Candidates** are meta-trained with ``candidate_meta_seeds`` seeds on their training
   tasks, and scored on the selection tasks' validation optimizees, deployed with the
   baselines' picks for each selection task where their ``deploy`` table says so; their
   untrained selves are scored alike.
3. **The headline**: the best ``headline`` candidates by validation, and those marked
   ``always``, are meta-trained up to ``meta_seeds`` seeds (with the candidates they name
   as ``reference``).
4. **Held-out evaluation**: each headline candidate (trained, and untrained where it is
   an ablation), and each baseline at its per-task pick, trains every held-out task from
   the evaluation seeds ``s(m, e) = m·E + e``: meta-seed m of a learned optimizer meets
   its own E seeds, and a hand-designed optimizer runs on all M·E of them, so every
   paired difference carries both sides' seed variance.

Nothing is selected on ``test``. Results are plain JSON (:func:`run_study` returns what
``results.json`` holds); :mod:`.report` turns them into tables and verdicts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..tasks.seeds import EVAL_SEEDS_START, VAL_SEEDS_START
from .grid import GridResult, search
from .executors import LocalExecutor, make_executor
from .jobs import Job, JobCache, JobFailure, StudyJobError, pending
from .progress import Progress
from .regime import Candidate, Regime, resolve_picks

__all__ = ["WALL_CLOCK_FIELDS", "Study", "eval_seed", "run_study", "without_wall_clock"]

WALL_CLOCK_FIELDS = ("seconds", "wall_seconds", "job_seconds")
"""The fields of results.json that time things; all else is the same wherever the jobs ran."""

Log = Callable[[str], None]


def eval_seed(meta_seed_index: int, eval_index: int, eval_seeds: int) -> int:
    """The optimizee seed of the ``eval_index``-th evaluation of the ``meta_seed_index``-th meta-seed."""
    return EVAL_SEEDS_START + meta_seed_index * eval_seeds + eval_index


def without_wall_clock(results: Any) -> Any:
    """``results`` without its :data:`WALL_CLOCK_FIELDS`, at any depth: what two executors must agree on."""
    if isinstance(results, Mapping):
        return {k: without_wall_clock(v) for k, v in results.items() if k not in WALL_CLOCK_FIELDS}
    if isinstance(results, list):
        return [without_wall_clock(v) for v in results]
    return results


def _mean(values: Iterable[float]) -> float:
    xs = [v for v in values if v == v]
    return statistics.fmean(xs) if xs else float("nan")


class Study:
    """One regime's study, run through an executor over a job cache in ``out``.

    Args:
        regime: The parsed regime.
        out: Folder for ``cache/`` and ``results.json``.
        executor: Anything with ``run(jobs, cache_dir, on_done) -> failures``
            (:mod:`.executors`); default a local process pool with the regime's ``workers``.
        log: Lines saying what each batch is (default: nothing).
        progress: Told of each batch and each finished job (default: nothing).
    """

    def __init__(self, regime: Regime, out: str | Path, *, executor: Any = None, log: Log | None = None,
                 progress: Progress | None = None) -> None:
        self.regime = regime
        self.budget = regime.budget
        self.out = Path(out)
        self.cache = JobCache(self.out / "cache")
        self.executor = executor or LocalExecutor(regime.budget.workers)
        self.log = log or (lambda line: None)
        self.progress = progress or Progress()
        self.failures: list[JobFailure] = []
        self.job_seconds = 0.0

    # ------------------------------------------------------------------ jobs

    def _run(self, jobs: Sequence[Job], what: str) -> list[dict[str, Any] | None]:
        """Run what is missing of ``jobs`` and return their results (None for a failed job)."""
        todo = pending(jobs, self.cache)
        if todo:
            self.log(f"  {what}: {len(todo)} of {len(jobs)} jobs to run")
            start = time.perf_counter()
            self.progress.start(what, len(todo))
            try:
                failures = self.executor.run(todo, self.cache.folder, self.progress.done)
            finally:
                self.progress.finish()
            self.job_seconds += time.perf_counter() - start
            self.failures += failures
            for failure in failures:
                self.log(f"    job {failure.job.key} failed: {failure.job.describe()}: {failure.error}")
        return [self.cache.load(job.key) if self.cache.has(job.key) else None for job in jobs]

    def _val_seeds(self) -> list[int]:
        return [VAL_SEEDS_START + i for i in range(self.budget.val_seeds)]

    def _evaluation(self, task_label: str, seed: int, *, split: str, learned: Mapping[str, Any] | None = None,
                    baseline: Mapping[str, Any] | None = None, flatness: bool = False,
                    curve_flatness: bool = False) -> Job:
        args: dict[str, Any] = {"task": list(self.regime.task(task_label)), "seed": seed,
                                "steps": self.budget.eval_steps, "split": split, "flatness": flatness}
        if flatness:
            args["entropy_gamma"] = self.budget.entropy_gamma
        if curve_flatness:
            args["curve_flatness"] = True
        if not flatness and not curve_flatness:
            args["curve_points"] = 1
        if learned is not None:
            args["learned"] = dict(learned)
        if baseline is not None:
            args["baseline"] = dict(baseline)
        return Job("evaluate", args)

    # ------------------------------------------------------------------ 1. baselines

    def _baseline_spec(self, label: str, point: Mapping[str, Any]) -> dict[str, Any]:
        base = self.regime.baselines[label]
        return {"name": base.optimizer, **base.fixed, **point}

    def tune_baselines(self) -> dict[str, dict[str, GridResult]]:
        """Grid-search every baseline on every selection and held-out task (validation)."""
        regime, seeds = self.regime, self._val_seeds()
        tasks = list(dict.fromkeys([*regime.selection, *regime.held_out]))
        from .grid import expand

        # Every initial grid at once, so the pool is full; the searches then find them cached.
        first = [self._evaluation(t, s, split="val", baseline=self._baseline_spec(b, p))
                 for b, base in regime.baselines.items() for t in tasks for p in expand(base.grid) for s in seeds]
        self._run(first, "baseline grids (validation)")
        out: dict[str, dict[str, GridResult]] = {}
        for label, base in regime.baselines.items():
            for task in tasks:
                def score(points: list[dict[str, Any]], label: str = label, task: str = task) -> list[float]:
                    jobs = [self._evaluation(task, s, split="val", baseline=self._baseline_spec(label, p))
                            for p in points for s in seeds]
                    results = self._run(jobs, f"grid extension: {label} on {task}")
                    accs = [r["val_accuracy"] if r is not None else float("nan") for r in results]
                    return [_mean(accs[i * len(seeds):(i + 1) * len(seeds)]) for i in range(len(points))]

                out.setdefault(label, {})[task] = search(base.grid, score, extend=base.extend,
                                                         max_extensions=self.budget.max_grid_extensions,
                                                         bounds=base.bounds)
        return out

    # ------------------------------------------------------------------ 2-3. candidates

    def meta_job(self, candidate: Candidate, seed: int) -> Job:
        """The job that meta-trains ``candidate`` with meta-seed ``seed`` (its key addresses the cache)."""
        regime = self.regime
        tasks = [list(regime.task(t)) for t in regime.trained_on(candidate)]
        args = {"optimizer": candidate.optimizer, "optimizer_options": candidate.options,
                "wrappers": candidate.wrappers, "tasks": tasks, "regularizers": candidate.regularizers,
                "trainer": {**regime.trainer, **candidate.trainer}, "seed": seed,
                "val_tasks": max(self.budget.val_seeds, len(tasks))}
        return Job("meta_train", args)

    def meta_train(self, candidates: Sequence[Candidate], seeds: int, what: str) -> dict[str, list[str]]:
        """Meta-train ``candidates`` with meta-seeds ``0..seeds-1``; returns their job keys."""
        jobs = {c.label: [self.meta_job(c, s) for s in range(seeds)] for c in candidates}
        self._run([j for js in jobs.values() for j in js], what)
        return {label: [j.key for j in js] for label, js in jobs.items()}

    def _learned(self, candidate: Candidate, picks: Mapping[str, Mapping[str, Any]], *,
                 weights_key: str | None, init_seed: int = 0) -> dict[str, Any]:
        """What an evaluation job needs to rebuild ``candidate``, deployed with ``picks``."""
        deploy = resolve_picks(candidate.deploy, picks)
        options = {**candidate.options, **deploy.get("options", {})}
        wrappers = [dict(w) for w in candidate.wrappers]
        for i, override in enumerate(deploy.get("wrappers", [])):
            wrappers[i].update(override)
        spec = {"name": candidate.optimizer, "options": options, "wrappers": wrappers}
        return {**spec, "weights_key": weights_key} if weights_key is not None else {**spec, "init_seed": init_seed}

    @staticmethod
    def _picks_for(grids: Mapping[str, Mapping[str, GridResult]], task: str) -> dict[str, dict[str, Any]]:
        return {label: dict(per_task[task].pick) for label, per_task in grids.items() if task in per_task}

    def select(self, grids: Mapping[str, Mapping[str, GridResult]], keys: Mapping[str, list[str]]
               ) -> dict[str, dict[str, Any]]:
        """Validation scores of every candidate (trained and untrained) on the selection tasks."""
        regime = self.regime
        tasks = list(regime.selection) or sorted({t for c in regime.candidates for t in regime.trained_on(c)})
        jobs, index = [], []
        for c in regime.candidates:
            for task in tasks:
                picks = self._picks_for(grids, task)
                for m, key in enumerate(keys[c.label]):
                    for s in self._val_seeds():
                        jobs.append(self._evaluation(task, s, split="val", learned=self._learned(c, picks, weights_key=key)))
                        index.append((c.label, "trained", task, m))
                if c.runs_untrained:
                    for s in self._val_seeds():
                        jobs.append(self._evaluation(task, s, split="val", learned=self._learned(c, picks, weights_key=None)))
                        index.append((c.label, "untrained", task, 0))
        results = self._run(jobs, "candidates on the selection tasks (validation)")
        scores: dict[str, dict[str, Any]] = {}
        for (label, kind, task, m), r in zip(index, results):
            entry = scores.setdefault(label, {"trained": {}, "untrained": {}})
            entry[kind].setdefault(task, []).append(r["val_accuracy"] if r is not None else float("nan"))
        for entry in scores.values():
            entry["trained_mean"] = _mean(v for vs in entry["trained"].values() for v in vs)
            entry["untrained_mean"] = _mean(v for vs in entry["untrained"].values() for v in vs)
        return scores

    def headline_candidates(self, scores: Mapping[str, Mapping[str, Any]]) -> list[Candidate]:
        """``always`` candidates, then the best ``headline`` ``auto`` ones by validation; then their references."""
        regime = self.regime
        auto = sorted((c for c in regime.candidates if c.headline == "auto"),
                      key=lambda c: -scores[c.label]["trained_mean"])
        chosen = [c for c in regime.candidates if c.headline == "always"] + auto[: self.budget.headline]
        labels = [c.label for c in chosen]
        for c in list(chosen):
            if c.reference is not None and c.reference not in labels:
                chosen.append(regime.candidate(c.reference))
                labels.append(c.reference)
        return chosen

    # ------------------------------------------------------------------ 4. held-out

    UNTRAINED_IS_STEPS = 5
    UNTRAINED_IS_RTOL = 1e-5
    """Float32 rounding (a changed summation order) moves the loss after 5 steps by about
    1e-7 relative; a 20% change of SAM's radius moves it by 2e-5 to 2e-3."""

    def _check_untrained_is(self, candidate: Candidate, picks: Mapping[str, Mapping[str, Any]], task: str) -> None:
        """Refuse a regime whose ``untrained_is`` baseline does not take the candidate's untrained steps."""
        from ..errors import ConfigError
        from ..training.experiment import evaluate

        common = {"task": list(self.regime.task(task)), "seed": VAL_SEEDS_START, "steps": self.UNTRAINED_IS_STEPS,
                  "split": "val", "flatness": False, "curve_points": 1}
        mine = evaluate(learned=self._learned(candidate, picks, weights_key=None), **common)
        label = candidate.untrained_is
        theirs = evaluate(baseline=self._baseline_spec(label, picks[label]), **common)
        for key in ("train_loss", "val_loss"):
            a, b = float(mine[key]), float(theirs[key])
            if not abs(a - b) <= self.UNTRAINED_IS_RTOL * max(abs(a), abs(b)):
                raise ConfigError(f"candidate {candidate.label!r}: untrained_is {label!r}, but on {task} its untrained "
                                  f"{key} after {self.UNTRAINED_IS_STEPS} steps is {a:.7g} against {label}'s {b:.7g}; "
                                  "they are not the same update (check its deploy picks)")

    def held_out(self, grids: Mapping[str, Mapping[str, GridResult]], headline: Sequence[Candidate],
                 keys: Mapping[str, list[str]]) -> list[dict[str, Any]]:
        """Every headline row and baseline on every held-out task, on the test split."""
        regime, budget = self.regime, self.budget
        m_count, e_count = budget.meta_seeds, budget.eval_seeds
        jobs, index = [], []
        measured = budget.flatness_seeds or e_count
        for t_index, task in enumerate(regime.held_out):
            picks = self._picks_for(grids, task)

            def add(row: str, kind: str, meta_seed: int | None, m: int, e: int, learned=None, baseline=None) -> None:
                # Flatness on the first `measured` seeds of each cluster; the plotted eigenvalue
                # curve (first held-out task) on the first.
                flatness = budget.flatness and e < measured
                curve = flatness and t_index == 0 and e == 0
                seed = eval_seed(m, e, e_count)
                jobs.append(self._evaluation(task, seed, split="test", learned=learned, baseline=baseline,
                                             flatness=flatness, curve_flatness=curve))
                index.append({"optimizer": row, "kind": kind, "task": task, "meta_seed": meta_seed, "seed": seed,
                              "curve": curve})

            for c in headline:
                if c.untrained_is is not None:
                    self._check_untrained_is(c, picks, task)
                for m in range(m_count):
                    learned = self._learned(c, picks, weights_key=keys[c.label][m])
                    for e in range(e_count):
                        add(c.label, "learned", m, m, e, learned=learned)
                    if c.runs_untrained and c.untrained_is is None:
                        untrained = self._learned(c, picks, weights_key=None, init_seed=m)
                        for e in range(e_count):
                            add(f"{c.label} (untrained)", "untrained", m, m, e, learned=untrained)
            for label in budget.held_out_baselines or regime.baselines:
                baseline = self._baseline_spec(label, picks[label])
                for m in range(m_count):
                    for e in range(e_count):
                        add(label, "baseline", None, m, e, baseline=baseline)
        results = self._run(jobs, "held-out evaluation (test split)")
        runs = []
        for meta, r in zip(index, results):
            with_curve = meta.pop("curve")
            if r is None:
                runs.append({**meta, "failed": True})
                continue
            runs.append({**meta, "test_accuracy": r["test_accuracy"], "test_loss": r["test_loss"],
                         "train_accuracy": r["train_accuracy"], "train_loss": r["train_loss"],
                         "top_eigenvalue": r["top_eigenvalue"], "smoothed_loss": r["smoothed_loss"],
                         "seconds": r["seconds"], "diverged_at": r["diverged_at"],
                         **({"curve": r["curve"]} if with_curve else {})})
        return runs

    # ------------------------------------------------------------------ all of it

    def run(self) -> dict[str, Any]:
        regime, budget = self.regime, self.budget
        start = time.perf_counter()
        self.log(f"[{regime.name}] {regime.description}")
        grids = self.tune_baselines()
        keys = self.meta_train(regime.candidates, budget.candidate_meta_seeds, "candidates (meta-training)")
        scores = self.select(grids, keys)
        headline = self.headline_candidates(scores)
        self.log(f"  headline: {[c.label for c in headline]}")
        keys.update(self.meta_train(headline, budget.meta_seeds, "headline rows (meta-training to all meta-seeds)"))
        runs = self.held_out(grids, headline, keys)
        meta_runs = []
        for c in regime.candidates:
            for m, key in enumerate(keys[c.label]):
                r = self.cache.load(key) if self.cache.has(key) else None
                if r is None:
                    meta_runs.append({"label": c.label, "meta_seed": m, "key": key, "failed": True})
                    continue
                meta_runs.append({"label": c.label, "meta_seed": m, "key": key,
                                  "best_val_accuracy": r["best_val_accuracy"], "best_step": r["best_step"],
                                  "skipped": r["skipped"], "seconds": r["seconds"],
                                  "weights_digest": r["weights_digest"], "validation": r["validation"],
                                  "never_learned": not r["best_val_accuracy"] > budget.failure_accuracy})
        if self.failures:
            report = self.out / "failed_jobs.json"
            from .._atomic import write_atomically

            write_atomically(report, json.dumps([{"key": f.job.key, "kind": f.job.kind, "args": f.job.args,
                                                  "error": f.error, "traceback": f.trace} for f in self.failures],
                                                 indent=1, default=str).encode(), OSError)
            names = " | ".join(f"{f.job.key} {f.job.describe()}: {f.error}" for f in self.failures)
            raise StudyJobError(f"{len(self.failures)} job(s) failed, the others are cached and a rerun retries "
                                f"only these (details in {report}): {names}")
        return {
            "regime": regime.source, "name": regime.name, "description": regime.description,
            "budget": dataclasses.asdict(budget),
            "grids": {label: {task: _grid_record(g) for task, g in per_task.items()} for label, per_task in grids.items()},
            "selection": scores, "headline": [c.label for c in headline],
            "candidates": [_candidate_record(c) for c in regime.candidates],
            "meta_runs": meta_runs, "runs": runs, "environment": environment(),
            "wall_seconds": time.perf_counter() - start, "job_seconds": self.job_seconds,
        }


def _grid_record(result: GridResult) -> dict[str, Any]:
    runner = result.runner_up()
    return {"pick": result.pick, "score": result.score, "grid": result.grid, "extensions": result.extensions,
            "on_edge": result.on_edge, "scores": [[p, s] for p, s in result.scores],
            "runner_up": None if runner is None else {"point": runner[0], "score": runner[1]}}


def _candidate_record(c: Candidate) -> dict[str, Any]:
    return {"label": c.label, "optimizer": c.optimizer, "options": c.options, "wrappers": c.wrappers,
            "train_on": list(c.train_on), "trainer": c.trainer, "regularizers": c.regularizers, "deploy": c.deploy,
            "untrained": c.runs_untrained, "untrained_is": c.untrained_is, "headline": c.headline,
            "reference": c.reference,
            "flatness_aware": c.flatness_aware}


def environment() -> dict[str, Any]:
    """What the numbers were computed with: versions, CPU, threads per job."""
    from importlib import metadata

    import numpy
    import torch

    try:
        version = metadata.version("flat-l2o-plugin")
    except metadata.PackageNotFoundError:
        version = None
    return {"flat_l2o_plugin": version, "python": sys.version.split()[0], "torch": torch.__version__,
            "numpy": numpy.__version__,
            "platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "threads_per_job": 1}


def _prepare(executor: Any, out: Path) -> None:
    """Start the executor and check its workers share ``out/cache``; a refusal leaves no folder behind."""
    created = [folder for folder in (out, out / "cache") if not folder.exists()]
    try:
        # An executor with only run() (the interface the study needs) checks nothing up front.
        if hasattr(executor, "prepare"):
            executor.prepare(out / "cache")
        else:
            (out / "cache").mkdir(parents=True, exist_ok=True)
    except BaseException:
        for folder in reversed(created):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def run_study(regime: Regime, out: str | Path, *, executor: Any = None, log: Log | None = None,
              progress: Progress | None = None) -> dict[str, Any]:
    """Run (or resume) ``regime``'s study in ``out`` and write ``out/results.json``.

    Args:
        regime: The parsed regime.
        out: The study's folder: ``cache/`` (every finished job), ``results.json``.
        executor: Where jobs run (:mod:`.executors`); default the regime's ``executor``
            (local unless it says otherwise), started here and stopped at the end.
        log: Lines saying what each batch is.
        progress: Told of each batch and each finished job (:mod:`.progress`).

    Raises:
        StudyJobError: Some jobs failed; every other job's result is cached, and running
            the same study again retries only what is missing.
        ConfigError: The executor's workers do not share ``out``.
        MissingExtraError: The regime's executor needs an extra that is not installed.
    """
    from .._atomic import write_atomically

    out = Path(out)
    owned = executor is None
    if owned:
        executor = make_executor(regime.executor.use, workers=regime.budget.workers, options=regime.executor,
                                 where="executor.use")
    try:
        _prepare(executor, out)
        # A resumed study's wall time is summed over the invocations that worked on it.
        elapsed_file = out / "elapsed.json"
        before = json.loads(elapsed_file.read_text())["seconds"] if elapsed_file.exists() else 0.0
        start = time.perf_counter()
        try:
            results = Study(regime, out, executor=executor, log=log, progress=progress).run()
        finally:
            total = before + time.perf_counter() - start
            write_atomically(elapsed_file, json.dumps({"seconds": total}).encode(), OSError)
    finally:
        if owned:
            executor.close()
    results["wall_seconds"] = total
    write_atomically(out / "results.json", json.dumps(results, indent=1, default=str).encode(), OSError)
    return results
