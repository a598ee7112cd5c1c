"""The deployment examples run end to end at a tiny budget and their models learn."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from timm.optim._optim_factory import default_registry


@pytest.fixture
def isolated_timm_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    # The example registers in timm's process-global registry; keep that from leaking.
    monkeypatch.setattr(default_registry, "_optimizers", dict(default_registry._optimizers))


@pytest.fixture(scope="module")
def face_run(tmp_path_factory: pytest.TempPathFactory, load_example) -> dict[str, object]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return load_example("torch_optimizer_face").main(meta_steps=30, train_steps=40,
                                                  out_dir=tmp_path_factory.mktemp("face"))
    finally:
        torch.set_num_threads(previous)


def test_torch_optimizer_face_example_meta_trains_saves_and_trains(face_run: dict[str, object]) -> None:
    losses = face_run["losses"]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
    assert Path(face_run["weights"]).is_file() and Path(face_run["checkpoint"]).is_file()
    checkpoint = torch.load(face_run["checkpoint"], weights_only=True)
    assert set(checkpoint) == {"model", "optimizer"} and checkpoint["optimizer"]["state"]


def test_torch_optimizer_face_example_reuses_saved_weights(face_run: dict[str, object], tmp_path: Path,
                                                           load_example) -> None:
    again = load_example("torch_optimizer_face").main(weights=face_run["weights"], train_steps=5, out_dir=tmp_path)
    assert again["losses"] == face_run["losses"][:5]  # same weights, same seed: same run
    assert not (tmp_path / "rnnprop.safetensors").exists()


def test_timm_training_example_trains_through_create_optimizer_v2(face_run: dict[str, object],
                                                                  isolated_timm_registry: None,
                                                                  load_example) -> None:
    history = load_example("timm_training").main(face_run["weights"], epochs=3, updates_per_epoch=10)
    assert len(history["train_loss"]) == 3 and all(math.isfinite(x) for x in history["train_loss"])
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert history["val_accuracy"][-1] > 0.3  # ten classes: chance is 0.1
    assert history["lr"][0] == pytest.approx(0.1) and history["lr"][-1] < history["lr"][0]  # cosine anneals
