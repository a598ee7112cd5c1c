"""Train an ordinary ``nn.Module`` with a meta-trained learned optimizer.

Two people, two halves. The researcher meta-trains RNNProp on small MLPs and saves it
(one safetensors file: weights and the config that rebuilds it). The practitioner
loads that file into :class:`LearnedOptimizerTorch` and uses it like any
``torch.optim`` optimizer: ``zero_grad`` / ``backward`` / ``step``, ``state_dict`` in
the checkpoint, nothing else changes.

Run: ``python examples/torch_optimizer_face.py`` (meta-trains for about half a minute),
or ``python examples/torch_optimizer_face.py runs/face/rnnprop.safetensors`` to reuse a
saved optimizer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flat_l2o_plugin import create_optimizer, create_task
from flat_l2o_plugin.integrations.torch_optim import LearnedOptimizerTorch
from flat_l2o_plugin.optimizers.weights import save_learned_optimizer
from flat_l2o_plugin.tasks import load_dataset
from flat_l2o_plugin.training import MetaTrainConfig, MetaTrainer


def meta_train(out_dir: Path, meta_steps: int, seed: int = 0) -> Path:
    """The researcher's half: meta-train RNNProp on the digits MLP and save it."""
    torch.manual_seed(seed)
    learned = create_optimizer("rnnprop")
    task = create_task("mlp_digits")
    # Each trajectory starts from a fresh init seed; seeds below 1000 are kept for evaluation.
    sample_task = lambda gen: (task, int(torch.randint(1000, 10**6, (1,), generator=gen)))  # noqa: E731
    config = MetaTrainConfig(meta_steps=meta_steps, unroll=10, horizon=50, meta_lr=1e-2, val_every=0, seed=seed)
    MetaTrainer(learned, sample_task, config=config).train()
    return save_learned_optimizer(out_dir / "rnnprop.safetensors", learned, name="rnnprop")


def main(meta_steps: int = 200, train_steps: int = 300, out_dir: str | Path = "runs/torch_optimizer_face",
         weights: str | Path | None = None, batch_size: int = 128, seed: int = 0) -> dict[str, object]:
    """Meta-train (or load) a learned optimizer, then train a plain MLP with it.

    Args:
        meta_steps: Meta-training budget when ``weights`` is not given.
        train_steps: Steps of the ordinary training loop.
        out_dir: Where the weights file and the training checkpoint go.
        weights: A saved learned optimizer to use instead of meta-training one.
        batch_size: Mini-batch size of the ordinary training loop.
        seed: Seeds meta-training, the model's initialisation and the batches.

    Returns:
        ``{"weights": path, "losses": per-step training losses, "val_accuracy": float,
        "checkpoint": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if weights is None:
        weights = meta_train(out, meta_steps, seed)

    # The practitioner's half: an ordinary model, an ordinary loop.
    x_train, y_train = load_dataset("digits").split("train")
    x_val, y_val = load_dataset("digits").split("val")
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = LearnedOptimizerTorch(model.parameters(), weights=weights)
    batches = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(train_steps):
        idx = torch.randperm(x_train.shape[0], generator=batches)[:batch_size]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    checkpoint = out / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint)
    with torch.no_grad():
        val_accuracy = (model(x_val).argmax(1) == y_val).float().mean().item()
    return {"weights": str(weights), "losses": losses, "val_accuracy": val_accuracy, "checkpoint": str(checkpoint)}


if __name__ == "__main__":
    result = main(weights=sys.argv[1] if len(sys.argv) > 1 else None)
    losses = result["losses"]
    print(f"learned optimizer: {result['weights']}")
    print(f"training loss: first {losses[0]:.3f}, last {losses[-1]:.3f}; "  # type: ignore[index]
          f"validation accuracy {result['val_accuracy']:.3f}")
