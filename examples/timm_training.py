"""A timm training loop whose optimizer is a meta-trained learned optimizer.

The loop is the shape of timm's own ``train.py``: the configuration is an argparse
namespace, the optimizer comes from ``create_optimizer_v2(model, **optimizer_kwargs(args))``
and the schedule from ``create_scheduler_v2(optimizer, **scheduler_kwargs(args))``. The
only addition is one call, ``register_with_timm``, after which ``--opt l2o-rnnprop``
means our learned optimizer. ``--lr`` is then a multiplier on the learned update
(1.0 = as meta-trained), so the cosine schedule anneals the learned steps. timm's own
``train.py`` needs no such call: ``--device-modules flat_l2o_plugin.integrations.timm_train``
registers every installed learned optimizer (see that module).

The data are generated (ten faint coarse patterns under unit noise, 32x32), so nothing
is downloaded.

Run: ``python examples/timm_training.py runs/face/rnnprop.safetensors`` with a file
written by ``examples/torch_optimizer_face.py``, or without an argument to meta-train one
first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.optim._optim_factory import optimizer_kwargs
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler_factory import scheduler_kwargs

from flat_l2o_plugin import create_optimizer, create_task
from flat_l2o_plugin.integrations.timm import register_with_timm
from flat_l2o_plugin.optimizers.weights import save_learned_optimizer
from flat_l2o_plugin.training import MetaTrainConfig, MetaTrainer


def default_args(**overrides: object) -> argparse.Namespace:
    """The host's configuration, with timm's argument names."""
    args = argparse.Namespace(
        model="convnext_atto",
        # Shrunk so that a CPU trains it in seconds; any timm model works.
        model_kwargs={"dims": (8, 16, 24, 32), "depths": (1, 1, 1, 1)},
        num_classes=10,
        img_size=32,
        opt="l2o-rnnprop",
        # A multiplier on the learned update. The optimizer was meta-trained on a small
        # MLP; on a conv net its steps are too large as they come, and 0.1 transfers it.
        lr=0.1,
        weight_decay=1e-4,
        momentum=0.9,  # timm passes it; a learned optimizer has no use for it and drops it
        sched="cosine",
        epochs=10,
        warmup_epochs=0,
        min_lr=0.0,
        batch_size=64,
        updates_per_epoch=20,
        seed=0,
    )
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def meta_train(out_dir: Path, meta_steps: int, seed: int = 0) -> Path:
    """Meta-train RNNProp on the digits MLP briefly and save it (the researcher's side)."""
    torch.manual_seed(seed)
    learned = create_optimizer("rnnprop")
    task = create_task("mlp_digits")
    sample_task = lambda gen: (task, int(torch.randint(1000, 10**6, (1,), generator=gen)))  # noqa: E731
    config = MetaTrainConfig(meta_steps=meta_steps, unroll=10, horizon=50, meta_lr=1e-2, val_every=0, seed=seed)
    MetaTrainer(learned, sample_task, config=config).train()
    return save_learned_optimizer(out_dir / "rnnprop.safetensors", learned, name="rnnprop")


def synthetic_images(count: int, size: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Faint coarse patterns, one per class, under unit noise: learnable, nothing to download."""
    gen = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.randn(num_classes, 3, 4, 4, generator=gen), size=(size, size), mode="bilinear")
    labels = torch.randint(0, num_classes, (count,), generator=gen)
    return 0.1 * patterns[labels] + torch.randn(count, 3, size, size, generator=gen), labels


def main(weights: str | Path | None = None, *, epochs: int = 10, updates_per_epoch: int = 20,
         meta_steps: int = 200, out_dir: str | Path = "runs/timm_training") -> dict[str, list[float]]:
    """Train a timm model with the learned optimizer; return per-epoch metrics.

    Args:
        weights: A file from ``save_learned_optimizer``; ``None`` meta-trains one first
            (``meta_steps`` steps, the recipe of ``examples/torch_optimizer_face.py``).
        epochs: Training epochs.
        updates_per_epoch: Optimizer steps per epoch.
        meta_steps: Meta-training budget when ``weights`` is ``None``.
        out_dir: Where a freshly meta-trained optimizer is saved.

    Returns:
        ``{"train_loss": [...], "val_accuracy": [...], "lr": [...]}``, one entry per epoch.
    """
    args = default_args(epochs=epochs, updates_per_epoch=updates_per_epoch)
    if weights is None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        weights = meta_train(out, meta_steps, args.seed)

    register_with_timm(args.opt, weights=weights)  # the one line the host adds

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, **args.model_kwargs)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                updates_per_epoch=args.updates_per_epoch)

    images, labels = synthetic_images(1024, args.img_size, args.num_classes, args.seed)
    train_x, train_y, val_x, val_y = images[:768], labels[:768], images[768:], labels[768:]
    batches = torch.Generator().manual_seed(args.seed)
    history: dict[str, list[float]] = {"train_loss": [], "val_accuracy": [], "lr": []}
    num_updates = 0
    for epoch in range(num_epochs):
        model.train()
        total = 0.0
        for _ in range(args.updates_per_epoch):
            idx = torch.randint(0, train_x.shape[0], (args.batch_size,), generator=batches)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
            loss.backward()
            optimizer.step()
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            total += loss.item()
        model.eval()
        with torch.no_grad():
            accuracy = (model(val_x).argmax(1) == val_y).float().mean().item()
        history["train_loss"].append(total / args.updates_per_epoch)
        history["val_accuracy"].append(accuracy)
        history["lr"].append(optimizer.param_groups[0]["lr"])
        scheduler.step(epoch + 1, accuracy)
    return history


if __name__ == "__main__":
    result = main(sys.argv[1] if len(sys.argv) > 1 else None)
    for epoch, (loss, acc, lr) in enumerate(zip(result["train_loss"], result["val_accuracy"], result["lr"])):
        print(f"epoch {epoch}: train loss {loss:.3f}, val accuracy {acc:.3f}, lr {lr:.3f}")
