"""The examples run end to end at a tiny budget."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_host_loop_example_runs_and_learns():
    losses = _load("host_loop").main(meta_steps=10, unroll=5, horizon=10)
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
