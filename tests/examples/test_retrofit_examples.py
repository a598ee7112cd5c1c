"""The retrofit examples run end to end at a tiny budget."""

from __future__ import annotations

import math

import pytest


def test_retrofit_foreign_optimizer_example_meta_trains_with_the_term(load_example):
    logs = load_example("retrofit_foreign_optimizer").main(meta_steps=2, unroll=2, horizon=4, probes=1)
    assert len(logs["meta_loss"]) == 2 and all(math.isfinite(x) for x in logs["meta_loss"])
    # start_fraction 0.5 of a 4-step trajectory: the first unroll (θ_1, θ_2) already reaches θ_2.
    assert logs["hessian_trace"][0] != 0.0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # gym, imported by learn2learn
def test_learn2learn_example_runs_with_the_term(tmp_path, load_example, examples_dir):
    pytest.importorskip("learn2learn")
    config = tmp_path / "experiment.toml"
    config.write_text((examples_dir / "learn2learn_flatness.toml").read_text()
                      .replace("steps = 200", "steps = 3").replace("batch_size = 64", "batch_size = 16"))
    logs = load_example("learn2learn_flatness").main(config, overrides=["regularizers.hessian_trace.probes=1"])
    assert len(logs["loss"]) == 3 and all(math.isfinite(x) for x in logs["loss"])
    assert all(t != 0.0 for t in logs["hessian_trace"])
    assert 0.0 <= logs["val_accuracy"][0] <= 1.0
