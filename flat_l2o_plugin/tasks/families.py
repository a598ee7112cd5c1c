"""Task families: the distribution meta-training draws optimizees from, and the held-out tasks.

A learned optimizer generalizes only as far as its meta-training distribution, so the
distribution is an object of its own. A :class:`TaskFamily` names one registered task,
the options every member shares, and, for each varied option, the values to draw from
(architecture widths and depths, activations, which subset of the ``train`` split).
Each draw also picks an init seed. The family lists held-out evaluation tasks too:
other architectures, datasets or seeds, whose seeds lie outside the meta-training range,
so no held-out (architecture, seed) pair is ever met during meta-training.

Seeds follow the project's partition (``flat_l2o_plugin.training.experiment``):
evaluation < 100 <= validation < 1000 <= meta-training.

A host passes ``family.sample`` as the trainer's task sampler::

    family = create_family("mlp", dataset="mnist1d")
    trainer = MetaTrainer(optimizer, sample_task=family.sample,
                          val_tasks=family.validation_tasks(3))
    ...
    for task, seed in family.held_out_tasks():
        run = train_with_learned_optimizer(optimizer, task, seed, steps=200)

Tasks are built once per distinct set of options and reused, so drawing a thousand
trajectories builds a handful of tasks (and loads each dataset once).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from ..errors import ConfigError
from ..protocols import Task
from .seeds import EVAL_SEEDS_START, TRAIN_SEEDS_START, VAL_SEEDS_START

__all__ = ["FAMILIES", "TaskFamily", "TaskSpec", "UniformTasks", "conv_family", "create_family", "mlp_family"]


@dataclass(frozen=True)
class TaskSpec:
    """One optimizee: a registered task, its options and its init seed.

    ``options_json`` is the options' canonical JSON (sorted keys, tuples as lists): it
    makes a spec hashable, and it is exactly what an optimizee checkpoint stores.
    """

    task: str
    options_json: str
    seed: int

    @classmethod
    def of(cls, task: str, options: Mapping[str, Any], seed: int) -> TaskSpec:
        try:
            canonical = json.dumps(dict(options), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"task family: options of task {task!r} must be JSON-serializable: {exc}") from exc
        return cls(task, canonical, int(seed))

    @property
    def options(self) -> dict[str, Any]:
        """The options as keyword arguments for ``create_task`` (a fresh dict)."""
        return json.loads(self.options_json)

    @property
    def architecture(self) -> tuple[str, str]:
        """``(task, options_json)``: everything but the seed."""
        return self.task, self.options_json


class UniformTasks:
    """A task sampler over a list of built tasks: each draw picks one uniformly, with a fresh init seed.

    The meta-training distribution of a task family given as a list (several
    architectures, several datasets), as ``flat-l2o meta-train`` with ``[[tasks]]`` and
    :func:`~flat_l2o_plugin.training.experiment.meta_train` with ``tasks=`` use it. A
    draw takes the task's index from the generator (nothing when there is one task, so
    a single task's stream of seeds is that of a plain sampler), then an init seed from
    ``[TRAIN_SEEDS_START, TRAIN_SEEDS_START + 10**6)``.

    Args:
        tasks: The built tasks, in the order their configuration lists them.

    Raises:
        ConfigError: ``tasks`` is empty.
    """

    def __init__(self, tasks: Sequence[Task]) -> None:
        self.tasks = list(tasks)
        if not self.tasks:
            raise ConfigError("a task family needs at least one task")

    def __call__(self, generator: torch.Generator) -> tuple[Task, int]:
        index = int(torch.randint(0, len(self.tasks), (1,), generator=generator)) if len(self.tasks) > 1 else 0
        return self.tasks[index], TRAIN_SEEDS_START + int(torch.randint(0, 10**6, (1,), generator=generator))

    def validation_tasks(self, count: int) -> list[tuple[Task, int]]:
        """``count`` validation optimizees cycling through the tasks, seeds from ``VAL_SEEDS_START``."""
        return [(self.tasks[i % len(self.tasks)], VAL_SEEDS_START + i) for i in range(count)]


def _seed_range(field: str, value: Sequence[int]) -> range:
    try:
        low, high = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"task family: {field} must be a (low, high) pair of integers, got {value!r}") from None
    if not 0 <= low < high:
        raise ConfigError(f"task family: {field} must satisfy 0 <= low < high, got {value!r}")
    return range(low, high)


class TaskFamily:
    """A distribution over tasks of one registered kind, and its held-out tasks.

    Args:
        task: A registered task name, e.g. ``"mlp"``.
        options: Options every member shares, e.g. ``{"dataset": "mnist1d"}``.
        choices: For each varied option, the values to draw from uniformly and
            independently, e.g. ``{"hidden_sizes": [(16,), (32, 32)], "activation":
            ["relu", "tanh"]}``.
        train_seeds: ``(low, high)``: init seeds are drawn uniformly from this range
            (default: from the meta-training seeds, 1000 and up).
        held_out: Held-out tasks as option overrides on ``options``, e.g.
            ``[{"hidden_sizes": (128,)}, {"dataset": "digits", "dataset_options": {}}]``;
            each is evaluated with every seed of ``held_out_seeds``.
        held_out_seeds: Init seeds of the held-out tasks (default 0, 1, 2: evaluation seeds).
        create: ``create(name, **options) -> Task``; default
            :func:`flat_l2o_plugin.create_task` (the registry of the loaded plugins).

    Raises:
        ConfigError: An empty choice, options that are not JSON-serializable, or
            held-out or validation seeds inside ``train_seeds``.
    """

    def __init__(self, task: str, *, options: Mapping[str, Any] | None = None,
                 choices: Mapping[str, Sequence[Any]] | None = None, train_seeds: Sequence[int] | None = None,
                 held_out: Iterable[Mapping[str, Any]] = (), held_out_seeds: Iterable[int] | None = None,
                 create: Callable[..., Task] | None = None) -> None:
        self.task_name = task
        self.options = dict(options or {})
        self.choices = {key: list(values) for key, values in sorted((choices or {}).items())}
        for key, values in self.choices.items():
            if not values:
                raise ConfigError(f"task family {task!r}: choices[{key!r}] is empty; give at least one value")
        self.train_seeds = _seed_range("train_seeds", train_seeds or (TRAIN_SEEDS_START, 2**31 - 1))
        self.val_seeds = range(VAL_SEEDS_START, TRAIN_SEEDS_START)
        self.held_out = [dict(override) for override in held_out]
        self.held_out_seeds = [int(s) for s in (held_out_seeds if held_out_seeds is not None
                                                  else range(EVAL_SEEDS_START, EVAL_SEEDS_START + 3))]
        clash = [s for s in self.held_out_seeds if s in self.train_seeds]
        if clash:
            raise ConfigError(f"task family {task!r}: held-out seeds {clash} lie inside train_seeds "
                              f"[{self.train_seeds.start}, {self.train_seeds.stop}); held-out tasks must be unseen")
        if self.train_seeds.start < self.val_seeds.stop and self.val_seeds.start < self.train_seeds.stop:
            raise ConfigError(f"task family {task!r}: train_seeds [{self.train_seeds.start}, {self.train_seeds.stop}) "
                              f"overlap the validation seeds [{self.val_seeds.start}, {self.val_seeds.stop})")
        self._create = create
        self._tasks: dict[tuple[str, str], Task] = {}
        for override in [{}, *self.held_out]:  # fail now, not mid-training, on unserializable options
            TaskSpec.of(task, {**self.options, **override}, 0)

    def __repr__(self) -> str:
        varied = ", ".join(f"{key}: {len(values)}" for key, values in self.choices.items())
        return f"TaskFamily({self.task_name!r}, {len(self.training_options())} architectures ({varied}))"

    # ------------------------------------------------------------------ meta-training

    def training_options(self) -> list[dict[str, Any]]:
        """Every combination of the choices, merged onto the shared options."""
        keys = list(self.choices)
        return [{**self.options, **dict(zip(keys, combo))}
                for combo in itertools.product(*(self.choices[key] for key in keys))]

    def sample_spec(self, generator: torch.Generator) -> TaskSpec:
        """Draw one meta-training task: a value per choice (in sorted option order), then a seed."""
        chosen = {}
        for key, values in self.choices.items():
            chosen[key] = values[int(torch.randint(len(values), (1,), generator=generator))]
        seed = int(torch.randint(self.train_seeds.start, self.train_seeds.stop, (1,), generator=generator))
        return TaskSpec.of(self.task_name, {**self.options, **chosen}, seed)

    def sample(self, generator: torch.Generator) -> tuple[Task, int]:
        """``(task, init_seed)`` for a new meta-training trajectory: the trainer's ``sample_task``."""
        return self.build(self.sample_spec(generator))

    def validation_specs(self, count: int) -> list[TaskSpec]:
        """``count`` validation tasks: the training architectures in turn, with validation seeds."""
        if not isinstance(count, int) or not 0 <= count <= len(self.val_seeds):
            raise ConfigError(f"task family {self.task_name!r}: validation count must be in "
                              f"[0, {len(self.val_seeds)}], got {count!r}")
        architectures = self.training_options()
        return [TaskSpec.of(self.task_name, architectures[i % len(architectures)], self.val_seeds[i])
                for i in range(count)]

    def validation_tasks(self, count: int) -> list[tuple[Task, int]]:
        """As :meth:`validation_specs`, built: the trainer's ``val_tasks``."""
        return [self.build(spec) for spec in self.validation_specs(count)]

    # ------------------------------------------------------------------ evaluation

    def held_out_specs(self) -> list[TaskSpec]:
        """Every held-out task with every held-out seed."""
        return [TaskSpec.of(self.task_name, {**self.options, **override}, seed)
                for override in self.held_out for seed in self.held_out_seeds]

    def held_out_tasks(self) -> list[tuple[Task, int]]:
        """As :meth:`held_out_specs`, built."""
        return [self.build(spec) for spec in self.held_out_specs()]

    # ------------------------------------------------------------------ building

    def build(self, spec: TaskSpec) -> tuple[Task, int]:
        """``(task, seed)`` for ``spec``; the task is built once per distinct set of options."""
        key = spec.architecture
        if key not in self._tasks:
            create = self._create
            if create is None:
                from .. import create_task as create
            self._tasks[key] = create(spec.task, **spec.options)
        return self._tasks[key], spec.seed


