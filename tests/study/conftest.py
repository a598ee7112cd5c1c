"""The tiny study, run once for every test module that reads its results."""

from __future__ import annotations

from pathlib import Path

import pytest

from flat_l2o_plugin.study.jobs import Job, LocalExecutor
from flat_l2o_plugin.study.pipeline import run_study
from flat_l2o_plugin.study.regime import load_regime

TINY_REGIME = Path(__file__).resolve().parent / "tiny_regime.toml"


class CountingExecutor(LocalExecutor):
    """The local executor, remembering the jobs it ran."""

    def __init__(self) -> None:
        super().__init__(workers=1)
        self.ran: list[Job] = []

    def run(self, jobs, cache_dir, on_done=None):
        self.ran += list(jobs)
        return super().run(jobs, cache_dir, on_done)


@pytest.fixture(scope="session")
def counting_executor() -> type[CountingExecutor]:
    return CountingExecutor


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """``(out, results, executor)`` of the study of ``tiny_regime.toml``."""
    out = tmp_path_factory.mktemp("tiny")
    executor = CountingExecutor()
    results = run_study(load_regime(TINY_REGIME), out, executor=executor)
    return out, results, executor
