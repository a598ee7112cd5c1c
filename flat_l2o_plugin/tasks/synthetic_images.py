"""Generated images with a learnable rule, for vision models without any files on disk.

Each class ``k`` owns a smooth random pattern ``P_k`` (channels x side x side): a
4x4 grid of Gaussian values per channel, bilinearly upsampled and scaled to unit
standard deviation. An example of class ``k`` is ``P_k`` shifted circularly by up to
``side // 4`` pixels in each direction, plus i.i.d. Gaussian noise of standard deviation
``noise``. The class is thus recoverable from local structure, as in a real image
set, yet the rule is simple enough that a small convolutional net or ViT learns it in a
few dozen Adam steps: what timm tasks need in tests and smoke runs.

The patterns depend only on ``seed``; each split draws its examples from its own
generator, so changing ``train_samples`` never changes ``val`` or ``test``.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .data import Dataset, positive_int

__all__ = ["load_synthetic_images"]


def load_synthetic_images(side: int = 16, channels: int = 3, num_classes: int = 10, train_samples: int = 1000,
                          val_samples: int = 250, test_samples: int = 250, noise: float = 1.0,
                          seed: int = 0) -> Dataset:
    """Generated ``(channels, side, side)`` images in ``num_classes`` classes.

    Args:
        side: Image height and width (>= 4).
        channels: Image channels.
        num_classes: Number of classes (>= 2).
        train_samples, val_samples, test_samples: Images in each split.
        noise: Standard deviation of the pixel noise (patterns have unit std).
        seed: Seeds the class patterns and every split.

    Raises:
        ConfigError: An option out of range (the message names it).
    """
    owner = "dataset 'synthetic_images'"
    positive_int(owner, "side", side, minimum=4)
    positive_int(owner, "num_classes", num_classes, minimum=2)
    for field, value in (("channels", channels), ("train_samples", train_samples), ("val_samples", val_samples),
                         ("test_samples", test_samples)):
        positive_int(owner, field, value)
    positive_int(owner, "seed", seed, minimum=0)
    if not isinstance(noise, (int, float)) or isinstance(noise, bool) or not noise >= 0:
        raise ConfigError(f"{owner}: noise must be a number >= 0, got {noise!r}")
    return _build(side, channels, num_classes, train_samples, val_samples, test_samples, float(noise), seed)


@lru_cache(maxsize=None)
def _build(side: int, channels: int, num_classes: int, train_samples: int, val_samples: int, test_samples: int,
           noise: float, seed: int) -> Dataset:
    grid = torch.randn(num_classes, channels, 4, 4, generator=torch.Generator().manual_seed(seed))
    patterns = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
    patterns = patterns / patterns.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    splits = {}
    for index, (split, count) in enumerate((("train", train_samples), ("val", val_samples),
                                            ("test", test_samples))):
        # One stream per split, derived from the seed, so the splits are independent draws.
        generator = torch.Generator().manual_seed(1_000_003 * seed + 7919 * (index + 1))
        splits[split] = _draw(patterns, count, noise, generator)
    return Dataset("synthetic_images", splits, num_classes=num_classes, image_shape=(channels, side, side))


def _draw(patterns: Tensor, count: int, noise: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    num_classes, _, side, _ = patterns.shape
    labels = torch.randint(num_classes, (count,), generator=generator)
    reach = side // 4
    shifts = torch.randint(-reach, reach + 1, (count, 2), generator=generator)
    images = patterns[labels].clone()
    for dy, dx in {tuple(s) for s in shifts.tolist()}:
        chosen = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
        images[chosen] = torch.roll(images[chosen], shifts=(dy, dx), dims=(2, 3))
    images += noise * torch.randn(images.shape, generator=generator)
    return images, labels
