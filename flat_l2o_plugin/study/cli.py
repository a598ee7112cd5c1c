"""``flat-l2o study``: run a study from a regime file, on any executor; ``flat-l2o study report DIR``.

The package's command line adds this verb with :func:`add_parser`; errors follow its
conventions (a :class:`~flat_l2o_plugin.errors.ConfigError` is one line and exit 2;
failed jobs and an executor whose extra is not installed are one line and exit 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["add_parser", "regime_path", "report_command", "study_command"]

EPILOG = """examples:
  flat-l2o study --config gap --quick                     # the shipped regime, smoke-test budget
  flat-l2o study --config my_regime.toml --out runs/mine  # run again to resume from runs/mine/cache
  flat-l2o study --config gap --executor dask://head:8786 --out /shared/gap
  flat-l2o study --config gap --executor slurm:/shared/gap-jobs --workers 64 --out /shared/gap
  flat-l2o study report runs/mine                         # the report again, from results.json"""


def add_parser(commands: Any) -> None:
    """Add ``study`` (and ``study report``) to the command line's subparsers."""
    p = commands.add_parser("study", help="run a generalization study from a regime file, here or on a cluster",
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--config", metavar="REGIME", help="regime file (.toml), or the name of a built-in regime (gap)")
    p.add_argument("--out", metavar="DIR",
                   help="study folder: cache/ of finished jobs, results.json, report/ (default: runs/study-NAME, "
                        "runs/study-NAME-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="the regime's [quick] budget: a smoke test, numbers mean nothing")
    p.add_argument("--executor", metavar="SPEC",
                   help="where jobs run: local, dask, dask://HOST:PORT, ray, ray://HOST:PORT or slurm:FOLDER "
                        "(default: the regime's [executor], else local)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="jobs at once: local processes, LocalCluster workers, local Ray CPUs, SLURM jobs in "
                        "flight (a running Dask or Ray cluster uses all its workers; default: the regime's "
                        "budget.workers)")
    p.add_argument("--report-to", metavar="DIR", help="folder of the report (default: OUT/report)")
    p.add_argument("--reading", metavar="FILE", help="markdown placed under the report's answer")
    p.add_argument("--no-report", action="store_true", help="write results.json only")
    p.add_argument("--no-progress", action="store_true", help="no progress line (shown only on a terminal anyway)")
    p.set_defaults(func=study_command)
    actions = p.add_subparsers(dest="study_action", metavar="ACTION")
    r = actions.add_parser("report", help="regenerate a study's report from its results.json (full or compact)",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="examples:\n  flat-l2o study report runs/study-gap\n"
                                  "  flat-l2o study report docs --reading notes.md   # a committed compact results.json")
    r.add_argument("source", metavar="DIR", help="a study folder, a report folder, or a results.json file")
    r.add_argument("--to", metavar="DIR", dest="report_to",
                   help="output folder (default: DIR/report for a study folder, DIR itself for a report)")
    r.add_argument("--reading", metavar="FILE", help="markdown placed under the report's answer")
    r.set_defaults(func=report_command)


def regime_path(text: str) -> Path:
    """The regime file ``--config`` names: a path, or a built-in regime's name."""
    from . import builtin_regime, builtin_regimes

    path = Path(text)
    if path.exists() or path.suffix or len(path.parts) > 1:
        return path
    if text in builtin_regimes():
        return builtin_regime(text)
    raise ConfigError(f"--config: no regime file {text!r} and no built-in regime of that name "
                      f"(built-in: {', '.join(builtin_regimes())})")


def study_command(args: argparse.Namespace) -> int:
    """Run (or resume) the study; write results.json and the report."""
    from .executors import make_executor
    from .pipeline import run_study
    from .progress import Progress, TerminalProgress
    from .regime import load_regime
    from .report import write_report

    if args.config is None:
        raise ConfigError("study needs --config REGIME.toml or a built-in regime's name (gap); "
                          "`flat-l2o study report DIR` regenerates a report")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    regime = load_regime(regime_path(args.config), quick=args.quick)
    out = Path(args.out) if args.out else Path("runs") / f"study-{regime.name}{'-quick' if args.quick else ''}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the study")
    if args.reading is not None and not Path(args.reading).is_file():
        raise ConfigError(f"--reading {args.reading}: no such file")
    executor = make_executor(args.executor or regime.executor.use, workers=args.workers or regime.budget.workers,
                             options=regime.executor, where="--executor" if args.executor else "executor.use")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    log(f"study {regime.name!r}{' (quick)' if args.quick else ''} in {out}, jobs on {executor.name}")
    try:
        with executor:
            run_study(regime, out, executor=executor, log=log,
                      progress=Progress() if args.no_progress else TerminalProgress())
    except KeyboardInterrupt:
        log(f"flat-l2o: interrupted; finished jobs are kept in {out / 'cache'}: run the same command to resume")
        return 130
    written = [str(out / "results.json")]
    if not args.no_report:
        written.append(str(write_report(out / "results.json", args.report_to or out / "report",
                                        reading=args.reading)))
    print(f"wrote {' and '.join(written)}")
    return 0


def report_command(args: argparse.Namespace) -> int:
    """Regenerate a report from a study's ``results.json`` (or a committed compact one)."""
    from .report import write_report

    source = Path(args.source)
    results = source if source.is_file() else source / "results.json"
    if not results.is_file():
        raise ConfigError(f"{source}: no results.json there; give a study folder (flat-l2o study --out DIR), "
                          "a report folder or a results.json file")
    try:
        data = json.loads(results.read_text())
        compact = bool(data.get("compact"))
        data["runs"]  # noqa: B018 - a results file has its runs
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{results} is not a study's results.json ({type(exc).__name__}: {exc})") from None
    if args.reading is not None and not Path(args.reading).is_file():
        raise ConfigError(f"--reading {args.reading}: no such file")
    # A compact file is a report's own: regenerate it in place. A full one keeps its study folder clean.
    target = Path(args.report_to) if args.report_to else results.parent if compact else results.parent / "report"
    print(f"wrote {write_report(data, target, reading=args.reading)}")
    return 0
