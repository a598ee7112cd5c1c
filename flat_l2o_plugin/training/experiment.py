"""Picklable building blocks for experiments: meta-train one optimizer, evaluate one run.

The demo and the benchmarks describe each job with plain data (names, options, seeds),
so jobs can run side by side in worker processes, one core each, and every job rebuilds
its optimizer and task from the registry exactly as a user would.

Init seeds are partitioned so that meta-training never sees an evaluation optimizee:
evaluation < 100 <= validation < 1000 <= meta-training.
"""

from __future__ import annotations

import importlib
import math
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import ConfigError
from ..tasks.families import UniformTasks
# The seed partition belongs to the tasks; re-exported here, its former home.
from ..tasks.seeds import EVAL_SEEDS_START, TRAIN_SEEDS_START, VAL_SEEDS_START
from .seeding import seed_everything

__all__ = ["EVAL_SEEDS_START", "VAL_SEEDS_START", "TRAIN_SEEDS_START", "meta_train", "evaluate", "run_jobs",
           "baseline_class", "smoothed_loss"]

TaskSpec = tuple[str, Mapping[str, Any]]


def _task(spec: TaskSpec):  # noqa: ANN202
    from .. import create_task

    name, options = spec
    return create_task(name, **dict(options))


def _learned_optimizer(name: str, options: Mapping[str, Any] | None,
                       wrappers: Sequence[Mapping[str, Any]] | None):  # noqa: ANN202
    from .. import create_optimizer
    from ..wrappers import wrap

    return wrap(create_optimizer(name, **dict(options or {})), list(wrappers or []))


def meta_train(*, optimizer: str = "rnnprop", optimizer_options: Mapping[str, Any] | None = None,
               wrappers: Sequence[Mapping[str, Any]] | None = None,
               task: TaskSpec = ("mlp_digits", {}), tasks: Sequence[TaskSpec] | None = None,
               regularizers: Mapping[str, Any] | None = None,
               trainer: Mapping[str, Any] | None = None, seed: int = 0, val_tasks: int = 3,
               threads: int | None = 1) -> dict[str, Any]:
    """Meta-train a registered learned optimizer; returns its best weights and the logs.

    ``wrappers`` (``[{"name": ..., **options}]``, innermost first) are stacked around the
    optimizer with :func:`~flat_l2o_plugin.wrappers.wrap`, in meta-training as at test
    time. ``tasks``, when given, replaces ``task`` by a task family: each trajectory
    draws one of them uniformly (other architectures, other datasets), and validation
    cycles through them (:class:`~flat_l2o_plugin.tasks.families.UniformTasks`, the
    sampler ``flat-l2o meta-train`` uses for ``[[tasks]]`` too). Meta-training init seeds are drawn from
    ``[TRAIN_SEEDS_START, ...)``; validation uses ``val_tasks`` optimizees with seeds
    from ``VAL_SEEDS_START`` and their ``val`` split.
    """
    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed)
    from .. import FlatL2O
    from .meta_trainer import MetaTrainConfig, MetaTrainer

    model = _learned_optimizer(optimizer, optimizer_options, wrappers)
    family = UniformTasks([_task(spec) for spec in (tasks if tasks else [task])])
    config = MetaTrainConfig(**{**dict(trainer or {}), "seed": seed})
    runner = MetaTrainer(model, family, flat=FlatL2O(dict(regularizers or {})), config=config,
                         val_tasks=family.validation_tasks(val_tasks))
    result = runner.train()
    return {"optimizer": optimizer, "optimizer_options": dict(optimizer_options or {}),
            "wrappers": [dict(w) for w in wrappers or []], "seed": seed,
            "regularizers": dict(regularizers or {}),
            "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "best_val_accuracy": result.best_score, "best_step": result.best_step, "skipped": result.skipped,
            "seconds": result.seconds, "validation": result.validation,
            "history": [{k: v for k, v in h.items() if isinstance(v, (int, float, bool))} for h in result.history]}


def _baselines() -> dict[str, type[torch.optim.Optimizer]]:
    from ..baselines import SAM, EntropySGD

    return {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "sam": SAM,
            "entropy_sgd": EntropySGD}


