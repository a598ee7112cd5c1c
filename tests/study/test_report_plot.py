"""The study's figure draws what a study saved, and no more."""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("matplotlib")

from flat_l2o_plugin.study.report import plot  # noqa: E402


def test_a_study_without_curves_or_flatness_draws_an_empty_figure_without_warnings(tmp_path) -> None:
    analysis = {"rows": ["adam", "sam"], "tasks": ["mlp_relu_100"],
                "runs": [{"optimizer": "adam", "top_eigenvalue": None, "test_accuracy": 0.9}]}
    path = tmp_path / "results.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot({}, analysis, path)
    assert path.stat().st_size > 0
