"""Divergence never reaches φ: absurd scales and NaN tasks are dropped, logged, and training goes on."""

from __future__ import annotations

import logging
import math
import re

import torch

from flat_l2o_plugin import create_optimizer, create_task
from flat_l2o_plugin.training import MetaTrainConfig, MetaTrainer


class ScaledInit:
    """A task whose initial parameters are multiplied by ``scale``."""

    def __init__(self, task, scale):
        self.task, self.scale, self.name = task, scale, f"scaled_init_{scale:g}"

    def __getattr__(self, name):
        return getattr(self.task, name)

    def init_params(self, seed):
        return [p * self.scale for p in self.task.init_params(seed)]


class NaNLoss:
    """A task whose loss is NaN everywhere."""

    def __init__(self, task):
        self.task, self.name = task, "nan_loss"

    def __getattr__(self, name):
        return getattr(self.task, name)

    def loss(self, params, batch):
        return self.task.loss(params, batch) * math.nan


def _weights(optimizer):
    return torch.cat([p.detach().reshape(-1).clone() for p in optimizer.parameters()])


def test_absurd_scales_and_nan_tasks_never_reach_the_weights_and_training_continues(caplog):
    task = create_task("mlp_digits", batch_size=32)
    # Cycled per new trajectory: healthy, finite but absurd (1e6: clipped update), overflowing
    # to inf (1e38), NaN everywhere. Each slot draws its own index.
    tasks = [task, ScaledInit(task, 1e6), ScaledInit(task, 1e38), NaNLoss(task)]

    def sample(generator):
        index = int(torch.randint(0, len(tasks), (1,), generator=generator))
        return tasks[index], 1000 + index

    torch.manual_seed(0)
    optimizer = create_optimizer("rnnprop")
    trainer = MetaTrainer(optimizer, sample, config=MetaTrainConfig(meta_steps=12, unroll=2, horizon=4,
                                                                    meta_batch=2, val_every=0, seed=4))
    snapshots = []
    with caplog.at_level(logging.WARNING, logger="flat_l2o_plugin.training.meta_trainer"):
        result = trainer.train(progress=lambda step: snapshots.append(_weights(optimizer)))
    assert all(torch.isfinite(w).all() for w in snapshots)
    history = result.history
    dropped = [h for h in history if h["diverged"]]
    assert dropped and result.diverged == sum(h["diverged"] for h in history) == history[-1]["diverged_total"]
    assert {h["diverged_task"] for h in dropped} <= {"scaled_init_1e+38", "nan_loss"}
    for h in dropped:
        assert h["diverged_seed"] in (1002, 1003) and 0 <= h["diverged_step"] < 4
        line = f"meta-step {h['meta_step']}: trajectory slot"
        assert any(line in r.getMessage() and h["diverged_task"] in r.getMessage()
                   and f"init seed {h['diverged_seed']}" in r.getMessage()
                   and f"optimizee step {h['diverged_step']}" in r.getMessage() for r in caplog.records)
    # Training continued: φ was updated after the first divergence, from the finite unrolls.
    first = history.index(dropped[0])
    updated_after = [i for i in range(first, len(history)) if "meta_grad_norm" in history[i]]
    assert updated_after
    assert not torch.equal(snapshots[first], snapshots[updated_after[-1]])
    assert all(math.isfinite(h["meta_loss"]) for h in history if "meta_grad_norm" in h)


def test_a_non_finite_meta_gradient_is_not_applied_and_resets_every_trajectory(caplog):
    task = create_task("mlp_digits", batch_size=32)
    torch.manual_seed(0)
    # A huge output scale: the losses stay finite, their meta-gradient does not.
    optimizer = create_optimizer("rnnprop", output_scale=1e30)
    before = _weights(optimizer)
    trainer = MetaTrainer(optimizer, lambda g: (task, 1), config=MetaTrainConfig(meta_steps=2, unroll=2, horizon=4,
                                                                                 meta_batch=2, val_every=0))
    with caplog.at_level(logging.WARNING, logger="flat_l2o_plugin.training.meta_trainer"):
        history = trainer.train().history
    assert all(h["meta_grad_non_finite"] and h["skipped"] and math.isfinite(h["meta_loss"]) for h in history)
    assert torch.equal(before, _weights(optimizer))
    assert trainer._trajectories == [None, None]
    named = [r.getMessage() for r in caplog.records if "meta-gradient is not finite" in r.getMessage()]
    slot = r"trajectory slot {}: task mlp_digits\[[^]]*\], init seed 1, optimizee steps \d+-\d+"
    assert len(named) == 2 and all(re.search(f"from {slot.format(0)}; {slot.format(1)}\\)", m) for m in named)
    assert all(h["non_finite_task"] == task.name and h["non_finite_seed"] == 1 for h in history)