def _architectures(widths: Sequence[int], depths: Sequence[int]) -> list[tuple[int, ...]]:
    return [(int(width),) * int(depth) for depth in depths for width in widths]


def mlp_family(dataset: str = "mnist1d", widths: Sequence[int] = (16, 32, 64), depths: Sequence[int] = (1, 2),
               activations: Sequence[str] = ("relu", "tanh", "sigmoid"), batch_size: int = 128,
               dataset_options: Mapping[str, Any] | None = None, subset_size: int | None = None,
               num_subsets: int = 4, held_out: Iterable[Mapping[str, Any]] | None = None,
               held_out_seeds: Iterable[int] | None = None, train_seeds: Sequence[int] | None = None,
               create: Callable[..., Task] | None = None) -> TaskFamily:
    """MLPs of every width x depth x activation on ``dataset`` (the registered ``mlp`` task).

    Args:
        dataset, dataset_options, batch_size: Shared by every member.
        widths, depths: Hidden layers ``(width,) * depth`` for each pair.
        activations: Activations to draw from.
        subset_size: Train each member on a random subset of this many ``train``
            examples, one of ``num_subsets`` fixed subsets; ``None`` trains on all.
        num_subsets: How many subsets to draw from.
        held_out: Option overrides of the held-out tasks. Default: a wider net
            (128), a deeper one with an activation never trained on (32-32-32, GELU),
            and a net on another dataset (``digits``).
        held_out_seeds, train_seeds, create: As for :class:`TaskFamily`.
    """
    options: dict[str, Any] = {"dataset": dataset, "batch_size": batch_size,
                               "dataset_options": dict(dataset_options or {})}
    choices: dict[str, Sequence[Any]] = {"hidden_sizes": _architectures(widths, depths),
                                         "activation": list(activations)}
    if subset_size is not None:
        options["train_subset"] = subset_size
        choices["train_subset_seed"] = list(range(num_subsets))
    if held_out is None:
        held_out = [{"hidden_sizes": (128,), "activation": "relu"},
                    {"hidden_sizes": (32, 32, 32), "activation": "gelu"},
                    {"dataset": "digits", "dataset_options": {}, "hidden_sizes": (32,), "activation": "relu",
                     "train_subset": None}]
    return TaskFamily("mlp", options=options, choices=choices, held_out=held_out, held_out_seeds=held_out_seeds,
                      train_seeds=train_seeds, create=create)


