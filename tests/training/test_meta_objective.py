"""The held-out meta-objective and validation of the initial weights."""

from __future__ import annotations

import pytest
import torch

from flat_l2o_plugin import FlatL2O, create_optimizer, create_task, get_plugin_manager
from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.training import MetaTrainConfig, MetaTrainer

TINY = dict(meta_steps=1, unroll=3, horizon=6, val_every=0, clip=0.0)


@pytest.fixture(scope="module")
def task():
    # 300 training examples of digits' 1,000: 700 held out from this optimizee.
    return create_task("mlp", dataset="digits", hidden_sizes=(8,), batch_size=32, train_subset=300)


def _trainer(task, **config):
    torch.manual_seed(0)
    optimizer = create_optimizer("learned_correction", hidden_size=4)
    flat = FlatL2O({}, plugin_manager=get_plugin_manager(entry_points=False))
    return optimizer, MetaTrainer(optimizer, lambda g: (task, 7), flat=flat,
                                  config=MetaTrainConfig(**{**TINY, **config}))


def test_heldout_batches_never_overlap_the_training_set(task):
    x_train, _ = task.full_batch("train")
    x_held, _ = task.sample_heldout_batch(torch.Generator().manual_seed(0))
    assert x_held.shape[0] == 32
    train_rows = {tuple(row.tolist()) for row in x_train}
    assert not any(tuple(row.tolist()) in train_rows for row in x_held)
    whole = create_task("mlp", dataset="digits", hidden_sizes=(8,))
    with pytest.raises(ConfigError, match="train_subset"):
        whole.sample_heldout_batch(torch.Generator())


def test_heldout_objective_is_the_loss_on_held_out_batches(task):
    """The meta-loss equals the mean held-out loss along the iterates (recomputed by hand)."""
    optimizer, trainer = _trainer(task, meta_objective="heldout")
    logs = trainer.step(0)
    _, reference = _trainer(task, meta_objective="train")
    plain = reference.step(0)
    assert logs["meta_loss"] != plain["meta_loss"]
    # Replay the unroll: the same batch stream, the held-out batch drawn after each training batch.
    torch.manual_seed(0)
    replay = create_optimizer("learned_correction", hidden_size=4)
    traj = MetaTrainer(replay, lambda g: (task, 7), config=MetaTrainConfig(**TINY))._new_trajectory(0)
    params, state, total = traj.params, traj.state, 0.0
    batches = traj.generator
    loss_fn = lambda p, b=task.sample_batch(batches): task.loss(p, b)  # noqa: E731
    for _ in range(3):
        leaves = [p.detach().requires_grad_(True) for p in params]
        grads = [g.detach() for g in torch.autograd.grad(loss_fn(leaves), leaves)]
        with torch.no_grad():
            params, state = replay.step(leaves, grads, state)
        loss_fn = lambda p, b=task.sample_batch(batches): task.loss(p, b)  # noqa: E731
        total += float(task.loss(params, task.sample_heldout_batch(batches)))
    assert logs["meta_loss"] == pytest.approx(total / 3, rel=1e-6)


def test_heldout_objective_needs_tasks_that_hold_data_out():
    whole = create_task("mlp", dataset="digits", hidden_sizes=(8,))
    _, trainer = _trainer(whole, meta_objective="heldout")
    with pytest.raises(ConfigError, match="held-out training data"):
        trainer.step(0)
    with pytest.raises(ConfigError, match="meta_objective"):
        MetaTrainConfig(meta_objective="validation")


def test_val_at_start_lets_the_initial_weights_win(task):
    """Validation scores that only fall: with val_at_start the initial weights are restored."""
    for at_start in (False, True):
        optimizer, trainer = _trainer(task, meta_steps=2, val_every=1, val_at_start=at_start)
        trainer.val_tasks = [(task, 100)]
        falling = iter([0.5, 0.4, 0.3] if at_start else [0.4, 0.3])
        trainer.validate = lambda: {"val_score": next(falling), "val_loss": 1.0}
        initial = {k: v.clone() for k, v in optimizer.state_dict().items()}
        result = trainer.train()
        assert [v["meta_step"] for v in result.validation] == ([0, 1, 2] if at_start else [1, 2])
        assert result.best_step == (0 if at_start else 1)
        restored = all(torch.equal(v, initial[k]) for k, v in optimizer.state_dict().items())
        assert restored == at_start
