"""What every classification optimizee shares: batches, loss, evaluation on a split."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..protocols import Params
from .data import Dataset, load_dataset, positive_int

__all__ = ["ClassificationTask"]


class ClassificationTask:
    """A functional classifier on a registered dataset; subclasses define ``init_params`` and ``forward``.

    Args:
        dataset: A dataset name (see :func:`~flat_l2o_plugin.tasks.data.list_datasets`).
        batch_size: Training mini-batch size (drawn without replacement within a batch).
        dataset_options: The dataset's options, e.g. ``{"train_samples": 500}`` for
            ``mnist1d`` or ``{"root": "/data"}`` for ``mnist``.
        train_subset: Train on only this many examples of the ``train`` split, chosen
            by ``train_subset_seed``; ``None`` trains on all of it. ``evaluate(params,
            "train")`` and ``full_batch("train")`` then mean this subset, the task's own
            training set. Task families use it to vary the data between tasks.
        train_subset_seed: Which subset (a fixed permutation per seed).
        eval_batch_size: ``evaluate`` runs the model on chunks of at most this many
            examples (bounding memory on large splits); splits that fit in one chunk
            are evaluated in one pass.
    """

    name: str

    def __init__(self, dataset: str, batch_size: int, *, dataset_options: Mapping[str, Any] | None = None,
                 train_subset: int | None = None, train_subset_seed: int = 0, eval_batch_size: int = 1024) -> None:
        owner = type(self).__name__
        positive_int(owner, "batch_size", batch_size)
        positive_int(owner, "eval_batch_size", eval_batch_size)
        if dataset_options is not None and not isinstance(dataset_options, Mapping):
            raise ConfigError(f"{owner}: dataset_options must be a mapping of option names to values, "
                              f"got {type(dataset_options).__name__}")
        self.data: Dataset = load_dataset(dataset, **dict(dataset_options or {}))
        self.dataset, self.dataset_options = dataset, dict(dataset_options or {})
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        x, y = self.data.split("train")
        if train_subset is not None:
            positive_int(owner, "train_subset", train_subset)
            positive_int(owner, "train_subset_seed", train_subset_seed, minimum=0)
            if train_subset > len(y):
                raise ConfigError(f"{owner}: train_subset={train_subset} exceeds the {len(y)} examples of "
                                  f"dataset {dataset!r}'s train split")
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(train_subset_seed))
            self._heldout = (x[order[train_subset:]], y[order[train_subset:]])
            x, y = x[order[:train_subset]], y[order[:train_subset]]
        else:
            self._heldout = (x[:0], y[:0])
        self.train_subset, self.train_subset_seed = train_subset, train_subset_seed
        self._train = (x, y)

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
        x, y = self._train
        idx = torch.randperm(x.shape[0], generator=generator)[: self.batch_size]
        return x[idx], y[idx]

    def sample_heldout_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A mini-batch of the ``train`` split's examples that this task does not train on.

        With ``train_subset``, the rest of the dataset's ``train`` split is data from the
        same distribution that the optimizee never sees: a meta-objective measured on it
        (``MetaTrainConfig.meta_objective="heldout"``) rewards generalization, while
        ``val`` stays untouched for model selection and ``test`` for the final report.

        Raises:
            ConfigError: The task trains on the whole ``train`` split (no ``train_subset``
                smaller than it), so nothing is held out.
        """
        x, y = self._heldout
        if not len(y):
            raise ConfigError(f"{type(self).__name__} {self.name}: no held-out training data; set train_subset "
                              f"below the train split's {len(self._train[1])} examples to hold some out")
        idx = torch.randperm(x.shape[0], generator=generator)[: self.batch_size]
        return x[idx], y[idx]

    def loss(self, params: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        logits = self.forward(params, x)
        return F.cross_entropy(logits, y.to(logits.device))

    def full_batch(self, split: str = "train") -> tuple[Tensor, Tensor]:
        """The whole of ``split`` as one batch (for ``train``: this task's training set)."""
        return self._train if split == "train" else self.data.split(split)

    @torch.no_grad()
    def evaluate(self, params: Params, split: str = "test") -> dict[str, float]:
        """Cross-entropy ``loss`` and ``accuracy`` on the whole of ``split``."""
        x, y = self.full_batch(split)
        detached = [p.detach() for p in params]
        chunks = torch.tensor_split(x, max(1, math.ceil(len(x) / self.eval_batch_size)))
        logits = torch.cat([self.forward(detached, chunk) for chunk in chunks])
        y = y.to(logits.device)
        return {"loss": float(F.cross_entropy(logits, y)),
                "accuracy": float((logits.argmax(-1) == y).float().mean())}
