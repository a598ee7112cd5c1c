"""Which schedules and weightings avoid the flat-plateau trap of a flatness meta-loss?

The optimizee's initial plateau is the flattest point of its trajectory, so a large
penalty from step 0 can teach the learned optimizer not to move. This benchmark
meta-trains RNNProp on the digits MLP with the Hessian top-eigenvalue term under each
schedule / weighting of the activation config, at the same budget and seeds, and then
trains held-out optimizees (unseen init seeds) with each learned optimizer.

Reported per configuration: the best validation accuracy seen during meta-training
(what a user would select on), test accuracy, final train loss and the top Hessian
eigenvalue on held-out optimizees, and how many runs were trapped near chance.

Run: ``python benchmarks/schedules.py [--quick] [--out runs/bench/schedules.json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from flat_l2o_plugin.training.experiment import EVAL_SEEDS_START, evaluate, meta_train, run_jobs

REG = "hessian_top_eigenvalue"
CONFIGS: dict[str, dict[str, Any]] = {
    "none": {},
    "α=1 from step 0": {REG: {"weight": 1.0}},
    "α=1, warmup 50 steps": {REG: {"weight": 1.0, "warmup": 50}},
    "α=1, late (t >= T/2)": {REG: {"weight": 1.0, "start_fraction": 0.5}},
    "α=1, after loss halves": {REG: {"weight": 1.0, "after_loss_drop": 0.5}},
    "scale-free α=0.1 from step 0": {REG: {"weight": 0.1, "weighting": "scale_free"}},
    "scale-free α=0.1, late": {REG: {"weight": 0.1, "weighting": "scale_free", "start_fraction": 0.5}},
    "optimizee-loss mode β=0.1": {REG: {"weight": 0.1, "mode": "optimizee_loss"}},
}
TASK = ("mlp_digits", {})
CHANCE = 0.2  # below this test accuracy a run counts as trapped (10 classes: chance is 0.1)


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke-test budget; numbers mean nothing")
    parser.add_argument("--out", default="runs/bench/schedules.json")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.quick:
        trainer = {"meta_steps": 3, "unroll": 5, "horizon": 10, "val_every": 3, "val_steps": 10}
        seeds, eval_seeds, eval_steps = (0,), 1, 10
    else:
        trainer = {"meta_steps": 150, "unroll": 20, "horizon": 100, "val_every": 50, "val_steps": 100}
        seeds, eval_seeds, eval_steps = (0, 1), 3, 200
    start = time.perf_counter()
    jobs = [{"task": TASK, "regularizers": regs, "trainer": trainer, "seed": s}
            for regs in CONFIGS.values() for s in seeds]
    trained = run_jobs(meta_train, jobs, workers=args.workers)
    eval_jobs = [{"learned": {"name": "rnnprop", "state_dict": r["state_dict"]}, "task": TASK,
                  "seed": EVAL_SEEDS_START + i, "steps": eval_steps} for r in trained for i in range(eval_seeds)]
    evaluated = run_jobs(evaluate, eval_jobs, workers=args.workers)
    rows = []
    for c, name in enumerate(CONFIGS):
        runs = trained[c * len(seeds):(c + 1) * len(seeds)]
        evals = evaluated[c * len(seeds) * eval_seeds:(c + 1) * len(seeds) * eval_seeds]
        rows.append({
            "config": name, "regularizers": CONFIGS[name],
            "val_accuracy": [r["best_val_accuracy"] for r in runs],
            "test_accuracy": [e["test_accuracy"] for e in evals],
            "train_loss": [e["train_loss"] for e in evals],
            "top_eigenvalue": [e["top_eigenvalue"] for e in evals],
            "trapped": sum(e["test_accuracy"] < CHANCE for e in evals), "runs": len(evals),
            "meta_train_seconds": statistics.fmean(r["seconds"] for r in runs),
        })
    seconds = time.perf_counter() - start
    header = f"{'configuration':<30} {'val acc':>15} {'test acc':>15} {'train loss':>15} {'top eig':>15} {'trapped':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['config']:<30} {_mean_std(r['val_accuracy']):>15} {_mean_std(r['test_accuracy']):>15} "
              f"{_mean_std(r['train_loss']):>15} {_mean_std(r['top_eigenvalue']):>15} {r['trapped']:>3}/{r['runs']}")
    print(f"\nmeta-training {trainer}, seeds {list(seeds)}, {eval_seeds} held-out seeds x {eval_steps} steps; "
          f"{seconds / 60:.1f} min")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"trainer": trainer, "seeds": list(seeds), "eval_seeds": eval_seeds, "eval_steps": eval_steps,
              "seconds": seconds, "rows": rows}
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
