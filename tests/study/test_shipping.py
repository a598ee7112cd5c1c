"""What ships is what the study's rows name: configs, index and weights agree with SHIPPED."""

from __future__ import annotations

import json
import tomllib

import pytest

from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.optimizers.pretrained import load_pretrained
from flat_l2o_plugin.study.jobs import weights_digest
from flat_l2o_plugin.study.shipping import SHIPPED, install, meta_train_config, pretrained_folder, read_index, shipped


@pytest.mark.parametrize("entry", SHIPPED, ids=lambda e: e.name)
def test_the_shipped_config_is_the_study_s_meta_training_job(entry) -> None:
    written = tomllib.loads((pretrained_folder() / entry.name / "meta-train.toml").read_text())
    expected = json.loads(json.dumps(meta_train_config(entry)))
    written.setdefault("wrappers", [])  # TOML has no spelling for an empty array of tables
    assert written == expected


@pytest.mark.parametrize("entry", SHIPPED, ids=lambda e: e.name)
def test_the_index_records_the_shipped_row_and_its_weights(entry) -> None:
    record = {e["name"]: e for e in read_index()}[entry.name]
    assert record["study"] == {"regime": entry.regime, "candidate": entry.candidate, "meta_seed": entry.meta_seed}
    assert record["version"] == entry.version
    loaded = load_pretrained(entry.name)
    assert weights_digest(loaded.model.state_dict()) == record["meta_training"]["weights_digest"]


def test_install_refuses_a_run_of_another_config(tmp_path) -> None:
    entry = shipped("l2o-correction-sam")
    run = tmp_path / "run"
    run.mkdir()
    (run / "optimizer.safetensors").write_bytes(b"")
    other = meta_train_config(shipped("l2o-correction-adam"))
    other.pop("run_dir")
    (run / "config.json").write_text(json.dumps(other))
    before = (pretrained_folder() / "index.json").read_bytes()
    with pytest.raises(ConfigError, match="another config"):
        install(entry, run)
    assert (pretrained_folder() / "index.json").read_bytes() == before
