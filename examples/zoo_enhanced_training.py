"""The learned-optimizer zoo, meta-trained with the "enhanced" recipe of Chen et al. 2020.

Each registered model (L2O-DM, RNNProp, L2O-Scale) is meta-trained on the digits MLP
with a trajectory-length curriculum (stages advance when validation stops improving,
restarting from the best weights) and imitation of Adam's updates on a fraction of the
unrolls, then trains a held-out optimizee. Everything is configuration of the reference
host: no model code changes.
Run: ``python examples/zoo_enhanced_training.py``.
"""

from __future__ import annotations

import torch

from flat_l2o_plugin import FlatL2O, create_optimizer, create_task, list_optimizers
from flat_l2o_plugin.training import MetaTrainConfig, MetaTrainer, train_with_learned_optimizer


def main(meta_steps: int = 60, curriculum: tuple[int, ...] = (20, 40, 80), unroll: int = 10,
         imitation_prob: float = 0.2, eval_steps: int = 100, seed: int = 0) -> dict[str, dict[str, float]]:
    """Meta-train every registered zoo model; return its held-out validation accuracy and loss."""
    task = create_task("mlp_digits")
    results = {}
    for name in list_optimizers():
        torch.manual_seed(seed)
        optimizer = create_optimizer(name)
        config = MetaTrainConfig(meta_steps=meta_steps, unroll=unroll, horizon=curriculum[0], seed=seed,
                                 val_every=max(1, meta_steps // 6), curriculum=curriculum, curriculum_patience=1,
                                 imitation_prob=imitation_prob, imitation_teacher="adam", imitation_lr=1e-2)
        # Meta-training init seeds >= 1000; validation seeds 100..; held-out seed 0 below.
        sample = lambda g: (task, 1000 + int(torch.randint(0, 10**6, (1,), generator=g)))  # noqa: E731
        trainer = MetaTrainer(optimizer, sample, flat=FlatL2O(), config=config, val_tasks=[(task, 100), (task, 101)])
        result = trainer.train()
        run = train_with_learned_optimizer(optimizer, task, 0, eval_steps)
        metrics = task.evaluate(run.params, "val")
        results[name] = {"val_accuracy": metrics["accuracy"], "val_loss": metrics["loss"],
                         "curriculum_stage": trainer.curriculum.stage,
                         "imitation_unrolls": sum("imitation" in h for h in result.history)}
    return results


if __name__ == "__main__":
    for name, row in main().items():
        print(f"{name:<10} held-out val accuracy {row['val_accuracy']:.3f}, loss {row['val_loss']:.3f}, "
              f"curriculum stage {row['curriculum_stage']}, imitation unrolls {row['imitation_unrolls']}")
