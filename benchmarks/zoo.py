"""How do the zoo's learned optimizers compare with Adam at a small meta-training budget?

Each registered zoo model (RNNProp, L2O-DM, L2O-Scale) is meta-trained on the digits
MLP (64-20-10, sigmoid) with the same budget and the same meta-training seeds, keeping
its best checkpoint by validation accuracy. Fresh held-out optimizees are then trained
for ``--eval-steps`` steps (twice the meta-training horizon) with each meta-trained
optimizer, with each model before meta-training (the "untrained" rows: what the
initialisation alone gives), and with Adam (lr 1e-2):

- ``mlp_sigmoid``: the meta-training task, unseen init seeds;
- ``mlp_relu``: the same MLP with ReLU activations;
- ``conv_digits``: the small conv net, a different architecture.

Reported per optimizer and task, as mean ± std over all (meta-seed, init-seed) runs:
the final train loss (full ``train`` split), the ``val`` accuracy, the meta-training
seconds, and failures (runs that diverged or ended with a train loss above 2.0, i.e.
with little progress from ln 10 ≈ 2.30).

Run: ``python benchmarks/zoo.py [--quick] [--out runs/bench/zoo.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from flat_l2o_plugin.training.experiment import EVAL_SEEDS_START, evaluate, meta_train, run_jobs

MODELS = ("rnnprop", "l2o_dm", "l2o_scale")
TRAIN_TASK = ("mlp_digits", {})
EVAL_TASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "mlp_sigmoid": ("mlp_digits", {}),
    "mlp_relu": ("mlp_digits", {"activation": "relu"}),
    "conv_digits": ("conv_digits", {}),
}
ADAM = {"name": "adam", "lr": 1e-2}
FAILED_LOSS = 2.0  # a final train loss above this made little progress from ln 10 ≈ 2.30


def _mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return "n/a"
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def _untrained(name: str) -> dict[str, Any]:
    """The model's initial weights, seeded as :func:`meta_train` seeds them."""
    from flat_l2o_plugin import create_optimizer

    torch.manual_seed(0)
    return {"name": name, "state_dict": create_optimizer(name).state_dict()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke-test budget; numbers mean nothing")
    parser.add_argument("--out", default="runs/bench/zoo.json")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        trainer = {"meta_steps": 3, "unroll": 5, "horizon": 10, "val_every": 3, "val_steps": 10}
        meta_seeds, eval_seeds, eval_steps = (0,), 1, 10
    else:
        trainer = {"meta_steps": 100, "unroll": 20, "horizon": 100, "val_every": 25, "val_steps": 100}
        meta_seeds, eval_seeds, eval_steps = (0, 1, 2), 4, 200
    start = time.perf_counter()

    print(f"[1/2] meta-training {', '.join(MODELS)} on {TRAIN_TASK[0]}, seeds {list(meta_seeds)}", flush=True)
    jobs = [{"optimizer": m, "task": TRAIN_TASK, "trainer": trainer, "seed": s} for m in MODELS for s in meta_seeds]
    trained = run_jobs(meta_train, jobs, workers=args.workers)

    # One evaluation job per (optimizer, weights, task, init seed). Init seeds < 100 were
    # never seen in meta-training (>= 1000) or validation (100..999).
    specs: list[dict[str, Any]] = []
    for m_index, model in enumerate(MODELS):
        runs = trained[m_index * len(meta_seeds):(m_index + 1) * len(meta_seeds)]
        specs.append({"optimizer": model, "meta_trained": True,
                      "learned": [{"name": model, "state_dict": r["state_dict"]} for r in runs],
                      "meta_train_seconds": [r["seconds"] for r in runs],
                      "skipped_unrolls": [r["skipped"] for r in runs],
                      "best_val_accuracy": [r["best_val_accuracy"] for r in runs]})
    for model in MODELS:
        specs.append({"optimizer": f"{model} (untrained)", "meta_trained": False,
                      "learned": [_untrained(model)]})
    specs.append({"optimizer": "adam lr=1e-2", "meta_trained": False, "baseline": ADAM})

    eval_jobs, owners = [], []
    for s_index, spec in enumerate(specs):
        for task_name, task in EVAL_TASKS.items():
            for seed in range(EVAL_SEEDS_START, EVAL_SEEDS_START + eval_seeds):
                kinds = [{"baseline": spec["baseline"]}] if "baseline" in spec else [
                    {"learned": learned} for learned in spec["learned"]]
                for kind in kinds:
                    eval_jobs.append({**kind, "task": task, "seed": seed, "steps": eval_steps, "split": "val",
                                      "flatness": False})
                    owners.append((s_index, task_name))
    print(f"[2/2] {len(eval_jobs)} held-out runs of {eval_steps} steps", flush=True)
    evaluated = run_jobs(evaluate, eval_jobs, workers=args.workers)

    rows = []
    for s_index, spec in enumerate(specs):
        for task_name in EVAL_TASKS:
            evals = [e for e, owner in zip(evaluated, owners) if owner == (s_index, task_name)]
            failures = sum(e["diverged_at"] is not None or not e["train_loss"] < FAILED_LOSS for e in evals)
            rows.append({
                "optimizer": spec["optimizer"], "task": task_name, "meta_trained": spec["meta_trained"],
                "train_loss": [e["train_loss"] for e in evals],
                "val_accuracy": [e["val_accuracy"] for e in evals],
                "meta_train_seconds": spec.get("meta_train_seconds", []),
                "skipped_unrolls": spec.get("skipped_unrolls", []),
                "best_val_accuracy": spec.get("best_val_accuracy", []),
                "failures": failures, "runs": len(evals),
                "curves": [e["curve"] for e in evals],
            })
    seconds = time.perf_counter() - start

    header = (f"{'optimizer':<22} {'task':<12} {'final train loss':>17} {'val accuracy':>15} "
              f"{'meta-train s':>13} {'failures':>9}")
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        meta = _mean_std(r["meta_train_seconds"]) if r["meta_train_seconds"] else "-"
        print(f"{r['optimizer']:<22} {r['task']:<12} {_mean_std(r['train_loss']):>17} "
              f"{_mean_std(r['val_accuracy']):>15} {meta:>13} {r['failures']:>5}/{r['runs']}")
    print(f"\nmeta-training on {TRAIN_TASK[0]}: {trainer}, seeds {list(meta_seeds)}; held-out init seeds "
          f"{EVAL_SEEDS_START}..{EVAL_SEEDS_START + eval_seeds - 1} x {eval_steps} steps; {seconds / 60:.1f} min")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"trainer": trainer, "train_task": TRAIN_TASK[0], "meta_seeds": list(meta_seeds),
              "eval_seeds": eval_seeds, "eval_steps": eval_steps, "eval_tasks": EVAL_TASKS, "adam": ADAM,
              "failed_loss": FAILED_LOSS, "seconds": seconds, "rows": rows}
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
