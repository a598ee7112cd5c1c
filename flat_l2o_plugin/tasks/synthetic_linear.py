"""Generated features labelled by a random multinomial-logit teacher.

Features are standard Gaussian, ``x ~ N(0, I_features)``. A teacher with weights
``W* ~ N(0, teacher_scale^2 / features)`` draws each label from ``softmax(W* x)`` (with
the Gumbel-max trick), so multinomial logistic regression is exactly the model that
generated the data: its population loss is minimized at ``W*``, and the Bayes accuracy
is below 1, like a real, noisy classification problem. ``teacher_scale`` sets the
logits' standard deviation, hence how separable the classes are.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from ..errors import ConfigError
from .data import Dataset, positive_int

__all__ = ["load_synthetic_linear"]


def load_synthetic_linear(features: int = 20, num_classes: int = 2, train_samples: int = 1000,
                          val_samples: int = 500, test_samples: int = 500, teacher_scale: float = 4.0,
                          seed: int = 0) -> Dataset:
    """A well-specified logistic-regression dataset.

    Args:
        features: Dimension of ``x``.
        num_classes: Number of classes (>= 2).
        train_samples, val_samples, test_samples: Examples in each split.
        teacher_scale: Standard deviation of the teacher's logits.
        seed: Seeds the teacher and every split.

    Raises:
        ConfigError: An option out of range (the message names it).
    """
    owner = "dataset 'synthetic_linear'"
    positive_int(owner, "num_classes", num_classes, minimum=2)
    for field, value in (("features", features), ("train_samples", train_samples), ("val_samples", val_samples),
                         ("test_samples", test_samples)):
        positive_int(owner, field, value)
    positive_int(owner, "seed", seed, minimum=0)
    if not isinstance(teacher_scale, (int, float)) or isinstance(teacher_scale, bool) or not teacher_scale > 0:
        raise ConfigError(f"{owner}: teacher_scale must be a number > 0, got {teacher_scale!r}")
    return _build(features, num_classes, train_samples, val_samples, test_samples, float(teacher_scale), seed)


@lru_cache(maxsize=None)
def _build(features: int, num_classes: int, train_samples: int, val_samples: int, test_samples: int,
           teacher_scale: float, seed: int) -> Dataset:
    teacher = torch.randn(num_classes, features, generator=torch.Generator().manual_seed(seed))
    teacher *= teacher_scale / features ** 0.5
    splits = {}
    for index, (split, count) in enumerate((("train", train_samples), ("val", val_samples),
                                            ("test", test_samples))):
        generator = torch.Generator().manual_seed(1_000_003 * seed + 7919 * (index + 1))
        splits[split] = _draw(teacher, count, generator)
    return Dataset("synthetic_linear", splits, num_classes=num_classes)


def _draw(teacher: Tensor, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randn(count, teacher.shape[1], generator=generator)
    uniform = torch.rand(count, teacher.shape[0], generator=generator).clamp_min(1e-12)
    gumbel = -torch.log(-torch.log(uniform))
    return x, (x @ teacher.T + gumbel).argmax(dim=1)
