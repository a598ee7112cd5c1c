"""``docs/results.md`` again from the study's results: ``flat-l2o study report`` with the repository's folders.

Run: ``python benchmarks/generalization_report.py [RESULTS] [--to DIR]``. ``RESULTS`` is
the raw ``runs/generalization/results.json`` (the default) or the compact
``docs/results.json`` committed next to the report, so the report regenerates from a
fresh clone. The interpretive reading is kept in ``generalization_reading.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from flat_l2o_plugin.cli import main as flat_l2o

HERE = Path(__file__).resolve().parent


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    source = [] if argv and not argv[0].startswith("-") else ["runs/generalization/results.json"]
    target = [] if "--to" in argv else ["--to", str(HERE.parent / "docs")]
    return flat_l2o(["study", "report", *source, *argv, *target, "--reading", str(HERE / "generalization_reading.md")])


if __name__ == "__main__":
    sys.exit(main())
