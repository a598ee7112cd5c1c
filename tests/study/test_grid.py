"""Self-extending grids: picks move off the edge, or the result says they could not."""

from __future__ import annotations

import math

import pytest

from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.study.grid import expand, search


def peak(at: dict[str, float]):
    """A score whose maximum is at ``at`` (in log space), recording every call."""
    calls: list[list[dict]] = []

    def score(points):
        calls.append(points)
        return [-sum((math.log(p[k]) - math.log(v)) ** 2 for k, v in at.items()) for p in points]

    return score, calls


def test_an_optimum_beyond_the_grid_is_reached_and_the_pick_leaves_the_edge():
    score, calls = peak({"lr": 0.3, "rho": 0.05})
    result = search({"lr": [1e-3, 1e-2, 3e-2], "rho": [0.1, 0.5]}, score, extend=["lr", "rho"])
    assert result.pick["lr"] == pytest.approx(0.27)  # 0.03·3 = 0.09, then ·3 = 0.27, then 0.81 beyond it
    # 0.1 was the low edge: 0.02 is added, and 0.1 (nearer 0.05 in log space) stays the pick.
    assert result.pick["rho"] == pytest.approx(0.1)
    assert result.on_edge == []
    assert result.extensions["lr"] == pytest.approx([0.09, 0.27, 0.81])
    assert result.extensions["rho"] == pytest.approx([0.02])
    # No point is scored twice.
    seen = [tuple(sorted(p.items())) for batch in calls for p in batch]
    assert len(seen) == len(set(seen)) == len(result.scores)


def test_the_extension_budget_and_bounds_are_reported_as_an_edge():
    score, _ = peak({"lr": 100.0})
    result = search({"lr": [1e-3, 1e-2]}, score, extend=["lr"], max_extensions=2)
    assert result.pick["lr"] == pytest.approx(1.0) and result.on_edge == ["lr"]
    score, _ = peak({"momentum": 0.999})
    result = search({"momentum": [0.5, 0.9]}, score, extend=["momentum"], bounds={"momentum": (0.0, 0.99)})
    assert result.pick == {"momentum": 0.9} and result.on_edge == ["momentum"]


def test_fixed_axes_are_not_extended_and_ties_go_to_the_first_point():
    result = search({"lr": [0.1, 0.2], "base": ["adam"]}, lambda ps: [1.0] * len(ps))
    assert result.pick == {"lr": 0.1, "base": "adam"} and result.extensions == {} and result.on_edge == []
    nan_first = search({"lr": [0.1, 0.2]}, lambda ps: [math.nan if p["lr"] == 0.1 else 0.0 for p in ps])
    assert nan_first.pick == {"lr": 0.2}
    assert nan_first.runner_up() == ({"lr": 0.1}, -math.inf)


def test_bad_grids_are_refused_with_the_axis_named():
    with pytest.raises(ConfigError, match="'rho'"):
        search({"lr": [0.1]}, lambda ps: [0.0] * len(ps), extend=["rho"])
    with pytest.raises(ConfigError, match="'lr'"):
        search({"lr": [0.1]}, lambda ps: [0.0] * len(ps), extend=["lr"])
    with pytest.raises(ConfigError):
        search({"lr": []}, lambda ps: [])
    assert expand({"a": [1, 2], "b": ["x"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
