"""Hyper-parameter grids that grow until no pick sits on their edge.

A baseline tuned on a grid whose best point lies on the grid's boundary is probably
under-tuned: the optimum may lie outside. :func:`search` evaluates a grid, and while
the best point sits at the low or high end of an extendable axis, adds one more value
beyond that end (the axis's own ratio between its last two values: grids of learning
rates and radii are geometric) and evaluates the new points, up to ``max_extensions``
times per axis and direction. The result records every point scored and whether the
final pick still sits on an edge, so a report can say so.

The scorer is called with a batch of points and returns one score per point (higher
is better), so a caller can run each batch in parallel.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..errors import ConfigError

__all__ = ["GridResult", "expand", "search"]

Point = dict[str, Any]
Scorer = Callable[[list[Point]], list[float]]


def expand(grid: Mapping[str, Sequence[Any]]) -> list[Point]:
    """Every combination of the grid's values, in the grid's key order."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _key(point: Mapping[str, Any]) -> str:
    return json.dumps(dict(point), sort_keys=True)


@dataclass
class GridResult:
    """What a search found.

    Attributes:
        pick: The best point.
        score: Its score.
        scores: ``[(point, score)]`` for every point evaluated, in evaluation order.
        grid: The final grid (after extensions).
        extensions: ``{axis: [values added]}``.
        on_edge: Axes (extendable ones with at least two values) whose pick is still at
            an end after the last extension allowed.
    """

    pick: Point
    score: float
    scores: list[tuple[Point, float]] = field(default_factory=list)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    extensions: dict[str, list[Any]] = field(default_factory=dict)
    on_edge: list[str] = field(default_factory=list)

    def runner_up(self) -> tuple[Point, float] | None:
        """The second-best point and its score (to judge how stable the pick is)."""
        ranked = sorted(self.scores, key=lambda ps: -ps[1])
        return ranked[1] if len(ranked) > 1 else None


def _next_value(values: Sequence[float], direction: int) -> float:
    ordered = sorted(values)
    a, b = (ordered[0], ordered[1]) if direction < 0 else (ordered[-2], ordered[-1])
    if a > 0 and b > 0:
        ratio = b / a
        return a / ratio if direction < 0 else b * ratio
    step = b - a  # arithmetic axes (values that may be zero or negative)
    return a - step if direction < 0 else b + step


def search(grid: Mapping[str, Sequence[Any]], score: Scorer, *, extend: Sequence[str] = (),
           max_extensions: int = 3, bounds: Mapping[str, tuple[float, float]] | None = None) -> GridResult:
    """Find the best point of ``grid``, growing extendable axes while the pick is on an edge.

    Args:
        grid: ``{axis: [values]}``. Axes not in ``extend`` are searched as given.
        score: ``score(points) -> scores``, higher is better; NaN counts as the worst.
        extend: Numeric axes that may grow; each needs at least two distinct values.
        max_extensions: The most values added at each end of each axis.
        bounds: ``{axis: (low, high)}``: an extension never leaves this closed range
            (e.g. a momentum below 1); an axis that cannot grow further stays on its edge.

    Raises:
        ConfigError: An empty grid, an extendable axis with fewer than two distinct
            numeric values, or ``extend`` naming an axis the grid lacks.
    """
    grid = {k: list(v) for k, v in grid.items()}
    if not grid or any(not v for v in grid.values()):
        raise ConfigError(f"grid {grid!r}: every axis needs at least one value")
    for axis in extend:
        if axis not in grid:
            raise ConfigError(f"grid: cannot extend {axis!r}, the grid's axes are {sorted(grid)}")
        values = grid[axis]
        if (len(set(values)) < 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                            for v in values)):
            raise ConfigError(f"grid: axis {axis!r} needs at least two distinct numbers to be extended, got {values!r}")
    bounds = dict(bounds or {})
    scored: dict[str, tuple[Point, float]] = {}
    order: list[str] = []

    def evaluate(points: list[Point]) -> None:
        todo = [p for p in points if _key(p) not in scored]
        if not todo:
            return
        values = score(todo)
        if len(values) != len(todo):
            raise ValueError(f"the scorer returned {len(values)} scores for {len(todo)} points")
        for p, v in zip(todo, values):
            v = float(v)
            scored[_key(p)] = (p, -math.inf if math.isnan(v) else v)
            order.append(_key(p))

    def best() -> tuple[Point, float]:
        # Ties go to the point evaluated first, so a search is a pure function of its scores.
        return max((scored[k] for k in order), key=lambda ps: ps[1])

    evaluate(expand(grid))
    added: dict[str, list[Any]] = {}
    counts = {(axis, d): 0 for axis in extend for d in (-1, 1)}
    while True:
        pick, _ = best()
        grew = False
        for axis in extend:
            values = sorted(grid[axis])
            direction = -1 if pick[axis] == values[0] else (1 if pick[axis] == values[-1] else 0)
            if not direction or counts[(axis, direction)] >= max_extensions:
                continue
            new = _next_value(values, direction)
            low, high = bounds.get(axis, (-math.inf, math.inf))
            if not low <= new <= high:
                continue
            new = type(values[0])(new) if isinstance(values[0], int) and float(new).is_integer() else float(new)
            counts[(axis, direction)] += 1
            grid[axis] = sorted([*grid[axis], new])
            added.setdefault(axis, []).append(new)
            evaluate(expand(grid))
            grew = True
            break  # re-read the pick before growing another axis
        if not grew:
            break
    pick, value = best()
    on_edge = [axis for axis in extend if pick[axis] in (min(grid[axis]), max(grid[axis]))]
    return GridResult(pick=dict(pick), score=value, scores=[scored[k] for k in order], grid=grid,
                      extensions=added, on_edge=on_edge)
