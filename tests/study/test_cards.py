"""Model cards generated from a study's compact results and the deploy benchmark's JSON."""

from __future__ import annotations

import json


import pytest

from flat_l2o_plugin.cli import main
from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.study.cards import deploy_numbers, write_cards
from flat_l2o_plugin.study.report import analyse, write_report
from flat_l2o_plugin.study.shipping import Shipped, write_config

TINY = str(__import__("pathlib").Path(__file__).resolve().parent / "tiny_regime.toml")

DEPLOY = {"quick": False, "torch": "2.x", "cpus": 2,
          "steps": [{"size": 10**5, "threads": 1, "device": "cpu",
                     "results": {"adam": {"ms": 0.2, "ratio": 1.0}, "learned_correction": {"ms": 1.0, "ratio": 5.0}}},
                    {"size": 10**6, "threads": 1, "device": "cpu",
                     "results": {"adam": {"ms": 2.0, "ratio": 1.0}, "learned_correction": {"ms": 9.0, "ratio": 4.5}}},
                    {"size": 10**6, "threads": 2, "device": "cpu",
                     "results": {"adam": {"ms": 1.0, "ratio": 1.0}, "learned_correction": {"ms": 7.0, "ratio": 7.0}}}],
          "state": [{"optimizer": "adam", "bytes_per_param": 8.0},
                    {"optimizer": "learned_correction", "bytes_per_param": 12.0}]}


def _install(folder, name, candidate, meta_seed, results):
    """An index entry as shipping.install writes it, for a row of the tiny study."""
    entry = Shipped(name, TINY, candidate, meta_seed, "3", "a tiny one")
    write_config(entry, folder)
    c = next(c for c in results["candidates"] if c["label"] == candidate)
    run = next(r for r in results["meta_runs"] if r["label"] == candidate and r["meta_seed"] == meta_seed)
    return {"name": name, "version": "3", "license": "MIT", "description": "a tiny one",
            "optimizer": c["optimizer"], "options": c["options"], "wrappers": c["wrappers"],
            "weights": f"{name}/weights.safetensors", "sha256": "0" * 64, "config": f"{name}/meta-train.toml",
            "card": f"{name}/card.json", "study": {"regime": TINY, "candidate": candidate, "meta_seed": meta_seed},
            "meta_training": {"best_val_accuracy": run["best_val_accuracy"], "after_meta_steps": run["best_step"],
                              "weights_digest": run["weights_digest"]}}


@pytest.fixture(scope="module")
def cards(tiny, tmp_path_factory):
    out, results, _ = tiny
    root = tmp_path_factory.mktemp("cards")
    write_report(out / "results.json", root / "docs")  # the committed, compact form
    folder = root / "pretrained"
    index = [_install(folder, "tiny-sam", "correction+sam", 1, results),
             _install(folder, "tiny-plain", "correction", 0, results)]
    (folder / "index.json").write_text(json.dumps(index))
    (root / "deploy.json").write_text(json.dumps(DEPLOY))
    written = write_cards(root / "docs" / "results.json", root / "docs", deploy=root / "deploy.json", folder=folder)
    compact = json.loads((root / "docs" / "results.json").read_text())
    return root, folder, written, compact


def _load(folder, name):
    return json.loads((folder / name / "card.json").read_text())


def test_a_headline_row_s_card_quotes_the_report_s_intervals_and_verdicts(cards) -> None:
    root, folder, written, compact = cards
    assert [p.name for p in written] == ["tiny-sam.md", "tiny-plain.md"]
    card = _load(folder, "tiny-sam")
    a = analyse(compact)
    wide = card["held_out"]["tasks"]["wide"]
    for ref in ("adam", "sam"):
        h = next(h for h in a["hypotheses"] if h["row"] == "correction+sam" and h["reference"] == ref)
        assert wide[f"vs_{ref}"]["mean"] == pytest.approx(h["result"].mean, rel=1e-4, abs=1e-9)
        assert wide[f"vs_{ref}"]["verdict"] == h["verdict_holm"]
        row = a["accuracy"][ref]["wide"]
        assert wide["accuracy"][ref]["mean"] == pytest.approx(row.mean, rel=1e-4)
    own = [r[5] for r in compact["runs"]["rows"] if r[0] == "correction+sam" and r[3] == 1]
    assert wide["shipped_meta_seed_mean"] == pytest.approx(sum(own) / len(own), rel=1e-4)
    assert card["meta_training"]["weights_are_the_study_s"] is True
    assert card["study"]["meta_seeds"] == [0, 1] and card["meta_trained_on"] == {"train": compact["regime"]["tasks"]["train"]}
    assert card["meta_training"]["trainer"]["meta_steps"] == 2
    md = (root / "docs" / "models" / "tiny-sam.md").read_text()
    assert f"{100 * wide['vs_sam']['mean']:+.1f}" in md and wide["vs_sam"]["verdict"] in md
    for key in ("meta-trained on", "held-out vs tuned Adam", "held-out vs tuned SAM", "loses on", "recommended lr",
                "step cost", "state"):
        assert f"**{key}**: {card['summary'][key]}" in md


