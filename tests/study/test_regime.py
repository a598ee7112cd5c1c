"""Regime files: what a user brings is checked, and every error names its key, task or candidate."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import pytest

from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.study.regime import load_regime, regime_from_dict, resolve_picks

HERE = Path(__file__).resolve().parent
TINY = tomllib.loads((HERE / "tiny_regime.toml").read_text())
SHIPPED = Path(__file__).resolve().parents[2] / "flat_l2o_plugin" / "study" / "regimes"


def _with(**changes):
    data = copy.deepcopy(TINY)
    for dotted, value in changes.items():
        target = data
        *path, last = dotted.split("__")
        for key in path:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if value is None:
            del target[last]
        else:
            target[last] = value
    return data


def test_the_tiny_regime_parses():
    regime = regime_from_dict(TINY)
    assert regime.family == ("train",) and regime.held_out == ("wide",)
    assert [c.label for c in regime.candidates] == ["correction+sam", "correction"]
    assert regime.candidates[0].runs_untrained and regime.candidates[0].flatness_aware
    assert not regime.candidates[1].runs_untrained and not regime.candidates[1].flatness_aware
    assert regime.baselines["sam"].extend == ("rho",)


@pytest.mark.parametrize("changes, message", [
    ({"budget__meta_sedes": 3}, "did you mean 'meta_seeds'"),
    ({"budget__meta_seeds": 0}, "budget.meta_seeds"),
    ({"budget__candidate_meta_seeds": 5}, "candidate_meta_seeds"),
    ({"budget__eval_seeds": 60}, "100"),
    ({"budget__flatness": "yes"}, "budget.flatness"),
    ({"sets__held_out": ["wied"]}, "did you mean 'wide'"),
    ({"sets__held_out": []}, "sets.held_out"),
    ({"tasks__wide": ["mlp"]}, "tasks.wide"),
    ({"baselines__sam__extend": ["lr", "momentum"]}, "baselines.sam.extend"),
    ({"baselines__sam__fixed": {"rho": 0.1}}, "both fixed and in the grid"),
    ({"candidates__0__deploy": {"options": {"lr": "@sam.lrr"}}}, "did you mean '@sam.lr'"),
    ({"candidates__0__train_on": ["wide"]}, "held-out tasks"),
    ({"candidates__1__label": "correction+sam"}, "used twice"),
    ({"candidates__1__label": "adam"}, "used twice"),
    ({"candidates__0__headline": "sometimes"}, "headline"),
    ({"candidates__0__reference": "nothing"}, "reference"),
    ({"targets__beat": "lion"}, "targets.beat"),
    ({"candidates__0__untrained_is": "lion"}, "untrained_is 'lion' is not a baseline"),
    ({"candidates__0__untrained_is": 3}, "untrained_is must name a baseline"),
    ({"budget__held_out_baselines": ["lion"]}, "budget.held_out_baselines: no baseline 'lion'"),
    ({"budget__held_out_baselines": "adam"}, "budget.held_out_baselines must be a list of strings"),
    ({"budget__held_out_baselines": ["adam"]}, r"must include \['sam'\]"),
    ({"budget__flatness_seeds": -1}, "budget.flatness_seeds"),
    ({"name": None}, "missing name"),
    ({"executor": "dusk"}, "executor.use: unknown executor 'dusk'"),
    ({"executor": {"use": "dask://head"}}, "executor.use: 'dask://head' must be dask://HOST:PORT"),
    ({"executor": {"use": "local", "workers": 2}}, "executor: unknown key 'workers'"),
    ({"executor": 3}, "executor must be an executor string"),
    ({"quick": {"setz": {}}}, "did you mean 'sets'"),
])
def test_bad_regimes_name_what_is_wrong(changes, message):
    with pytest.raises(ConfigError, match=message):
        regime_from_dict(_with(**changes), quick="quick" in changes)


def test_a_regime_names_where_its_jobs_run_and_the_record_leaves_it_out():
    assert regime_from_dict(TINY).executor.use == "local"
    regime = regime_from_dict(_with(executor={"use": "slurm:/shared/jobs", "slurm": {"slurm_partition": "cpu"}}))
    assert regime.executor.use == "slurm:/shared/jobs" and regime.executor.slurm == {"slurm_partition": "cpu"}
    assert regime_from_dict(_with(executor="dask://head:8786")).executor.use == "dask://head:8786"
    # Where jobs run changes no result, so results.json (which records the source) does not say.
    assert "executor" not in regime.source and regime.source["name"] == "tiny"


def test_quick_mode_may_replace_the_sets():
    data = _with(quick={"sets": {"selection": ["train"], "held_out": ["select", "wide"]}, "held_out": 1})
    quick = regime_from_dict(data, quick=True)
    assert quick.family == ("train",) and quick.selection == ("train",) and quick.held_out == ("select",)
    assert regime_from_dict(data).held_out == ("wide",)
    with pytest.raises(ConfigError, match="sets.held_out: unknown task 'nowhere'"):
        regime_from_dict(_with(quick={"sets": {"held_out": ["nowhere"]}}), quick=True)


def test_files_that_are_not_regimes_are_refused_with_their_path(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_regime(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_regime(tmp_path)
    (tmp_path / "bytes.toml").write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="bytes.toml is not valid TOML"):
        load_regime(tmp_path / "bytes.toml")
    (tmp_path / "typo.toml").write_text((HERE / "tiny_regime.toml").read_text().replace("[sets]", "[setz]"))
    with pytest.raises(ConfigError, match=r"typo.toml: regime: unknown key 'setz'"):
        load_regime(tmp_path / "typo.toml")


def test_picks_replace_references_anywhere():
    picks = {"sam": {"lr": 0.01, "rho": 0.2}}
    deploy = {"options": {"lr": "@sam.lr"}, "wrappers": [{"rho": "@sam.rho", "adaptive": True}]}
    assert resolve_picks(deploy, picks) == {"options": {"lr": 0.01}, "wrappers": [{"rho": 0.2, "adaptive": True}]}


@pytest.mark.parametrize("path", sorted(SHIPPED.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_regimes_are_valid_and_quick_mode_shrinks_them(path):
    full, quick = load_regime(path), load_regime(path, quick=True)
    assert full.budget.eval_steps > full.trainer["horizon"], "held-out runs must outlast the meta-training horizon"
    assert full.budget.meta_seeds >= 5 and full.budget.eval_seeds >= 10
    assert quick.trainer["meta_steps"] < full.trainer["meta_steps"]
    assert len(quick.candidates) <= len(full.candidates) and quick.budget.meta_seeds <= full.budget.meta_seeds
