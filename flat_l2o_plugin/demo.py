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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ._extras import import_extra
from .training.experiment import EVAL_SEEDS_START, VAL_SEEDS_START, evaluate, meta_train, run_jobs

__all__ = ["DemoConfig", "run_demo", "format_table"]

HELD_OUT_TASKS: dict[str, dict[str, Any]] = {
    "mlp_sigmoid_unseen_seeds": {"activation": "sigmoid", "hidden_sizes": (20,)},
    "mlp_relu": {"activation": "relu", "hidden_sizes": (20,)},
    "mlp_deeper": {"activation": "sigmoid", "hidden_sizes": (20, 20)},
}


@dataclass
class DemoConfig:
    """The demo's budget. ``quick()`` is a smoke-test budget whose numbers mean nothing."""

    meta_steps: int = 300
    unroll: int = 20
    horizon: int = 100
    meta_lr: float = 3e-3
    meta_seeds: tuple[int, ...] = (0, 1, 2, 3)
    alphas: tuple[float, ...] = (0.03, 0.1, 0.3)
    schedule: dict[str, Any] = field(default_factory=lambda: {"start_fraction": 0.5})
    val_tasks: int = 3
    val_every: int = 75
    eval_seeds: int = 5
    eval_steps: int = 200
    adam_lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    workers: int = 2

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(meta_steps=4, unroll=5, horizon=10, meta_seeds=(0,), alphas=(0.1,), val_tasks=1,
                   val_every=2, eval_seeds=2, eval_steps=10, adam_lrs=(1e-2,), workers=1)


# ---------------------------------------------------------------------------- driver


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _task(name: str) -> tuple[str, dict[str, Any]]:
    return "mlp_digits", HELD_OUT_TASKS[name]


# The digits data (scikit-learn), the confidence intervals (SciPy) and the plot.
_NEEDS = ("sklearn", "scipy.stats", "matplotlib")


