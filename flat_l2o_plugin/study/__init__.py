"""The generalization study: does a learned optimizer's flatness transfer to architectures it never saw?

A study is driven by a regime file (:mod:`.regime`): the meta-training family, the
validation architectures that choose between candidates, the held-out tasks of the
report, the hand-designed baselines and their grids, and the learned-optimizer
candidates. :func:`run_study` runs it as cached, resumable jobs (:mod:`.jobs`,
:mod:`.pipeline`) on this machine or a cluster (:mod:`.executors`: a local pool, Dask,
Ray, SLURM); :func:`write_report` turns the results into markdown with paired,
two-level intervals and Holm-adjusted verdicts (:mod:`.stats`, :mod:`.report`).
``flat-l2o study`` (:mod:`.cli`) does both from the command line.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .pipeline import run_study
from .regime import Regime, load_regime, regime_from_dict
from .report import write_report

__all__ = ["Regime", "builtin_regime", "builtin_regimes", "load_regime", "regime_from_dict", "run_study",
           "write_report"]


def builtin_regimes() -> list[str]:
    """The names of the regime files that ship with the package."""
    return sorted(p.name[: -len(".toml")] for p in resources.files(__package__).joinpath("regimes").iterdir()
                  if p.name.endswith(".toml"))


def builtin_regime(name: str) -> Path:
    """The path of a shipped regime file, e.g. ``builtin_regime("gap")``."""
    from ..errors import ConfigError

    if name not in builtin_regimes():
        raise ConfigError(f"no built-in regime {name!r}; built-in: {', '.join(builtin_regimes())}")
    return Path(str(resources.files(__package__).joinpath("regimes", f"{name}.toml")))
