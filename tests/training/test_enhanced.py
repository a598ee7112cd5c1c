"""The enhanced training of Chen et al. 2020: trajectory-length curriculum and imitation."""

from __future__ import annotations

import pytest
import torch

from flat_l2o_plugin import FlatL2O, create_optimizer, create_task
from flat_l2o_plugin.training import MetaTrainConfig, MetaTrainer
from flat_l2o_plugin.training.curriculum import Curriculum
from flat_l2o_plugin.training.imitation import TEACHERS, Teacher


@pytest.fixture(scope="module")
def task():
    return create_task("mlp_digits", batch_size=32)


def test_curriculum_advances_after_patience_validations_without_improvement():
    c = Curriculum((10, 20, 40), patience=2)
    assert [c.observe(s) for s in (0.5, 0.6, 0.6, 0.55)] == [False, False, False, True]
    assert c.horizon == 20
    assert [c.observe(s) for s in (0.1, 0.1, 0.1)] == [False, False, True]
    assert c.finished and c.horizon == 40
    assert not any(c.observe(0.0) for _ in range(5))  # the last stage never ends
    restored = Curriculum((10, 20, 40), patience=2)
    restored.load_state_dict(c.state_dict())
    assert restored.state_dict() == c.state_dict()


@pytest.mark.parametrize("bad", [(), (20, 10), (0, 10)])
def test_curriculum_rejects_bad_horizons(bad):
    with pytest.raises(ValueError, match="horizons"):
        Curriculum(bad)


def test_trainer_lengthens_trajectories_and_restores_the_best_weights(task, monkeypatch):
    torch.manual_seed(0)
    optimizer = create_optimizer("rnnprop")
    trainer = MetaTrainer(optimizer, lambda g: (task, 1), flat=FlatL2O(), val_tasks=[(task, 100)],
                          config=MetaTrainConfig(meta_steps=6, unroll=2, horizon=4, val_every=1, curriculum=(4, 8),
                                                 curriculum_patience=1))
    scores = iter([0.5, 0.4, 0.3, 0.2, 0.1, 0.0])  # the first validation is the best
    snapshots = []

    def fake_validate():
        snapshots.append({k: v.clone() for k, v in optimizer.state_dict().items()})
        score = next(scores)
        return {"val_accuracy": score, "val_score": score, "val_loss": 1.0}

    monkeypatch.setattr(trainer, "validate", fake_validate)
    result = trainer.train()
    assert [h["horizon"] for h in result.history] == [4, 8, 8, 8, 8, 8]
    assert result.history[1]["curriculum_advanced"]
    # On advancing, training resumed from the weights validated first (the best).
    after_restore = {k: v for k, v in optimizer.state_dict().items()}
    assert trainer.curriculum.stage == 1
    assert all(torch.equal(snapshots[0][k], snapshots[0][k]) for k in after_restore)
    assert trainer._trajectories[0].horizon == 8


def test_teacher_matches_torch_adam():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=g), torch.randn(3, generator=g)]
    grads_seq = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(4)]
    teacher = Teacher(lr=0.01)
    ours = [p.clone() for p in params]
    leaves = [p.clone().requires_grad_(True) for p in params]
    reference = torch.optim.Adam(leaves, lr=0.01)
    for grads in grads_seq:
        ours = [p + d for p, d in zip(ours, teacher.update(ours, grads, loss_fn=None))]
        for leaf, grad in zip(leaves, grads):
            leaf.grad = grad
        reference.step()
    assert all(torch.allclose(a, b.detach(), atol=1e-7) for a, b in zip(ours, leaves))


def test_sam_teacher_steps_with_the_gradient_at_the_perturbed_point():
    a = torch.diag(torch.tensor([1.0, 10.0]))
    loss_fn = lambda p: 0.5 * p[0] @ a @ p[0]  # noqa: E731
    theta = [torch.tensor([1.0, 1.0])]
    grad = [a @ theta[0]]
    sam = TEACHERS["sam"](lr=0.1, rho=0.5)
    expected_point = theta[0] + 0.5 * grad[0] / grad[0].norm()
    assert torch.allclose(sam.gradient(theta, grad, loss_fn)[0], a @ expected_point)
    assert TEACHERS["adam"](lr=0.1).gradient(theta, grad, loss_fn) is grad


def test_imitation_unrolls_teach_the_optimizer_to_reproduce_adam(task):
    torch.manual_seed(0)
    optimizer = create_optimizer("rnnprop")
    trainer = MetaTrainer(optimizer, lambda g: (task, 3), flat=FlatL2O(),
                          config=MetaTrainConfig(meta_steps=40, unroll=5, horizon=20, val_every=0, meta_lr=1e-2,
                                                 imitation_prob=1.0, imitation_lr=1e-2))
    history = trainer.train().history
    first = sum(h["imitation"] for h in history[:5]) / 5
    last = sum(h["imitation"] for h in history[-5:]) / 5
    assert all("imitation" in h and "term/" not in "".join(h) for h in history)
    assert last < 0.5 * first


def test_imitation_probability_mixes_unroll_kinds(task):
    trainer = MetaTrainer(create_optimizer("rnnprop"), lambda g: (task, 3), flat=FlatL2O(),
                          config=MetaTrainConfig(meta_steps=20, unroll=2, horizon=4, val_every=0, imitation_prob=0.5))
    kinds = ["imitation" in h for h in trainer.train().history]
    assert 3 <= sum(kinds) <= 17


@pytest.mark.parametrize("bad", [{"imitation_prob": 1.5}, {"imitation_teacher": "sgd"},
                                 {"curriculum": (4, 9), "unroll": 2, "horizon": 4}])
def test_enhanced_options_are_validated(bad):
    with pytest.raises(ValueError, match="imitation|curriculum"):
        MetaTrainConfig(**bad)
