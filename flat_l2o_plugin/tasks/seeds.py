"""The partition of optimizee init seeds, so that meta-training never sees an evaluation optimizee.

    evaluation  [EVAL_SEEDS_START, VAL_SEEDS_START)      0 .. 99
    validation  [VAL_SEEDS_START, TRAIN_SEEDS_START)   100 .. 999
    training    [TRAIN_SEEDS_START, ...)              1000 ..

A property of the optimizees, so it lives with the tasks; the trainer, the demo, the
benchmarks and :class:`~.families.TaskFamily` all draw from it.
"""

from __future__ import annotations

__all__ = ["EVAL_SEEDS_START", "TRAIN_SEEDS_START", "VAL_SEEDS_START"]

EVAL_SEEDS_START = 0
"""First init seed of the optimizees a result is reported on."""

VAL_SEEDS_START = 100
"""First init seed of the validation optimizees (checkpoint selection, curriculum)."""

TRAIN_SEEDS_START = 1000
"""First init seed of the meta-training optimizees."""
