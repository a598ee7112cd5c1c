"""Does ``flat-l2o meta-train --config <shipped config>`` make the shipped optimizer again?

For each shipped optimizer (``study.shipping.SHIPPED``) this runs the command a user
would, ``flat-l2o meta-train --config flat_l2o_plugin/pretrained/<name>/meta-train.toml``,
in a fresh run folder, and prints the best validation accuracy it reaches (and after how
many meta-steps) next to:

* what the shipped weights' run printed (``index.json``), and whether the new weights are
  bit for bit the shipped ones (the study's tensor digest);
* the study's row: the validation accuracy of each of its meta-seeds, from the study's
  results (``--study``, default ``docs/results.json``) or its job cache (``--cache``),
  and the study's interval for one more meta-seed: the 95% prediction interval
  ``mean ± t(0.975, n−1)·s·√(1 + 1/n)`` over its n meta-seeds. Another machine's rounding
  may make a different optimizer, but it should validate like another seed of the row.

A result is "reproduced" when it is the shipped number exactly, "within" when it lies in
the study's interval, "OUTSIDE" otherwise. Run:
``python benchmarks/pretrained_reproduction.py [NAME ...] [--study FILE] [--cache DIR] [--out FILE]``
(about a minute for ``l2o-correction-sam`` and a few for ``l2o-correction-adam`` on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from flat_l2o_plugin.study.shipping import SHIPPED, meta_train_job, pretrained_folder, read_index, shipped

ROOT = Path(__file__).resolve().parents[1]


def study_values(entry: Any, study: Mapping[str, Any] | None, cache: Path | None, seeds: int) -> dict[int, float]:
    """Best validation accuracy of each meta-seed of ``entry``'s row, from the study's results or its cache."""
    if study is not None and "meta_runs" in study:
        return {r["meta_seed"]: r["best_val_accuracy"] for r in study["meta_runs"]
                if r["label"] == entry.candidate and not r.get("failed")}
    values: dict[int, float] = {}
    if cache is not None:
        from dataclasses import replace

        for seed in range(seeds):
            key, _ = meta_train_job(replace(entry, meta_seed=seed))
            path = cache / f"{key}.json"
            if path.exists():
                values[seed] = json.loads(path.read_text())["best_val_accuracy"]
    return values


def prediction_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Where one more draw of ``values``' distribution falls with probability ``level`` (normal, unknown variance)."""
    if len(values) < 2:
        return None
    from scipy import stats

    n, mean, sd = len(values), statistics.fmean(values), statistics.stdev(values)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd * math.sqrt(1 + 1 / n)
    return mean - half, mean + half


def verdict(value: float, shipped_value: float | None, spread: Mapping[int, float]) -> str:
    """'reproduced' (the shipped number exactly), 'within' the study's prediction interval, or 'OUTSIDE'."""
    if shipped_value is not None and value == shipped_value:
        return "reproduced"
    interval = prediction_interval(list(spread.values()))
    if interval is None:
        return "differs (fewer than 2 study meta-seeds to compare with)"
    return "within" if interval[0] <= value <= interval[1] else "OUTSIDE"


def meta_train(name: str, run_dir: Path) -> tuple[float, int, str, float]:
    """Run the shipped config through the CLI; best validation, its meta-step, the weights' digest, seconds."""
    from flat_l2o_plugin.optimizers.weights import load_learned_optimizer
    from flat_l2o_plugin.study.jobs import weights_digest

    config = pretrained_folder() / name / "meta-train.toml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flat_l2o_plugin", "meta-train", "--config", str(config),
                           "--run-dir", str(run_dir)], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"flat-l2o meta-train --config {config} failed: {done.stderr.strip().splitlines()[-1:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    best = max(((r["val_score"], r["meta_step"] + 1) for r in records if "val_score" in r),
               key=lambda s: (s[0], -s[1]))
    digest = weights_digest(load_learned_optimizer(run_dir / "optimizer.safetensors").state_dict())
    return best[0], best[1], digest, seconds


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="shipped names (default: all)")
    parser.add_argument("--study", type=Path, default=ROOT / "docs" / "results.json")
    parser.add_argument("--cache", type=Path, default=None, help="the study's job cache, when its results are not "
                        "written yet (runs/generalization/cache)")
    parser.add_argument("--seeds", type=int, default=5, help="meta-seeds to look up in --cache")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    study = json.loads(args.study.read_text()) if args.study.exists() else None
    index = {e["name"]: e for e in read_index()}
    rows = []
    for entry in [shipped(n) for n in args.names] or SHIPPED:
        record = index[entry.name]["meta_training"]
        spread = study_values(entry, study, args.cache, args.seeds)
        with tempfile.TemporaryDirectory() as folder:
            value, step, digest, seconds = meta_train(entry.name, Path(folder) / "run")
        row = {"name": entry.name, "row": entry.candidate, "meta_seed": entry.meta_seed, "best_val_accuracy": value,
               "after_meta_steps": step, "shipped_best_val_accuracy": record["best_val_accuracy"],
               "shipped_after_meta_steps": record["after_meta_steps"],
               "same_weights": digest == record.get("weights_digest"), "study_meta_seeds": spread,
               "verdict": verdict(value, record["best_val_accuracy"], spread), "seconds": seconds}
        rows.append(row)
        bounds = prediction_interval(list(spread.values()))
        row["study_interval"] = bounds
        interval = ("interval for a meta-seed " + (f"[{bounds[0]:.4f}, {bounds[1]:.4f}]" if bounds else "n/a")
                    + " from meta-seeds " + ", ".join(f"{m}: {v:.4f}" for m, v in sorted(spread.items()))
                    if spread else "not available")
        print(f"{entry.name} ({entry.candidate!r}, meta-seed {entry.meta_seed}): rerun {value:.4f} after {step} "
              f"meta-steps, shipped {record['best_val_accuracy']:.4f} after {record['after_meta_steps']}; "
              f"weights {'identical' if row['same_weights'] else 'DIFFERENT'}; study {interval}; "
              f"{row['verdict']} ({seconds:.0f} s)", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
