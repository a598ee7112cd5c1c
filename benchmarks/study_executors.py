"""What an engine costs: the --quick study's wall time on the local pool against a Dask LocalCluster.

Both run the shipped ``gap`` regime's ``--quick`` study from an empty folder with 2
workers (processes, one thread each), timed from creating the executor to closing it, so
each side pays for starting its workers and importing torch in them. The runs alternate
(local, dask, dask, local, ...) so that a change in the machine's load falls on both
sides, and the ratio is of the medians. Each run's results.json is compared with the
first local one (ignoring wall-clock fields): where a job runs must not change it.

Run: ``python benchmarks/study_executors.py [--rounds 2] [--config gap] [--out runs/bench/study_executors.json]``
(``--config`` takes a regime file or a built-in regime's name, as ``flat-l2o study`` does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from flat_l2o_plugin.study import load_regime, run_study
from flat_l2o_plugin.study.cli import regime_path
from flat_l2o_plugin.study.executors import make_executor
from flat_l2o_plugin.study.pipeline import without_wall_clock


def run_once(spec: str, workers: int, config: str = "gap") -> tuple[float, dict[str, Any]]:
    """Wall seconds of one --quick study on ``spec`` (engine start to stop), and its results."""
    regime = load_regime(regime_path(config), quick=True)
    with tempfile.TemporaryDirectory(prefix="flat-l2o-bench-") as out:
        start = time.perf_counter()
        with make_executor(spec, workers=workers) as executor:
            results = run_study(regime, out, executor=executor)
        return time.perf_counter() - start, results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="local/dask pairs, alternating order (default 2)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--config", default="gap", help="regime file or built-in regime (default gap)")
    parser.add_argument("--out", default="runs/bench/study_executors.json")
    args = parser.parse_args(argv)
    order = [spec for r in range(args.rounds) for spec in (("local", "dask") if r % 2 == 0 else ("dask", "local"))]
    times: dict[str, list[float]] = {"local": [], "dask": []}
    reference = None
    same = True
    for spec in order:
        seconds, results = run_once(spec, args.workers, args.config)
        times[spec].append(seconds)
        comparable = json.dumps(without_wall_clock(results), sort_keys=True, default=str)
        reference = reference or comparable
        same &= comparable == reference
        print(f"  {spec:<6} {seconds:7.1f} s", flush=True)
    local, dask = statistics.median(times["local"]), statistics.median(times["dask"])
    report = {"study": f"{args.config} --quick", "workers": args.workers, "rounds": args.rounds, "seconds": times,
              "median_local_s": local, "median_dask_s": dask, "dask_over_local": dask / local,
              "same_results": same}
    print(f"{'executor':<10}{'median wall s':>14}{'runs':>6}")
    print(f"{'local':<10}{local:>14.1f}{len(times['local']):>6}")
    print(f"{'dask':<10}{dask:>14.1f}{len(times['dask']):>6}")
    print(f"dask / local: {dask / local:.2f}x (target: at most 1.2x); same results.json: {same}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
