"""``docs/results.md`` from the study's results: ``python benchmarks/generalization_report.py [RESULTS] [--docs DIR]``.

``RESULTS`` is the raw ``runs/generalization/results.json`` or the compact
``docs/results.json`` committed next to the report, so the report regenerates from a
fresh clone. The interpretive reading is kept in ``generalization_reading.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from flat_l2o_plugin.study import write_report

HERE = Path(__file__).resolve().parent


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", type=Path, default=Path("runs/generalization/results.json"))
    parser.add_argument("--docs", type=Path, default=HERE.parent / "docs")
    args = parser.parse_args(argv)
    return write_report(args.results, args.docs, reading=HERE / "generalization_reading.md")


if __name__ == "__main__":
    print(main())
