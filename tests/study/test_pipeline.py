"""The study pipeline end to end on a tiny regime: seeds, rows, caching, failures."""

from __future__ import annotations

import copy
import json
import math
import tomllib
from pathlib import Path

import pytest

from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.study.executors import LocalExecutor
from flat_l2o_plugin.study.jobs import Job, JobCache, StudyJobError, job_key
from flat_l2o_plugin.study.pipeline import eval_seed, run_study
from flat_l2o_plugin.study.regime import load_regime, regime_from_dict
from flat_l2o_plugin.study.report import analyse, compact, write_report

HERE = Path(__file__).resolve().parent


def test_every_row_runs_on_the_seeds_of_the_design(tiny):
    _, results, _ = tiny
    runs = results["runs"]
    budget = results["budget"]
    m, e = budget["meta_seeds"], budget["eval_seeds"]
    expected = {eval_seed(i, j, e) for i in range(m) for j in range(e)}
    assert len(expected) == m * e
    rows = {r["optimizer"] for r in runs}
    assert rows == {"adam", "sam", "correction+sam", "correction+sam (untrained)"}
    for row in rows:
        mine = [r for r in runs if r["optimizer"] == row]
        assert {r["seed"] for r in mine} == expected, row
        if row in ("adam", "sam"):
            assert all(r["meta_seed"] is None for r in mine)
        else:  # meta-seed i meets its own evaluation seeds
            assert all(r["seed"] in {eval_seed(r["meta_seed"], j, e) for j in range(e)} for r in mine)
    assert results["headline"] == ["correction+sam"]
    assert [r["label"] for r in results["meta_runs"]] == ["correction+sam"] * 2 + ["correction"]
    assert all(len(r["weights_digest"]) == 64 for r in results["meta_runs"])


def test_a_second_run_finds_every_job_cached(tiny, counting_executor):
    out, results, first = tiny
    assert first.ran
    again = counting_executor()
    rerun = run_study(load_regime(HERE / "tiny_regime.toml"), out, executor=again)
    assert again.ran == []
    assert rerun["runs"] == results["runs"]


def test_the_report_regenerates_from_its_compact_json(tiny, tmp_path):
    out, results, _ = tiny
    md = write_report(out / "results.json", tmp_path)
    text = md.read_text()
    assert "## The answer" in text and "correction+sam" in text and "p_holm" in text
    small = json.loads((tmp_path / "results.json").read_text())
    assert small["compact"] and "curve" not in json.dumps(small["runs"])
    write_report(tmp_path / "results.json", tmp_path / "again")
    assert (tmp_path / "again" / "results.md").read_text() == text
    assert analyse(compact(results))["targets"]["beat"] == "sam"


def _variant(**changes):
    data = tomllib.loads((HERE / "tiny_regime.toml").read_text())
    data["baselines"]["sgd"] = {"optimizer": "sgd", "grid": {"lr": [0.1]}}
    data["budget"].update(flatness_seeds=1, held_out_baselines=["adam", "sam"])
    data["candidates"][0]["untrained_is"] = changes.get("untrained_is", "sam")
    return regime_from_dict(data)


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    out = tmp_path_factory.mktemp("variant")
    return out, run_study(_variant(), out, executor=LocalExecutor(workers=1))


def test_an_untrained_self_that_is_a_baseline_is_not_run_again(variant):
    """SAM is correction(adam)+sam_gradient untrained: its runs are the learned contribution's reference."""
    _, results = variant
    assert {r["optimizer"] for r in results["runs"]} == {"adam", "sam", "correction+sam"}
    assert "sgd" in results["grids"]  # tuned on validation, not run on the held-out test
    analysis = analyse(compact(results))
    kinds = {h["reference"]: h["kind"] for h in analysis["hypotheses"]}
    assert kinds == {"adam": "vs baseline", "sam": "learned contribution"}
    assert analysis["verdicts"][0]["untrained_reference"] == "sam"


def test_flatness_is_measured_on_the_first_seeds_of_each_cluster(variant):
    _, results = variant
    e = results["budget"]["eval_seeds"]
    for r in results["runs"]:
        index = (r["seed"] - eval_seed(0, 0, e)) % e  # the evaluation index within its cluster
        assert math.isfinite(r["top_eigenvalue"]) == (index == 0), r


def test_an_untrained_is_that_is_another_update_is_refused(variant):
    out, _ = variant
    with pytest.raises(ConfigError, match="untrained_is 'adam'.*not the same update"):
        run_study(_variant(untrained_is="adam"), out, executor=LocalExecutor(workers=1))


def test_the_report_of_a_study_without_flatness_measures_has_its_figure(tiny, tmp_path):
    _, results, _ = tiny
    unmeasured = {**results, "runs": [{**r, "top_eigenvalue": float("nan")} for r in results["runs"]]}
    md = write_report(unmeasured, tmp_path)
    assert "![curves and flatness]" in md.read_text() and (tmp_path / "img" / "results_tiny.png").exists()


def test_a_failing_job_is_named_and_the_others_are_kept(tmp_path):
    data = tomllib.loads((HERE / "tiny_regime.toml").read_text())
    data = copy.deepcopy(data)
    data["baselines"]["adam"]["grid"] = {"lr": [0.003, -1.0]}  # torch refuses a negative learning rate
    data["baselines"]["adam"]["extend"] = []
    with pytest.raises(StudyJobError) as error:
        run_study(regime_from_dict(data), tmp_path)
    message = str(error.value)
    assert "job(s) failed" in message and "Invalid learning rate" in message and "adam" in message
    assert job_key_in(message) and "lr" in message
    cache = JobCache(tmp_path / "cache")
    assert any(cache.folder.glob("*.json")), "the jobs that succeeded are cached"
    assert not (tmp_path / "results.json").exists()


def job_key_in(text: str) -> bool:
    return any(len(word) == 24 and all(c in "0123456789abcdef" for c in word) for word in text.split())


def test_a_job_that_dies_while_storing_leaves_no_result(tmp_path, monkeypatch):
    import torch

    cache = JobCache(tmp_path)
    key = job_key("meta_train", {"x": 1})
    from flat_l2o_plugin import _atomic

    calls = []
    real = _atomic.write_atomically

    def dying(path, payload, error):
        calls.append(path)
        if path.suffix == ".json":
            raise KeyboardInterrupt  # killed between the weights and the JSON
        real(path, payload, error)

    monkeypatch.setattr(_atomic, "write_atomically", dying)
    with pytest.raises(KeyboardInterrupt):
        cache.store(key, {"state_dict": {"w": torch.ones(2)}, "best": 1.0})
    assert not cache.has(key) and [p.suffix for p in calls] == [".safetensors", ".json"]
    assert not list(tmp_path.glob("*.tmp"))


def test_what_executors_must_agree_on_is_everything_but_wall_clock_time():
    from flat_l2o_plugin.study.pipeline import without_wall_clock

    results = {"wall_seconds": 3.0, "job_seconds": 2.0, "runs": [{"seconds": 1.0, "test_accuracy": 0.5}],
               "meta_runs": [{"seconds": 4.0, "validation": [{"step": 0, "score": 0.1}]}]}
    assert without_wall_clock(results) == {"runs": [{"test_accuracy": 0.5}],
                                           "meta_runs": [{"validation": [{"step": 0, "score": 0.1}]}]}