def run_demo(out_dir: str | os.PathLike[str] = "runs/demo", *, config: DemoConfig | None = None,
             progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo and write ``results.json``, ``table.txt`` and ``curves.png`` into ``out_dir``."""
    cfg = config or DemoConfig()
    # Checked before minutes of meta-training, not when the table or the plot is due.
    for module in _NEEDS:
        import_extra(module, "data,plot", "flat-l2o demo")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train_task = _task("mlp_sigmoid_unseen_seeds")
    trainer = {"meta_steps": cfg.meta_steps, "unroll": cfg.unroll, "horizon": cfg.horizon, "meta_lr": cfg.meta_lr,
               "val_every": cfg.val_every, "val_steps": cfg.horizon}

    def job(alpha: float, seed: int) -> dict[str, Any]:
        regs = {"hessian_top_eigenvalue": {"weight": alpha, **cfg.schedule}} if alpha else {}
        return {"task": train_task, "regularizers": regs, "trainer": trainer, "seed": seed, "val_tasks": cfg.val_tasks}

    n_eval = (2 * len(cfg.meta_seeds) + 1) * len(HELD_OUT_TASKS) * cfg.eval_seeds
    bar = _bar(len(cfg.alphas) + 2 * len(cfg.meta_seeds) - 1 + len(cfg.adam_lrs) * cfg.val_tasks + n_eval, progress)

    log(f"[1/3] meta-training RNNProp: α sweep {list(cfg.alphas)} scored on validation tasks, and the "
        f"unregularized optimizer, seeds {list(cfg.meta_seeds)}")
    sweep_jobs = [job(a, cfg.meta_seeds[0]) for a in cfg.alphas]
    trained = run_jobs(meta_train, sweep_jobs + [job(0.0, s) for s in cfg.meta_seeds], workers=cfg.workers,
                       on_done=bar)
    sweep_runs, plain = trained[: len(sweep_jobs)], trained[len(sweep_jobs):]
    best = max(sweep_runs, key=lambda r: r["best_val_accuracy"])
    alpha = best["regularizers"]["hessian_top_eigenvalue"]["weight"]
    log("      validation accuracy: " + ", ".join(
        f"α={r['regularizers']['hessian_top_eigenvalue']['weight']:g}: {r['best_val_accuracy']:.3f}"
        for r in sweep_runs) + f" -> α={alpha:g}")
    regularized = [best, *run_jobs(meta_train, [job(alpha, s) for s in cfg.meta_seeds[1:]], workers=cfg.workers,
                                   on_done=bar)]

    log("[2/3] Adam baseline: learning rate picked on validation tasks")
    adam_jobs = [{"baseline": {"name": "adam", "lr": lr}, "task": train_task, "seed": VAL_SEEDS_START + i,
                  "steps": cfg.eval_steps, "split": "val", "flatness": False}
                 for lr in cfg.adam_lrs for i in range(cfg.val_tasks)]
    adam_val = run_jobs(evaluate, adam_jobs, workers=cfg.workers, on_done=bar)
    adam_scores = {lr: statistics.fmean(r["val_accuracy"] for j, r in zip(adam_jobs, adam_val)
                                        if j["baseline"]["lr"] == lr) for lr in cfg.adam_lrs}
    adam_lr = max(adam_scores, key=adam_scores.__getitem__)

    log("[3/3] held-out optimizees: trained with every optimizer; the test split is measured at the end")
    label_reg = f"rnnprop+hessian(α={alpha:g})"
    contenders = [("rnnprop", r) for r in plain] + [(label_reg, r) for r in regularized]
    eval_jobs, labels = [], []
    for label, run in contenders:
        for name in HELD_OUT_TASKS:
            for i in range(cfg.eval_seeds):
                eval_jobs.append({"learned": {"name": "rnnprop", "state_dict": run["state_dict"]},
                                  "task": _task(name), "seed": EVAL_SEEDS_START + i, "steps": cfg.eval_steps})
                labels.append((label, name, run["seed"]))
    for name in HELD_OUT_TASKS:
        for i in range(cfg.eval_seeds):
            eval_jobs.append({"baseline": {"name": "adam", "lr": adam_lr}, "task": _task(name),
                              "seed": EVAL_SEEDS_START + i, "steps": cfg.eval_steps})
            labels.append((f"adam(lr={adam_lr:g})", name, None))
    evaluations = run_jobs(evaluate, eval_jobs, workers=cfg.workers, on_done=bar)
    for ev, (label, name, meta_seed) in zip(evaluations, labels):
        ev.update(optimizer=label, task=name, meta_seed=meta_seed)
    bar.close()

    rows = summarize(evaluations)
    paired = paired_differences(evaluations, baseline="rnnprop", treatment=label_reg)
    seconds = time.perf_counter() - start
    keep = ("seed", "regularizers", "best_val_accuracy", "best_step", "skipped", "seconds", "validation")
    results = {
        "config": asdict(cfg), "alpha": alpha, "adam_lr": adam_lr, "adam_val_accuracy": adam_scores,
        "seconds": seconds, "sweep": [{k: r[k] for k in keep} for r in sweep_runs],
        "meta_training": [{k: r[k] for k in keep} for r in [*plain, *regularized]],
        "table": rows, "paired": paired, "runs": evaluations,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = format_table(rows) + "\n\n" + format_paired(paired, baseline="rnnprop", treatment=label_reg)
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


def paired_differences(evaluations: list[dict[str, Any]], *, baseline: str, treatment: str) -> list[dict[str, Any]]:
    """Test-accuracy difference treatment − baseline, paired by (meta-training seed, optimizee seed).

    Returns per task: the mean difference, its 95% confidence interval (Student t), the
    number of pairs and how many the treatment wins.
    """
    stats = import_extra("scipy.stats", "data", "paired_differences")

    out = []
    for task in HELD_OUT_TASKS:
        by_key = {}
        for e in evaluations:
            if e["task"] == task and e["optimizer"] in (baseline, treatment):
                by_key.setdefault((e["meta_seed"], e["seed"]), {})[e["optimizer"]] = e["test_accuracy"]
        diffs = [v[treatment] - v[baseline] for v in by_key.values() if len(v) == 2]
        if not diffs:
            continue
        mean = statistics.fmean(diffs)
        half = (stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
                if len(diffs) > 1 else math.nan)
        out.append({"task": task, "mean_difference": mean, "ci95": [mean - half, mean + half], "pairs": len(diffs),
                    "wins": sum(d > 0 for d in diffs), "losses": sum(d < 0 for d in diffs)})
    return out


def format_paired(paired: list[dict[str, Any]], *, baseline: str, treatment: str) -> str:
    lines = [f"paired test-accuracy difference, {treatment} − {baseline}, paired by meta-training and optimizee seed",
             "(pairs that share a meta-training seed are not independent: the interval is optimistic):"]
    for p in paired:
        low, high = p["ci95"]
        verdict = "within noise" if low <= 0 <= high else ("better" if low > 0 else "worse")
        lines.append(f"  {p['task']:<26} {100 * p['mean_difference']:+6.2f} points, 95% CI [{100 * low:+.2f}, "
                     f"{100 * high:+.2f}], wins {p['wins']}/{p['pairs']} ({verdict})")
    return "\n".join(lines)


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
    matplotlib = import_extra("matplotlib", "plot", "plot_curves")
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
