"""The examples run end to end at a tiny budget."""

from __future__ import annotations

import math


def test_host_loop_example_runs_and_learns(load_example):
    losses = load_example("host_loop").main(meta_steps=10, unroll=5, horizon=10)
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)


def test_zoo_enhanced_training_example_runs_every_model(load_example):
    from flat_l2o_plugin import list_optimizers

    results = load_example("zoo_enhanced_training").main(meta_steps=6, curriculum=(4, 8), unroll=2, imitation_prob=0.5,
                                                  eval_steps=5)
    assert set(results) == set(list_optimizers())
    for row in results.values():
        assert 0.0 <= row["val_accuracy"] <= 1.0 and math.isfinite(row["val_loss"])
        assert row["imitation_unrolls"] >= 1
