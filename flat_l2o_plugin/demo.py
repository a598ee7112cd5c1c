"""``flat-l2o demo``: the claim, tested on the bundled digits data in a few minutes.

RNNProp is meta-trained on the MLP 64-20-10 (sigmoid) on digits twice per
meta-training seed, with the same seeds and budget: once with the Hessian top-eigenvalue
regularizer in the meta-loss and once without. The weight α is picked by a small sweep
scored on *validation* tasks (the ``val`` split of optimizees with reserved seeds).
Every learned optimizer keeps its best checkpoint by the same validation score. Then
fresh held-out optimizees (unseen init seeds, a ReLU MLP, a deeper MLP) are trained
with each learned optimizer and with Adam (learning rate also picked on validation),
and the ``test`` split is measured once, at the end.

The table reports what happened, whatever it is.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["DemoConfig", "run_demo", "format_table"]

# Init seeds: held-out evaluation < 100 <= validation < 1000 <= meta-training.
EVAL_SEEDS_START, VAL_SEEDS_START, TRAIN_SEEDS_START = 0, 100, 1000

HELD_OUT_TASKS: dict[str, dict[str, Any]] = {
    "mlp_sigmoid_unseen_seeds": {"activation": "sigmoid", "hidden_sizes": (20,)},
    "mlp_relu": {"activation": "relu", "hidden_sizes": (20,)},
    "mlp_deeper": {"activation": "sigmoid", "hidden_sizes": (20, 20)},
}


@dataclass
class DemoConfig:
    """The demo's budget. ``quick()`` is a smoke-test budget whose numbers mean nothing."""

    meta_steps: int = 150
    unroll: int = 20
    horizon: int = 100
    meta_lr: float = 3e-3
    meta_seeds: tuple[int, ...] = (0, 1, 2)
    alphas: tuple[float, ...] = (0.03, 0.1, 0.3)
    schedule: dict[str, Any] = field(default_factory=lambda: {"start_fraction": 0.5})
    val_tasks: int = 3
    val_every: int = 50
    eval_seeds: int = 5
    eval_steps: int = 200
    adam_lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    workers: int = 2

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(meta_steps=4, unroll=5, horizon=10, meta_seeds=(0,), alphas=(0.1,), val_tasks=1,
                   val_every=2, eval_seeds=2, eval_steps=10, adam_lrs=(1e-2,), workers=1)


# ---------------------------------------------------------------------------- jobs
# Module-level functions so that they can run in worker processes.


def _task(name: str = "mlp_sigmoid_unseen_seeds"):  # noqa: ANN202
    from . import create_task

    return create_task("mlp_digits", **HELD_OUT_TASKS[name])


def _val_tasks(cfg: DemoConfig) -> list:
    task = _task()
    return [(task, VAL_SEEDS_START + i) for i in range(cfg.val_tasks)]


def _meta_train_job(cfg: DemoConfig, alpha: float, seed: int) -> dict[str, Any]:
    torch.set_num_threads(1)  # jobs run side by side, one per core
    torch.manual_seed(seed)
    from . import FlatL2O, create_optimizer
    from .training import MetaTrainConfig, MetaTrainer

    task = _task()

    def sample(generator: torch.Generator):  # noqa: ANN202
        return task, TRAIN_SEEDS_START + int(torch.randint(0, 10**6, (1,), generator=generator))

    regs = {} if alpha == 0 else {"hessian_top_eigenvalue": {"weight": alpha, **cfg.schedule}}
    optimizer = create_optimizer("rnnprop")
    trainer = MetaTrainer(optimizer, sample, flat=FlatL2O(regs), val_tasks=_val_tasks(cfg), config=MetaTrainConfig(
        meta_steps=cfg.meta_steps, unroll=cfg.unroll, horizon=cfg.horizon, meta_lr=cfg.meta_lr, seed=seed,
        val_every=cfg.val_every, val_steps=cfg.horizon))
    result = trainer.train()
    return {"alpha": alpha, "seed": seed, "state_dict": {k: v.clone() for k, v in optimizer.state_dict().items()},
            "best_val_accuracy": result.best_score, "best_step": result.best_step, "skipped": result.skipped,
            "seconds": result.seconds, "validation": result.validation,
            "final_loss": result.history[-1].get("loss")}


def _make_optimizer(spec: dict[str, Any]):  # noqa: ANN202
    """A ``step_fn`` factory for an optimizer spec: a learned one (state dict) or Adam."""
    from . import create_optimizer

    if spec["kind"] == "adam":
        return None
    optimizer = create_optimizer("rnnprop")
    optimizer.load_state_dict(spec["state_dict"])
    return optimizer


