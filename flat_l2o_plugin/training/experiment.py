"""Picklable building blocks for experiments: meta-train one optimizer, evaluate one run.

The demo and the benchmarks describe each job with plain data (names, options, seeds),
so jobs can run side by side in worker processes, one core each, and every job rebuilds
its optimizer and task from the registry exactly as a user would.

Init seeds are partitioned so that meta-training never sees an evaluation optimizee:
evaluation < 100 <= validation < 1000 <= meta-training.
"""

from __future__ import annotations

import math
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = ["EVAL_SEEDS_START", "VAL_SEEDS_START", "TRAIN_SEEDS_START", "meta_train", "evaluate", "run_jobs"]

EVAL_SEEDS_START, VAL_SEEDS_START, TRAIN_SEEDS_START = 0, 100, 1000

TaskSpec = tuple[str, Mapping[str, Any]]


def _task(spec: TaskSpec):  # noqa: ANN202
    from .. import create_task

    name, options = spec
    return create_task(name, **dict(options))


def meta_train(*, optimizer: str = "rnnprop", optimizer_options: Mapping[str, Any] | None = None,
               task: TaskSpec = ("mlp_digits", {}), regularizers: Mapping[str, Any] | None = None,
               trainer: Mapping[str, Any] | None = None, seed: int = 0, val_tasks: int = 3,
               threads: int | None = 1) -> dict[str, Any]:
    """Meta-train a registered learned optimizer; returns its best weights and the logs.

    Meta-training init seeds are drawn from ``[TRAIN_SEEDS_START, ...)``; validation uses
    ``val_tasks`` optimizees with seeds from ``VAL_SEEDS_START`` and their ``val`` split.
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    from .. import FlatL2O, create_optimizer
    from .meta_trainer import MetaTrainConfig, MetaTrainer

    model = create_optimizer(optimizer, **dict(optimizer_options or {}))
    optimizee = _task(task)

    def sample(generator: torch.Generator):  # noqa: ANN202
        return optimizee, TRAIN_SEEDS_START + int(torch.randint(0, 10**6, (1,), generator=generator))

    config = MetaTrainConfig(**{**dict(trainer or {}), "seed": seed})
    runner = MetaTrainer(model, sample, flat=FlatL2O(dict(regularizers or {})), config=config,
                         val_tasks=[(optimizee, VAL_SEEDS_START + i) for i in range(val_tasks)])
    result = runner.train()
    return {"optimizer": optimizer, "optimizer_options": dict(optimizer_options or {}), "seed": seed,
            "regularizers": dict(regularizers or {}),
            "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "best_val_accuracy": result.best_score, "best_step": result.best_step, "skipped": result.skipped,
            "seconds": result.seconds, "validation": result.validation,
            "history": [{k: v for k, v in h.items() if isinstance(v, (int, float, bool))} for h in result.history]}


def evaluate(*, learned: Mapping[str, Any] | None = None, baseline: Mapping[str, Any] | None = None,
             task: TaskSpec = ("mlp_digits", {}), seed: int = 0, steps: int = 200, split: str = "test",
             curve_points: int = 20, flatness: bool = True, threads: int | None = 1) -> dict[str, Any]:
    """Train a fresh optimizee ``task`` (init ``seed``) and measure it on ``split`` at the end.

    Args:
        learned: ``{"name", "options", "state_dict"}`` of a meta-trained optimizer.
        baseline: ``{"name": "adam" | "sgd", "lr": ..., **kwargs}`` for a torch.optim baseline.
        flatness: Also measure the top Hessian eigenvalue of the full training loss at the
            final point (50 cold power iterations).
    """
    if (learned is None) == (baseline is None):
        raise ValueError("evaluate needs exactly one of learned= or baseline=")
    if threads:
        torch.set_num_threads(threads)
    from .. import create_optimizer
    from ..regularizers import HessianTopEigenvalue
    from .evaluate import train_with_learned_optimizer, train_with_torch_optimizer

    optimizee = _task(task)
    every = max(1, steps // curve_points)
    if learned is not None:
        model = create_optimizer(learned["name"], **dict(learned.get("options") or {}))
        model.load_state_dict(learned["state_dict"])
        run = train_with_learned_optimizer(model, optimizee, seed, steps, eval_every=every, eval_splits=(split,))
    else:
        kwargs = {k: v for k, v in baseline.items() if k != "name"}
        opt_class = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[baseline["name"]]
        run = train_with_torch_optimizer(lambda p: opt_class(p, **kwargs), optimizee, seed, steps,
                                         eval_every=every, eval_splits=(split,))
    final = optimizee.evaluate(run.params, split)
    train = optimizee.evaluate(run.params, "train")
    eigenvalue = math.nan
    if flatness and run.diverged_at is None:
        x, y = optimizee.full_batch("train")
        estimator = HessianTopEigenvalue(iters=50, warm_start=False, tol=1e-4, seed=0)
        estimator([p.detach() for p in run.params], lambda p: optimizee.loss(p, (x, y)))
        eigenvalue = estimator.last_value
    return {"task": task[0], "task_options": dict(task[1]), "seed": seed, "steps": steps,
            f"{split}_accuracy": final["accuracy"], f"{split}_loss": final["loss"],
            "train_loss": train["loss"], "train_accuracy": train["accuracy"], "top_eigenvalue": eigenvalue,
            "diverged_at": run.diverged_at,
            "curve": {"step": run.steps, "train_loss": run.train_loss,
                      f"{split}_accuracy": [m[f"{split}_accuracy"] for m in run.eval_metrics]}}


def run_jobs(fn: Callable[..., Any], jobs: Sequence[Mapping[str, Any]], *, workers: int = 2,
             on_done: Callable[[], None] | None = None) -> list[Any]:
    """``[fn(**job) for job in jobs]``, in ``workers`` processes (spawned, one thread each)."""
    done = on_done or (lambda: None)
    if workers <= 1:
        results = []
        for job in jobs:
            results.append(fn(**job))
            done()
        return results
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(fn, **job) for job in jobs]
        for future in futures:
            future.add_done_callback(lambda _: done())
        return [f.result() for f in futures]
