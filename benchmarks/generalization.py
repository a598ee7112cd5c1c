"""Does flatness-aware meta-training make optimizees generalize? The reproduction study.

Driven by ``benchmarks/generalization.toml``. For each regime (a training task for
meta-training, and a set of held-out optimizees never seen in meta-training):

1. **Hand-designed baselines** (Adam, SGD with momentum, SAM, Entropy-SGD) are tuned per
   held-out task on validation optimizees (reserved init seeds, ``val`` split).
2. **The α sweep**: RNNProp (first meta-seed) is meta-trained with each regularizer at
   each α of the sweep; the α with the best validation accuracy is kept, for every
   learned optimizer.
3. **The plain recipe**: each learned optimizer × {none, each regularizer} × meta-seeds,
   same budget, each keeping its best checkpoint by the same validation score.
4. **Beyond the paper**: each variant × meta-seeds, compared on validation; the best
   ``held_out_variants`` go on to held-out evaluation.
5. **Held-out evaluation**: every contender trains every held-out optimizee (eval
   seeds, ``eval_steps`` steps, longer than the meta-training horizon); test accuracy,
   train loss, the gap, the top Hessian eigenvalue and the smoothed loss (local entropy)
   at the final point.

Nothing is selected on test data. Every job's result is cached under ``--out`` as it
finishes, so an interrupted study resumes where it stopped; the raw results go to
``<out>/results.json``. ``python benchmarks/generalization_report.py`` turns them into
``docs/results.md``.

Run: ``python benchmarks/generalization.py [--quick] [--config FILE] [--out DIR] [--workers N]``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import statistics
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

HERE = Path(__file__).resolve().parent

from flat_l2o_plugin._atomic import write_atomically  # noqa: E402
from flat_l2o_plugin.training.experiment import EVAL_SEEDS_START, VAL_SEEDS_START, evaluate, meta_train, run_jobs  # noqa: E402,E501

DEFAULT_CONFIG = HERE / "generalization.toml"
PLAIN = "none"


# ---------------------------------------------------------------------------- config


def load_config(path: Path, *, quick: bool) -> dict[str, Any]:
    """The study config, with the ``[quick]`` budget applied when ``quick``."""
    config = tomllib.loads(path.read_text())
    for key in ("study", "regimes"):
        if key not in config:
            raise SystemExit(f"{path}: missing [{key}]")
    if not quick:
        return config
    q = config.get("quick", {})
    config["study"] = {**config["study"], **q.get("study", {})}
    config["regimes"] = {k: v for k, v in config["regimes"].items() if k in q.get("regimes", config["regimes"])}
    for regime in config["regimes"].values():
        regime["trainer"] = {**regime["trainer"], **q.get("trainer", {})}
        regime["eval_steps"] = q.get("eval_steps", regime["eval_steps"])
        regime["held_out"] = regime["held_out"][: q.get("held_out", len(regime["held_out"]))]
        regime["variants"] = regime.get("variants", [])[: q.get("variants", len(regime.get("variants", [])))]
        points = q.get("grid_points")
        if points:
            for reg in regime["regularizers"].values():
                reg["alphas"] = reg["alphas"][:points]
            for base in regime["baselines"].values():
                base["grid"] = {k: v[:points] for k, v in base["grid"].items()}
    return config


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def resolve(value: Any, picks: Mapping[str, Mapping[str, Any]]) -> Any:
    """Replace ``"@baseline.option"`` strings with the value picked on validation."""
    if isinstance(value, str) and value.startswith("@"):
        name, _, option = value[1:].partition(".")
        try:
            return picks[name][option]
        except KeyError:
            raise SystemExit(f"config reference {value!r}: no baseline {name!r} with option {option!r} "
                             f"(picked: {dict(picks)})") from None
    if isinstance(value, Mapping):
        return {k: resolve(v, picks) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, picks) for v in value]
    return value


def task_spec(entry: Sequence[Any]) -> tuple[str, dict[str, Any]]:
    name, options = entry
    return name, dict(options)


# ---------------------------------------------------------------------------- cached jobs


def _key(fn: Callable[..., Any], job: Mapping[str, Any]) -> str:
    payload = json.dumps({"fn": fn.__name__, "job": job}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _cached_call(fn_name: str, job: dict[str, Any], path: str) -> dict[str, Any]:
    """Run one job in a worker and store its result atomically before returning it."""
    result = {"meta_train": meta_train, "evaluate": evaluate}[fn_name](**job)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(result, tmp)
    os.replace(tmp, path)
    return result


class Jobs:
    """Runs jobs in worker processes; a job already in the cache is not run again."""

    def __init__(self, cache: Path, workers: int, log: Callable[[str], None]) -> None:
        self.cache, self.workers, self.log = cache, workers, log
        cache.mkdir(parents=True, exist_ok=True)
        self.seconds = 0.0

    def run(self, fn: Callable[..., Any], jobs: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
        paths = [self.cache / f"{_key(fn, job)}.pt" for job in jobs]
        todo = [i for i, p in enumerate(paths) if not p.exists()]
        start = time.perf_counter()
        self.log(f"  {what}: {len(jobs)} jobs ({len(jobs) - len(todo)} cached)")
        calls = [{"fn_name": fn.__name__, "job": jobs[i], "path": str(paths[i])} for i in todo]
        done = [0]

        def tick() -> None:
            done[0] += 1
            if done[0] % max(1, len(calls) // 10) == 0 or done[0] == len(calls):
                self.log(f"    {done[0]}/{len(calls)} done, {time.perf_counter() - start:.0f} s")

        run_jobs(_cached_call, calls, workers=self.workers, on_done=tick)
        self.seconds += time.perf_counter() - start
        return [torch.load(p, weights_only=True) for p in paths]


# ---------------------------------------------------------------------------- the study


def _mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def _learned(run: Mapping[str, Any]) -> dict[str, Any]:
    return {"name": run["optimizer"], "options": run["optimizer_options"], "wrappers": run["wrappers"],
            "state_dict": run["state_dict"]}


def _meta_summary(run: Mapping[str, Any], label: str, failure: float) -> dict[str, Any]:
    return {"label": label, "seed": run["seed"], "optimizer": run["optimizer"],
            "optimizer_options": run["optimizer_options"], "wrappers": run["wrappers"],
            "regularizers": run["regularizers"], "best_val_accuracy": run["best_val_accuracy"],
            "best_step": run["best_step"], "skipped": run["skipped"], "seconds": run["seconds"],
            "failed": not run["best_val_accuracy"] > failure, "validation": run["validation"]}


def run_regime(name: str, regime: Mapping[str, Any], study: Mapping[str, Any], jobs: Jobs,
               log: Callable[[str], None]) -> dict[str, Any]:
    log(f"[{name}] {regime['description']}")
    train_task = task_spec(regime["train_task"])
    held_out = [{**h, "task": task_spec(h["task"])} for h in regime["held_out"]]
    val_seeds = [VAL_SEEDS_START + i for i in range(study["val_seeds"])]
    eval_seeds = [EVAL_SEEDS_START + i for i in range(study["eval_seeds"])]
    meta_seeds = list(study["meta_seeds"])
    steps = regime["eval_steps"]
    failure = study["failure_accuracy"]

    # 1. Baselines, tuned per held-out task on validation optimizees.
    sweep_jobs, sweep_keys = [], []
    for base_name, base in regime["baselines"].items():
        for point in grid_points(base["grid"]):
            for h in held_out:
                for s in val_seeds:
                    sweep_jobs.append({"baseline": {"name": base["optimizer"], **base.get("fixed", {}), **point},
                                       "task": h["task"], "seed": s, "steps": steps, "split": "val",
                                       "flatness": False})
                    sweep_keys.append((base_name, json.dumps(point, sort_keys=True), h["name"]))
    sweep = jobs.run(evaluate, sweep_jobs, "baseline hyper-parameter sweep (validation)")
    scores: dict[tuple[str, str, str], list[float]] = {}
    for key, result in zip(sweep_keys, sweep):
        scores.setdefault(key, []).append(result["val_accuracy"])
    baseline_sweep = [{"baseline": b, "point": json.loads(p), "task": t, "val_accuracy": _mean(v)}
                      for (b, p, t), v in scores.items()]
    picks: dict[str, dict[str, dict[str, Any]]] = {}  # baseline -> task -> point
    for row in baseline_sweep:
        best = picks.setdefault(row["baseline"], {}).get(row["task"])
        if best is None or row["val_accuracy"] > best["_score"]:
            picks[row["baseline"]][row["task"]] = {**row["point"], "_score": row["val_accuracy"]}
    # The training task is the first held-out task (same architecture, new seeds).
    train_picks = {b: {k: v for k, v in per_task[held_out[0]["name"]].items() if k != "_score"}
                   for b, per_task in picks.items()}
    log(f"  picked on validation for the training task: {train_picks}")

    # 2. The α sweep (RNNProp, first meta-seed), scored on validation.
    def mt_job(optimizer: str, regularizers: Mapping[str, Any], seed: int, *,
               options: Mapping[str, Any] | None = None, wrappers: Sequence[Mapping[str, Any]] = (),
               trainer: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return {"optimizer": optimizer, "optimizer_options": dict(options or {}), "wrappers": list(wrappers),
                "task": train_task, "regularizers": dict(regularizers),
                "trainer": {**regime["trainer"], **(trainer or {})}, "seed": seed, "val_tasks": study["val_seeds"]}

    sweep_optimizer = regime["optimizers"][0]
    alpha_jobs = [(reg, alpha, mt_job(sweep_optimizer, {reg: {"weight": alpha, **spec.get("options", {})}},
                                      meta_seeds[0]))
                  for reg, spec in regime["regularizers"].items() for alpha in spec["alphas"]]
    alpha_runs = jobs.run(meta_train, [j for _, _, j in alpha_jobs], f"α sweep ({sweep_optimizer}, validation)")
    alpha_sweep = [{"regularizer": reg, "alpha": alpha, "best_val_accuracy": run["best_val_accuracy"],
                    "seconds": run["seconds"]} for (reg, alpha, _), run in zip(alpha_jobs, alpha_runs)]
    chosen = {}
    for reg, spec in regime["regularizers"].items():
        rows = [r for r in alpha_sweep if r["regularizer"] == reg]
        best = max(rows, key=lambda r: r["best_val_accuracy"])
        chosen[reg] = {"weight": best["alpha"], **spec.get("options", {})}
    log(f"  α picked on validation: { {k: v['weight'] for k, v in chosen.items()} }")

    # 3. The plain recipe.
    configs = {PLAIN: {}, **{reg: {reg: options} for reg, options in chosen.items()}}
    grid = [(opt, label, seed) for opt in regime["optimizers"] for label in configs for seed in meta_seeds]
    grid_runs = jobs.run(meta_train, [mt_job(o, configs[label], s) for o, label, s in grid],
                         "meta-training: optimizers × regularizers × seeds")
    contenders: dict[str, list[dict[str, Any]]] = {}
    meta_runs = []
    for (opt, label, _), run in zip(grid, grid_runs):
        name = opt if label == PLAIN else f"{opt}+{label}"
        contenders.setdefault(name, []).append(run)
        meta_runs.append({**_meta_summary(run, name, failure), "group": "plain recipe"})

    # 4. Beyond the paper, on validation.
    variants = []
    for v in regime.get("variants", []):
        v = resolve(v, train_picks)
        regs = {r: chosen[r] for r in v.get("regularizers", [])}
        runs = jobs.run(meta_train, [mt_job(v["optimizer"], regs, s, options=v.get("options", {}),
                                            wrappers=v.get("wrappers", []), trainer=v.get("trainer", {}))
                                     for s in meta_seeds], f"variant {v['label']}")
        meta_runs += [{**_meta_summary(r, v["label"], failure), "group": "variant"} for r in runs]
        variants.append((v["label"], runs))
    ranked = sorted(variants, key=lambda lv: -_mean([r["best_val_accuracy"] for r in lv[1]]))
    for label, runs in ranked[: study["held_out_variants"]]:
        contenders[label] = runs

    # 5. Held-out evaluation.
    eval_jobs, eval_keys = [], []
    for h in held_out:
        extra = {"task": h["task"], "steps": steps, "entropy_gamma": study["entropy_gamma"],
                 "curve_flatness": bool(h.get("curve_flatness", False))}
        for name, runs in contenders.items():
            for run in runs:
                for s in eval_seeds:
                    eval_jobs.append({"learned": _learned(run), "seed": s, **extra})
                    eval_keys.append((name, h["name"], run["seed"]))
        for base_name, per_task in picks.items():
            point = {k: v for k, v in per_task[h["name"]].items() if k != "_score"}
            base = regime["baselines"][base_name]
            for s in eval_seeds:
                eval_jobs.append({"baseline": {"name": base["optimizer"], **base.get("fixed", {}), **point},
                                  "seed": s, **extra})
                eval_keys.append((base_name, h["name"], None))
    results = jobs.run(evaluate, eval_jobs, "held-out evaluation (test split)")
    runs = []
    for (name, task, meta_seed), r in zip(eval_keys, results):
        r = dict(r)
        r.update(optimizer=name, task=task, meta_seed=meta_seed,
                 kind="baseline" if meta_seed is None else "learned")
        runs.append(r)
    log("  test-time cost, measured side by side")
    cost = test_time_cost(held_out[0]["task"], contenders, picks, regime["baselines"], held_out[0]["name"], steps)
    return {"description": regime["description"], "train_task": train_task, "test_time_cost": cost,
            "held_out": [{"name": h["name"], "task": h["task"]} for h in held_out],
            "eval_steps": steps, "trainer": regime["trainer"], "baseline_sweep": baseline_sweep,
            "baseline_picks": picks,
            "alpha_sweep": alpha_sweep, "chosen_regularizers": chosen, "meta_runs": meta_runs,
            "held_out_contenders": list(contenders), "runs": runs}


def test_time_cost(task: tuple[str, dict[str, Any]], contenders: Mapping[str, list[dict[str, Any]]],
                   picks: Mapping[str, Mapping[str, Mapping[str, Any]]], baselines: Mapping[str, Any],
                   task_name: str, steps: int, repeats: int = 3) -> list[dict[str, Any]]:
    """Seconds per optimizee step of each optimizer and of its flatness-seeking counterpart.

    Measured in this process, one thread, the pair interleaved ``repeats`` times on the
    same optimizee; the ratio of medians is what a user pays at test time.
    """
    torch.set_num_threads(1)
    pairs: list[tuple[str, dict[str, Any], str, dict[str, Any]]] = []
    for name, runs in contenders.items():
        wrappers = runs[0]["wrappers"]
        if any(w["name"] == "sam_gradient" for w in wrappers):
            plain = {**_learned(runs[0]), "wrappers": [w for w in wrappers if w["name"] != "sam_gradient"]}
            pairs.append((f"{name} without sam_gradient", {"learned": plain}, name, {"learned": _learned(runs[0])}))

    def base(b: str) -> dict[str, Any]:
        point = {k: v for k, v in picks[b][task_name].items() if k != "_score"}
        return {"baseline": {"name": baselines[b]["optimizer"], **baselines[b].get("fixed", {}), **point}}

    for other in ("sam", "entropy_sgd"):
        if "adam" in picks and other in picks:
            pairs.append(("adam", base("adam"), other, base(other)))
    rows = []
    for ref_name, ref, name, job in pairs:
        times: dict[str, list[float]] = {ref_name: [], name: []}
        for _ in range(repeats):
            for label, spec in ((ref_name, ref), (name, job)):
                result = evaluate(task=task, seed=0, steps=steps, curve_points=1, flatness=False, **spec)
                times[label].append(result["seconds"] / steps)
        ref_t, t = statistics.median(times[ref_name]), statistics.median(times[name])
        rows.append({"reference": ref_name, "optimizer": name, "reference_ms_per_step": 1e3 * ref_t,
                     "ms_per_step": 1e3 * t, "ratio": t / ref_t})
    return rows


def main(argv: Sequence[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--quick", action="store_true", help="smoke-test budget; its numbers mean nothing")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/generalization[-quick]")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--regimes", default=None, help="comma-separated subset of the config's regimes")
    args = parser.parse_args(argv)
    config = load_config(args.config, quick=args.quick)
    study = config["study"]
    out = args.out or Path("runs") / ("generalization-quick" if args.quick else "generalization")
    jobs = Jobs(out / "cache", args.workers or study["workers"], log)
    names = args.regimes.split(",") if args.regimes else list(config["regimes"])
    unknown = sorted(set(names) - set(config["regimes"]))
    if unknown:
        raise SystemExit(f"--regimes: unknown {unknown}; the config has {sorted(config['regimes'])}")
    # An interrupted study resumes from its cache; its wall time is summed over the
    # processes that worked on it.
    elapsed_file = out / "elapsed.json"
    before = json.loads(elapsed_file.read_text())["seconds"] if elapsed_file.exists() else 0.0
    start = time.perf_counter()
    regimes = {n: run_regime(n, config["regimes"][n], study, jobs, log) for n in names}
    wall = before + time.perf_counter() - start
    write_atomically(elapsed_file, json.dumps({"seconds": wall}).encode(), OSError)
    results = {"quick": args.quick, "config": config, "study": study, "regimes": regimes,
               "wall_seconds": wall, "job_seconds": jobs.seconds,
               "cpu": f"{os.cpu_count()} cores, torch {torch.__version__}, {study['workers']} workers"}
    write_atomically(out / "results.json", json.dumps(results, indent=1, default=str).encode(), OSError)
    log(f"wrote {out / 'results.json'} ({results['wall_seconds'] / 60:.1f} min)")
    return results


if __name__ == "__main__":
    main()