def _evaluate_job(cfg: DemoConfig, spec: dict[str, Any], task_name: str, seed: int,
                  split: str = "test") -> dict[str, Any]:
    torch.set_num_threads(1)
    from .regularizers import HessianTopEigenvalue
    from .training import train_with_learned_optimizer, train_with_torch_optimizer

    task = _task(task_name)
    every = max(1, cfg.eval_steps // 20)
    optimizer = _make_optimizer(spec)
    if optimizer is None:
        run = train_with_torch_optimizer(lambda p: torch.optim.Adam(p, lr=spec["lr"]), task, seed, cfg.eval_steps,
                                         eval_every=every, eval_splits=(split,))
    else:
        run = train_with_learned_optimizer(optimizer, task, seed, cfg.eval_steps, eval_every=every,
                                           eval_splits=(split,))
    final = task.evaluate(run.params, split)
    train = task.evaluate(run.params, "train")
    x, y = task.full_batch("train")
    eig = math.nan
    if run.diverged_at is None:
        eig_reg = HessianTopEigenvalue(iters=50, warm_start=False, tol=1e-4, seed=0)
        eig_reg([p.detach() for p in run.params], lambda p: task.loss(p, (x, y)))
        eig = eig_reg.last_value
    return {"optimizer": spec["name"], "task": task_name, "seed": seed,
            f"{split}_accuracy": final["accuracy"], "train_loss": train["loss"], "train_accuracy": train["accuracy"],
            "top_eigenvalue": eig, "diverged_at": run.diverged_at,
            "curve": {"step": run.steps, "train_loss": run.train_loss,
                      f"{split}_accuracy": [m[f"{split}_accuracy"] for m in run.eval_metrics]}}


# ---------------------------------------------------------------------------- driver


def _pool_map(fn: Callable[..., Any], args: list[tuple], workers: int,
              on_done: Callable[[], None]) -> list[Any]:
    if workers <= 1:
        out = []
        for a in args:
            out.append(fn(*a))
            on_done()
        return out
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(fn, *a) for a in args]
        for f in futures:
            f.add_done_callback(lambda _: on_done())
        return [f.result() for f in futures]


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def run_demo(out_dir: str | os.PathLike[str] = "runs/demo", *, config: DemoConfig | None = None,
             progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo and write ``results.json``, ``table.txt`` and ``curves.png`` into ``out_dir``."""
    cfg = config or DemoConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sweep = [(cfg, a, cfg.meta_seeds[0]) for a in cfg.alphas]
    main_alphas_seeds = [(cfg, 0.0, s) for s in cfg.meta_seeds]
    n_eval = (2 * len(cfg.meta_seeds) + 1) * len(HELD_OUT_TASKS) * cfg.eval_seeds
    n_jobs = len(sweep) + 2 * len(cfg.meta_seeds) - 1 + len(cfg.adam_lrs) * cfg.val_tasks + n_eval
    bar = _bar(n_jobs, progress)

    log(f"[1/3] meta-training: α sweep {list(cfg.alphas)} on validation tasks, and the unregularized "
        f"optimizer, seeds {list(cfg.meta_seeds)}")
    trained = _pool_map(_meta_train_job, sweep + main_alphas_seeds, cfg.workers, bar)
    sweep_runs = trained[: len(sweep)]
    best = max(sweep_runs, key=lambda r: r["best_val_accuracy"])
    alpha = best["alpha"]
    log(f"      sweep (val accuracy): " + ", ".join(f"α={r['alpha']:g}: {r['best_val_accuracy']:.3f}"
                                                       for r in sweep_runs) + f" -> α={alpha:g}")
    more = _pool_map(_meta_train_job, [(cfg, alpha, s) for s in cfg.meta_seeds[1:]], cfg.workers, bar)
    regularized = [best, *more]
    plain = trained[len(sweep):]

    log("[2/3] Adam baseline: learning rate picked on validation tasks")
    adam_args = [(lr, VAL_SEEDS_START + i) for lr in cfg.adam_lrs for i in range(cfg.val_tasks)]
    adam_val = _pool_map(_evaluate_job, [(cfg, {"name": "adam", "kind": "adam", "lr": lr}, "mlp_sigmoid_unseen_seeds",
                                          seed, "val") for lr, seed in adam_args], cfg.workers, bar)
    adam_scores = {lr: statistics.fmean(r["val_accuracy"] for (l, _), r in zip(adam_args, adam_val) if l == lr)
                   for lr in cfg.adam_lrs}
    adam_lr = max(adam_scores, key=adam_scores.__getitem__)

    log("[3/3] held-out optimizees: training each with every optimizer, test split measured at the end")
    label_reg = f"rnnprop+hessian(α={alpha:g})"
    specs = [{"name": "rnnprop", "kind": "learned", "state_dict": r["state_dict"], "meta_seed": r["seed"]}
             for r in plain]
    specs += [{"name": label_reg, "kind": "learned", "state_dict": r["state_dict"], "meta_seed": r["seed"]}
              for r in regularized]
    specs.append({"name": f"adam(lr={adam_lr:g})", "kind": "adam", "lr": adam_lr})
    eval_args = [(cfg, spec, task, EVAL_SEEDS_START + i) for spec in specs for task in HELD_OUT_TASKS
                 for i in range(cfg.eval_seeds)]
    evaluations = _pool_map(_evaluate_job, eval_args, cfg.workers, bar)
    for (_, spec, _, _), ev in zip(eval_args, evaluations):
        ev["meta_seed"] = spec.get("meta_seed")
    bar.close()

    rows = summarize(evaluations)
    seconds = time.perf_counter() - start
    results = {
        "config": asdict(cfg), "alpha": alpha, "adam_lr": adam_lr, "seconds": seconds,
        "sweep": [{k: r[k] for k in ("alpha", "seed", "best_val_accuracy", "best_step", "skipped")} for r in sweep_runs],
        "meta_training": [{k: r[k] for k in ("alpha", "seed", "best_val_accuracy", "best_step", "skipped", "seconds",
                                             "validation")} for r in [*plain, *regularized]],
        "table": rows, "runs": evaluations,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = format_table(rows)
    (out / "table.txt").write_text(table + "\n")
    plot_curves(evaluations, out / "curves.png")
    log("")
    log(table)
    log(f"\nα={alpha:g} (schedule {cfg.schedule}), Adam lr={adam_lr:g}; {seconds / 60:.1f} min. "
        f"Wrote {out / 'results.json'}, {out / 'table.txt'}, {out / 'curves.png'}")
    return results


def summarize(evaluations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, optimizer): mean ± std over meta-training and evaluation seeds."""
    rows = []
    keys = sorted({(e["task"], e["optimizer"]) for e in evaluations},
                  key=lambda k: (list(HELD_OUT_TASKS).index(k[0]) if k[0] in HELD_OUT_TASKS else 99, k[1]))
    for task, name in keys:
        group = [e for e in evaluations if e["task"] == task and e["optimizer"] == name]
        acc, acc_std = _mean_std([e["test_accuracy"] for e in group])
        loss, loss_std = _mean_std([e["train_loss"] for e in group])
        eig, eig_std = _mean_std([e["top_eigenvalue"] for e in group])
        rows.append({"task": task, "optimizer": name, "runs": len(group),
                     "test_accuracy": acc, "test_accuracy_std": acc_std, "train_loss": loss,
                     "train_loss_std": loss_std, "top_eigenvalue": eig, "top_eigenvalue_std": eig_std,
                     "diverged": sum(e["diverged_at"] is not None for e in group)})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'held-out task':<26} {'optimizer':<26} {'runs':>4}  {'test acc (%)':>14}  " \
             f"{'train loss':>16}  {'top eigenvalue':>16}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['task']:<26} {r['optimizer']:<26} {r['runs']:>4}  "
            f"{100 * r['test_accuracy']:>6.2f} ± {100 * r['test_accuracy_std']:<5.2f}  "
            f"{r['train_loss']:>7.4f} ± {r['train_loss_std']:<6.4f}  "
            f"{r['top_eigenvalue']:>7.3f} ± {r['top_eigenvalue_std']:<6.3f}"
            + (f"  ({r['diverged']} diverged)" if r["diverged"] else ""))
    return "\n".join(lines)


