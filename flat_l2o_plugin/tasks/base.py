"""What every classification optimizee shares: batches, loss, evaluation on a split."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..protocols import Params
from .data import Dataset, load_dataset

__all__ = ["ClassificationTask"]


class ClassificationTask:
    """A functional classifier on a bundled dataset; subclasses define ``init_params`` and ``forward``.

    Args:
        dataset: A dataset name (see :func:`~flat_l2o_plugin.tasks.data.list_datasets`).
        batch_size: Training mini-batch size (drawn without replacement within a batch).
    """

    name: str

    def __init__(self, dataset: str, batch_size: int) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.data: Dataset = load_dataset(dataset)
        self.batch_size = batch_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"

    def init_params(self, seed: int) -> list[Tensor]:
        raise NotImplementedError  # abstract

    def forward(self, params: Params, x: Tensor) -> Tensor:
        raise NotImplementedError  # abstract

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.init_params(0))

    def sample_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x, y = self.data.split("train")
        idx = torch.randperm(x.shape[0], generator=generator)[: self.batch_size]
        return x[idx], y[idx]

    def loss(self, params: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.forward(params, x), y)

    def full_batch(self, split: str = "train") -> tuple[Tensor, Tensor]:
        return self.data.split(split)

    @torch.no_grad()
    def evaluate(self, params: Params, split: str = "test") -> dict[str, float]:
        x, y = self.data.split(split)
        logits = self.forward([p.detach() for p in params], x)
        return {"loss": float(F.cross_entropy(logits, y)),
                "accuracy": float((logits.argmax(-1) == y).float().mean())}