def conv_family(dataset: str = "synthetic_images", channels: Sequence[Sequence[int]] = ((4, 8), (8, 16), (16, 16)),
                activations: Sequence[str] = ("relu", "tanh"), batch_size: int = 64,
                dataset_options: Mapping[str, Any] | None = None, subset_size: int | None = None,
                num_subsets: int = 4, held_out: Iterable[Mapping[str, Any]] | None = None,
                held_out_seeds: Iterable[int] | None = None, train_seeds: Sequence[int] | None = None,
                create: Callable[..., Task] | None = None) -> TaskFamily:
    """Small conv nets of every channel pair x activation on an image ``dataset`` (the ``conv`` task).

    Args:
        channels: ``(c1, c2)`` pairs to draw from.
        held_out: Default: wider channels (32, 32) with GELU, and the digits images.
        Others: As for :func:`mlp_family`.
    """
    options: dict[str, Any] = {"dataset": dataset, "batch_size": batch_size,
                               "dataset_options": dict(dataset_options or {})}
    choices: dict[str, Sequence[Any]] = {"channels": [tuple(int(c) for c in pair) for pair in channels],
                                         "activation": list(activations)}
    if subset_size is not None:
        options["train_subset"] = subset_size
        choices["train_subset_seed"] = list(range(num_subsets))
    if held_out is None:
        held_out = [{"channels": (32, 32), "activation": "gelu"},
                    {"dataset": "digits", "dataset_options": {}, "channels": (8, 16), "activation": "relu",
                     "train_subset": None}]
    return TaskFamily("conv", options=options, choices=choices, held_out=held_out, held_out_seeds=held_out_seeds,
                      train_seeds=train_seeds, create=create)


FAMILIES: dict[str, Callable[..., TaskFamily]] = {"conv": conv_family, "mlp": mlp_family}
"""Family name -> factory, so a configuration can name a family and its options as plain data."""


def create_family(name: str, **options: Any) -> TaskFamily:
    """Build a family from plain data: ``create_family("mlp", dataset="digits", widths=[20])``.

    Raises:
        ConfigError: Unknown family name (the message lists them) or a bad option.
    """
    try:
        factory = FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown task family {name!r}; available: {', '.join(sorted(FAMILIES))}") from None
    try:
        return factory(**options)
    except TypeError as exc:
        raise ConfigError(f"task family {name!r}: {exc}") from exc