def plot_curves(evaluations: list[dict[str, Any]], path: Path) -> None:
    """Mean train loss and test accuracy against optimizee steps, per task and optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in HELD_OUT_TASKS if any(e["task"] == t for e in evaluations)]
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.5 * len(tasks), 7), squeeze=False)
    for j, task in enumerate(tasks):
        for name in sorted({e["optimizer"] for e in evaluations}):
            group = [e["curve"] for e in evaluations if e["task"] == task and e["optimizer"] == name]
            n = min(len(c["step"]) for c in group)
            if n == 0:
                continue
            steps = group[0]["step"][:n]
            for i, key in enumerate(("train_loss", "test_accuracy")):
                mean = [statistics.fmean(c[key][k] for c in group) for k in range(n)]
                axes[i][j].plot(steps, mean, label=name)
        axes[0][j].set_title(task)
        axes[0][j].set_yscale("log")
        axes[0][j].set_ylabel("train mini-batch loss")
        axes[1][j].set_ylabel("test accuracy")
        axes[1][j].set_xlabel("optimizee step")
    axes[1][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class _bar:  # noqa: N801
    def __init__(self, total: int, enabled: bool) -> None:
        self._tqdm = None
        if enabled:
            from tqdm.auto import tqdm

            self._tqdm = tqdm(total=total, desc="demo", unit="job")

    def __call__(self) -> None:
        if self._tqdm is not None:
            self._tqdm.update(1)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
