"""Studies run once per session and shared: the tiny regime, and the shipped regime's --quick budget.

Both run on the local executor in this process; the executor tests compare what other
engines produce with them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from flat_l2o_plugin.study import builtin_regime, load_regime, run_study
from flat_l2o_plugin.study.executors import LocalExecutor
from flat_l2o_plugin.study.pipeline import without_wall_clock

HERE = Path(__file__).resolve().parent
TINY = HERE / "tiny_regime.toml"


class CountingExecutor(LocalExecutor):
    """The local executor in this process, remembering every job it ran."""

    def __init__(self) -> None:
        super().__init__(workers=1)
        self.ran: list[Any] = []

    def run(self, jobs, cache_dir, on_done=None):
        self.ran += list(jobs)
        return super().run(jobs, cache_dir, on_done)


@pytest.fixture(scope="session")
def counting_executor() -> type[CountingExecutor]:
    return CountingExecutor


@pytest.fixture(scope="session")
def same_results() -> Callable[[dict, dict], None]:
    """Asserts two studies' results are equal but for wall-clock fields (NaN equals NaN)."""
    import json

    def check(got: dict, expected: dict) -> None:
        # Through JSON, as results.json holds them: NaN compares equal as the same token.
        a = json.dumps(without_wall_clock(got), sort_keys=True, default=str)
        b = json.dumps(without_wall_clock(expected), sort_keys=True, default=str)
        assert a == b

    return check


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """``(folder, results, executor)`` of the tiny regime's study, run locally in this process."""
    out = tmp_path_factory.mktemp("tiny")
    executor = CountingExecutor()
    results = run_study(load_regime(TINY), out, executor=executor)
    return out, results, executor


@pytest.fixture(scope="session")
def quick_study(tmp_path_factory):
    """``(folder, results)`` of the shipped ``gap`` regime's --quick study, run locally in this process."""
    out = tmp_path_factory.mktemp("gap-quick")
    results = run_study(load_regime(builtin_regime("gap"), quick=True), out, executor=LocalExecutor(1))
    return out, results


@pytest.fixture(scope="session")
def tiny(tiny_study):
    """The tiny study under the name the card tests use."""
    return tiny_study