def test_recommended_lr_is_the_tuned_rate_over_the_meta_trained_one(cards) -> None:
    _, folder, _, compact = cards
    lr = _load(folder, "tiny-sam")["recommended_lr"]
    pick = compact["grids"]["sam"]["wide"]["pick"]
    assert lr["per_task"]["wide"]["multiplier"] == pytest.approx(pick["lr"] / 0.01)
    assert lr["per_task"]["wide"]["sam_gradient.rho"] == pick["rho"]
    assert _load(folder, "tiny-plain")["recommended_lr"]["multiplier"] == 1.0  # deployed as meta-trained


def test_a_row_the_study_did_not_take_to_held_out_tasks_says_so(cards) -> None:
    root, folder, _, compact = cards
    card = _load(folder, "tiny-plain")
    assert card["held_out"] is None and card["loses_on"] is None
    assert card["summary"]["held-out"].startswith("not evaluated")
    select = compact["selection"]["correction"]["trained"]["select"]
    assert card["validation"]["tasks"]["select"]["mean"] == pytest.approx(sum(select) / len(select), rel=1e-4)
    assert "Not evaluated" in (root / "docs" / "models" / "tiny-plain.md").read_text()


def test_step_cost_and_state_come_from_the_deploy_result_or_are_not_measured(cards) -> None:
    # The tiny model sets hidden_size: the benchmark timed another size.
    assert _load(cards[1], "tiny-sam")["summary"]["step cost"].startswith("not measured")
    measured = deploy_numbers(DEPLOY, "learned_correction", {"lr": 0.05})
    assert measured["step_cost"]["ratio_to_adam"] == 4.5 and measured["step_cost"]["parameters"] == 10**6
    assert measured["state_bytes_per_parameter"] == 12.0 and measured["adam_state_bytes_per_parameter"] == 8.0
    for deploy in (None, {**DEPLOY, "quick": True}):
        numbers = deploy_numbers(deploy, "learned_correction", {"lr": 0.05})
        assert numbers["step_cost"] is None and numbers["state_bytes_per_parameter"] is None
        assert numbers["why_not"]


def test_list_pretrained_prints_a_card_s_summary(cards, monkeypatch, capsys) -> None:
    card = _load(cards[1], "tiny-sam")
    monkeypatch.setattr("flat_l2o_plugin.optimizers.pretrained.read_card", lambda info: card)
    assert main(["list", "pretrained"]) == 0
    out = capsys.readouterr().out
    assert f"held-out vs tuned SAM: {card['summary']['held-out vs tuned SAM']}" in out
    assert f"recommended lr: {card['summary']['recommended lr']}" in out


def test_a_study_without_the_shipped_row_is_refused_and_nothing_is_written(cards, tmp_path) -> None:
    root, folder, _, compact = cards
    other = {**compact, "candidates": [c for c in compact["candidates"] if c["label"] != "correction"]}
    (tmp_path / "results.json").write_text(json.dumps(other))
    before = {p: p.read_bytes() for p in folder.rglob("card.json")}
    with pytest.raises(ConfigError, match="no candidate 'correction'"):
        write_cards(tmp_path / "results.json", tmp_path / "docs", folder=folder)
    assert not (tmp_path / "docs").exists()
    assert {p: p.read_bytes() for p in folder.rglob("card.json")} == before
    with pytest.raises(ConfigError, match="does not exist"):
        write_cards(tmp_path / "missing.json", tmp_path / "docs", folder=folder)
    (tmp_path / "old.json").write_text(json.dumps({"compact": True, "regimes": {}}))
    with pytest.raises(ConfigError, match="not the results of a flat_l2o_plugin.study study"):
        write_cards(tmp_path / "old.json", tmp_path / "docs", folder=folder)
