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


def test_zoo_enhanced_training_example_runs_every_model():
    from flat_l2o_plugin import list_optimizers

    results = _load("zoo_enhanced_training").main(meta_steps=6, curriculum=(4, 8), unroll=2, imitation_prob=0.5,
                                                  eval_steps=5)
    assert set(results) == set(list_optimizers())
    for row in results.values():
        assert 0.0 <= row["val_accuracy"] <= 1.0 and math.isfinite(row["val_loss"])
        assert row["imitation_unrolls"] >= 1
