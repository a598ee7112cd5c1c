"""The generalization study of docs/results.md: the package's study on its shipped ``gap`` regime.

Everything happens in :mod:`flat_l2o_plugin.study`, which a user runs on their own
regime file with ``flat-l2o study``; this script only fixes where the repository keeps
its results. The full study takes about two hours on 2 cores and resumes from its job
cache (``runs/generalization/cache``) when run again; ``--quick`` is CI's smoke test.

Run: ``python benchmarks/generalization.py [--quick] [--config FILE] [--out DIR] [--workers N] [--no-report]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from flat_l2o_plugin.study import builtin_regime, load_regime, run_study, write_report
from flat_l2o_plugin.study.jobs import LocalExecutor

HERE = Path(__file__).resolve().parent
READING = HERE / "generalization_reading.md"
DOCS = HERE.parent / "docs"


def main(argv: Sequence[str] | None = None, log: Any = print) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=builtin_regime("gap"))
    parser.add_argument("--quick", action="store_true", help="smoke-test budget; its numbers mean nothing")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/generalization[-quick]")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--no-report", action="store_true", help="do not rewrite docs/results.md")
    args = parser.parse_args(argv)
    regime = load_regime(args.config, quick=args.quick)
    out = args.out or Path("runs") / ("generalization-quick" if args.quick else "generalization")
    results = run_study(regime, out, executor=LocalExecutor(args.workers or regime.budget.workers), log=log)
    if not args.quick and not args.no_report:
        log(f"wrote {write_report(out / 'results.json', DOCS, reading=READING)}")
    return results


if __name__ == "__main__":
    main()
