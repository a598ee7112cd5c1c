"""Seeding every global generator a run may draw from."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["seed_everything"]


def seed_everything(seed: int) -> None:
    """torch's, Python's and NumPy's global generators, so that two runs of one spec are identical.

    Our own code draws from explicit ``torch.Generator`` objects; this covers what it does
    not control (a task's data generator, a plugin that calls ``random`` or ``np.random``).
    """
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed([seed % 2**32, seed // 2**32])  # NumPy's legacy seeding takes 32-bit words
