"""Optimizee tasks: functional models with bundled data and fixed splits."""

from __future__ import annotations

from .base import ClassificationTask
from .conv import ConvTask
from .data import Dataset, list_datasets, load_dataset
from .mlp import MLPTask

__all__ = ["ClassificationTask", "ConvTask", "Dataset", "MLPTask", "list_datasets", "load_dataset"]