def baseline_class(name: str) -> type[torch.optim.Optimizer]:
    """A hand-designed optimizer by name: ``"adam"``, ``"adamw"``, ``"sgd"``, ``"sam"``,
    ``"entropy_sgd"`` (:mod:`flat_l2o_plugin.baselines`), or ``"module:Class"`` for any
    importable ``torch.optim.Optimizer``."""
    known = _baselines()
    if name in known:
        return known[name]
    module, _, attr = name.partition(":")
    if not attr:
        raise ConfigError(f"baseline name {name!r}: expected one of {', '.join(sorted(known))} or 'module:Class'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"baseline name {name!r}: cannot import it ({exc})") from exc


def smoothed_loss(loss_fn: Callable[[list[torch.Tensor]], torch.Tensor], params: Sequence[torch.Tensor], *,
                  gamma: float, samples: int = 64, seed: int = 0) -> float:
    """−log E_ε exp(−f(θ+ε)), ε ~ N(0, I/γ): the local entropy −F(θ;γ) without its constant.

    F(θ;γ) = (d/2)·log(2π/γ) + log E_ε exp(−f(θ+ε)); the constant depends only on the
    parameter count, so this is comparable with f(θ) itself: the excess over f(θ) is 0
    on a perfectly flat neighbourhood and grows with sharpness at scale 1/√γ.
    """
    from ..regularizers import LocalEntropy

    d = sum(p.numel() for p in params)
    # Independent draws: the study's committed measure (a log-mean-exp gains nothing from
    # mirrored pairs, which the regularizer uses to steady its gradient).
    estimator = LocalEntropy(gamma=gamma, samples=samples, estimator="smoothing", seed=seed, antithetic=False)
    with torch.no_grad():
        negative_f = float(estimator([p.detach() for p in params], loss_fn))
    return negative_f + 0.5 * d * math.log(2 * math.pi / gamma)


def evaluate(*, learned: Mapping[str, Any] | None = None, baseline: Mapping[str, Any] | None = None,
             task: TaskSpec = ("mlp_digits", {}), seed: int = 0, steps: int = 200, split: str = "test",
             curve_points: int = 20, flatness: bool = True, entropy_gamma: float = 1000.0,
             curve_flatness: bool = False, threads: int | None = 1) -> dict[str, Any]:
    """Train a fresh optimizee ``task`` (init ``seed``) and measure it on ``split`` at the end.

    Args:
        learned: ``{"name", "options", "wrappers", "state_dict"}`` of a meta-trained
            optimizer (``options`` and ``wrappers`` optional). Without ``state_dict`` the
            optimizer runs untrained, with the weights it is built with after
            ``torch.manual_seed(learned["init_seed"])`` (default 0).
        baseline: ``{"name": "adam" | "sgd" | "module:Class", "lr": ..., **kwargs}`` for a
            ``torch.optim`` optimizer (see :func:`baseline_class`).
        flatness: Also measure, at the final point on the whole training set, the top
            Hessian eigenvalue (cold power iteration, up to 50 steps) and the smoothed loss
            at scope ``entropy_gamma`` (:func:`smoothed_loss`).
        curve_flatness: Also measure the top eigenvalue at every curve point.
    """
    if (learned is None) == (baseline is None):
        raise ValueError("evaluate needs exactly one of learned= or baseline=")
    if threads:
        torch.set_num_threads(threads)
    from ..regularizers import HessianTopEigenvalue
    from .evaluate import train_with_learned_optimizer, train_with_torch_optimizer

    optimizee = _task(task)
    every = max(1, steps // curve_points)
    x, y = optimizee.full_batch("train")

    def full_loss(p: Sequence[torch.Tensor]) -> torch.Tensor:
        return optimizee.loss(p, (x, y))

    def top_eigenvalue(params: list[torch.Tensor]) -> float:
        if not all(torch.isfinite(p).all() for p in params):
            return math.nan
        estimator = HessianTopEigenvalue(iters=50, warm_start=False, tol=1e-4, seed=0)
        estimator([p.detach() for p in params], full_loss)
        return estimator.last_value

    probe = (lambda params: {"top_eigenvalue": top_eigenvalue(params)}) if curve_flatness else None
    start = time.perf_counter()
    if learned is not None:
        if "state_dict" not in learned:
            # Untrained: the optimizer as built from a seeded RNG (an ablation's reference).
            torch.manual_seed(int(learned.get("init_seed", 0)))
        model = _learned_optimizer(learned["name"], learned.get("options"), learned.get("wrappers"))
        if "state_dict" in learned:
            model.load_state_dict(learned["state_dict"])
        run = train_with_learned_optimizer(model, optimizee, seed, steps, eval_every=every, eval_splits=(split,),
                                           probe=probe)
    else:
        kwargs = {k: v for k, v in baseline.items() if k != "name"}
        opt_class = baseline_class(baseline["name"])
        run = train_with_torch_optimizer(lambda p: opt_class(p, **kwargs), optimizee, seed, steps,
                                         eval_every=every, eval_splits=(split,), probe=probe)
    seconds = time.perf_counter() - start
    final = optimizee.evaluate(run.params, split)
    train = optimizee.evaluate(run.params, "train")
    eigenvalue = entropy = math.nan
    if flatness and run.diverged_at is None and math.isfinite(train["loss"]):
        eigenvalue = top_eigenvalue(run.params)
        entropy = smoothed_loss(full_loss, run.params, gamma=entropy_gamma, seed=seed)
    curve = {"step": run.steps, "train_loss": run.train_loss,
             f"{split}_accuracy": [m[f"{split}_accuracy"] for m in run.eval_metrics]}
    if curve_flatness:
        curve["top_eigenvalue"] = [m["top_eigenvalue"] for m in run.eval_metrics]
    return {"task": task[0], "task_options": dict(task[1]), "seed": seed, "steps": steps,
            f"{split}_accuracy": final["accuracy"], f"{split}_loss": final["loss"],
            "train_loss": train["loss"], "train_accuracy": train["accuracy"], "top_eigenvalue": eigenvalue,
            "smoothed_loss": entropy, "entropy_gamma": entropy_gamma, "seconds": seconds,
            "diverged_at": run.diverged_at, "curve": curve}


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
