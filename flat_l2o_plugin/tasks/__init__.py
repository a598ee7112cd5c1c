"""Optimizee tasks: functional models and synthetic problems, on datasets with fixed splits.

Classifiers (:class:`MLPTask`, :class:`ConvTask`, :class:`TimmTask`,
:class:`LogisticRegressionTask`) run on any registered dataset
(:func:`list_datasets`); :class:`QuadraticTask` and :class:`RosenbrockTask` need no
data. :mod:`.families` turns a task into a distribution for meta-training.
"""

from __future__ import annotations

from .base import ClassificationTask
from .conv import ConvTask
from .data import SPLITS, DataFormatError, Dataset, MissingDataError, list_datasets, load_dataset
from .families import TaskFamily, TaskSpec, create_family
from .logistic import LogisticRegressionTask
from .mlp import MLPTask
from .quadratic import QuadraticTask
from .rosenbrock import RosenbrockTask
from .timm_model import TimmTask

__all__ = [
    "SPLITS",
    "ClassificationTask",
    "ConvTask",
    "DataFormatError",
    "Dataset",
    "LogisticRegressionTask",
    "MLPTask",
    "MissingDataError",
    "QuadraticTask",
    "RosenbrockTask",
    "TaskFamily",
    "TaskSpec",
    "TimmTask",
    "create_family",
    "list_datasets",
    "load_dataset",
]
