"""The generalization study of docs/results.md: ``flat-l2o study`` on the shipped ``gap`` regime.

The study is the package's (``flat-l2o study --config gap``, see the README's "Running
on a cluster"); this script only fixes where the repository keeps its results: the study
folder ``runs/generalization`` (its job cache makes a second run resume) and, for the
full study, the report in ``docs/`` with the reading in ``generalization_reading.md``.
Any other ``flat-l2o study`` option passes through (``--executor``, ``--workers``...).

Run: ``python benchmarks/generalization.py [--quick] [--config FILE] [--out DIR] [--executor SPEC] [--no-report]``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from flat_l2o_plugin.cli import main as flat_l2o

HERE = Path(__file__).resolve().parent
READING = HERE / "generalization_reading.md"
DOCS = HERE.parent / "docs"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quick = "--quick" in argv
    defaults = [] if "--config" in argv else ["--config", "gap"]
    if "--out" not in argv:
        defaults += ["--out", str(Path("runs") / ("generalization-quick" if quick else "generalization"))]
    # The quick study's numbers mean nothing: its report stays in its own folder.
    if not quick and "--report-to" not in argv:
        defaults += ["--report-to", str(DOCS), "--reading", str(READING)]
    return flat_l2o(["study", *defaults, *argv])


if __name__ == "__main__":
    sys.exit(main())
