"""The meta-learning-rate schedule: warmup, constant and cosine, as applied by the trainer."""

from __future__ import annotations

import math

import pytest

from flat_l2o_plugin import create_optimizer, create_task
from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.training import MetaTrainConfig, MetaTrainer, meta_learning_rate


def test_warmup_is_linear_and_ends_at_the_base_rate():
    rates = [meta_learning_rate(s, base=1.0, total=10, warmup=4) for s in range(6)]
    assert rates == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_decays_from_base_to_minimum_after_warmup():
    rate = lambda s: meta_learning_rate(s, base=1.0, total=12, schedule="cosine", warmup=2, minimum=0.1)  # noqa: E731
    assert rate(2) == pytest.approx(1.0)
    assert rate(7) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert rate(12) == pytest.approx(0.1)
    decay = [rate(s) for s in range(2, 13)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_unknown_schedule_names_the_field():
    with pytest.raises(ConfigError, match="meta_lr_schedule"):
        meta_learning_rate(0, base=1.0, total=1, schedule="linear")
    with pytest.raises(ConfigError, match="meta_lr_schedule"):
        MetaTrainConfig(meta_lr_schedule="step")


@pytest.mark.parametrize("bad", [{"meta_lr_warmup": -1}, {"meta_lr_min": 1.0, "meta_lr": 0.1},
                                 {"checkpoint_every": -2}])
def test_schedule_and_checkpoint_options_are_validated(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        MetaTrainConfig(**bad)


def test_trainer_applies_the_schedule_to_adam_and_logs_it():
    task = create_task("mlp_digits", batch_size=16)
    config = MetaTrainConfig(meta_steps=5, unroll=2, horizon=4, val_every=0, meta_lr=0.01,
                             meta_lr_schedule="cosine", meta_lr_warmup=1, meta_lr_min=0.001)
    trainer = MetaTrainer(create_optimizer("rnnprop"), lambda g: (task, 1), config=config)
    seen = []
    history = trainer.train(progress=lambda step: seen.append(trainer.meta_optimizer.param_groups[0]["lr"])).history
    expected = [trainer.meta_lr(s) for s in range(5)]
    assert [h["meta_lr"] for h in history] == expected == seen
    assert expected[0] == 0.01 and expected[1] == pytest.approx(0.01)
    assert expected[-1] == pytest.approx(0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
