"""Resumable meta-training checkpoints: safetensors for tensors, JSON for the rest, no pickle.

Layout of ``run_dir/checkpoint/``::

    manifest.json            format version, meta-step, and each file's size and SHA-256
    weights.safetensors      the learned optimizer's state_dict (loadable on its own)
    best_weights.safetensors the best validated weights so far (absent before a validation)
    trainer.safetensors      every other tensor: meta-optimizer moments, RNG states
                             (torch.Generator.get_state() is a uint8 tensor), in-flight
                             optimizee trajectories, estimator probes
    trainer.json             every other value: step, counters, curriculum, config, ...

What goes into ``trainer.*`` is the trainer's business (:mod:`.meta_trainer`); this
module only writes and reads the folder, and guarantees that a reader never sees a
half-written one.

Atomicity protocol. A checkpoint is published by renaming a complete folder into place,
so at every instant some complete checkpoint is on disk:

1. Every file is written into a fresh temporary folder ``run_dir/.checkpoint-*.tmp``,
   flushed and fsync'ed; ``manifest.json`` is written last; the folder is fsync'ed.
2. The current ``checkpoint/`` (if any) is renamed to ``checkpoint.old/`` (a stale
   ``checkpoint.old/`` left next to a valid ``checkpoint/`` is deleted first).
3. The temporary folder is renamed to ``checkpoint/``; ``run_dir`` is fsync'ed.
4. ``checkpoint.old/`` is deleted.

A rename within one file system is atomic (POSIX ``rename(2)``, ``os.replace``), but a
folder cannot be renamed over a non-empty folder, hence the two renames. A kill between
them leaves no ``checkpoint/`` and a complete ``checkpoint.old/``, which the reader then
uses: the previous checkpoint stays valid whatever the moment of the kill. Temporary
folders are never read, and the next writer deletes them.

Every file is verified against the manifest's size and SHA-256 on load, so a truncated
or corrupted file is an error naming that file, never a silently wrong resume.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from .._atomic import fsync_folder
from ..tasks.checkpoint import CheckpointError

__all__ = ["CHECKPOINT_DIR", "FORMAT", "FORMAT_VERSION", "Checkpoint", "TrainingCheckpointError",
           "checkpoint_dir", "decode_floats", "encode_floats", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_DIR = "checkpoint"
"""The folder inside a run folder that holds the latest complete checkpoint."""

FORMAT = "flat_l2o_plugin.meta_training_checkpoint"
FORMAT_VERSION = 1
"""Version of the layout above; a reader refuses any other."""

_OLD = CHECKPOINT_DIR + ".old"
_TMP_PREFIX = f".{CHECKPOINT_DIR}-"
_FILES = {"weights": "weights.safetensors", "best_weights": "best_weights.safetensors",
          "tensors": "trainer.safetensors", "state": "trainer.json"}


class TrainingCheckpointError(CheckpointError):
    """A meta-training checkpoint is missing, corrupt, or does not fit this run.

    The message names the file and what to do.
    """


@dataclass
class Checkpoint:
    """The contents of one checkpoint, in memory.

    Attributes:
        step: Meta-steps completed; training resumes with meta-step ``step``.
        weights: The learned optimizer's ``state_dict()``.
        best_weights: The best validated weights so far, or ``None``.
        tensors: Every other tensor, under keys the trainer chooses.
        state: Every other value, JSON-serializable (see :func:`encode_floats` for
            non-finite floats).
    """

    step: int
    weights: dict[str, Tensor]
    best_weights: dict[str, Tensor] | None = None
    tensors: dict[str, Tensor] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


def checkpoint_dir(run_dir: str | os.PathLike[str]) -> Path | None:
    """The folder holding the latest complete checkpoint of ``run_dir``, or ``None``.

    That is ``checkpoint/``, or ``checkpoint.old/`` when a writer was killed between its
    two renames (see the module docstring).
    """
    run_dir = Path(run_dir)
    for name in (CHECKPOINT_DIR, _OLD):
        if (run_dir / name).is_dir():
            return run_dir / name
    return None


# ------------------------------------------------------------------ JSON floats


def encode_floats(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``{"float": "inf" | "-inf" | "nan"}``.

    Standard JSON has no infinities; the trainer's state has some (a best score of -∞
    before the first validation).
    """
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if isinstance(value, Mapping):
        return {str(k): encode_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_floats(v) for v in value]
    return value


def decode_floats(value: Any) -> Any:
    """The inverse of :func:`encode_floats`."""
    if isinstance(value, dict):
        if set(value) == {"float"} and value["float"] in ("inf", "-inf", "nan"):
            return float(value["float"])
        return {k: decode_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_floats(v) for v in value]
    return value


# ------------------------------------------------------------------ writing


def _tensor_payload(tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    # safetensors refuses shared storage and non-contiguous views; fresh contiguous CPU
    # copies are always accepted. Clones are cheap next to the write itself.
    plain = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    return safetensors.torch.save(plain, metadata=metadata)


def _write_file(path: Path, payload: bytes) -> dict[str, Any]:
    with open(path, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    return {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


def save_checkpoint(run_dir: str | os.PathLike[str], checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` as ``run_dir/checkpoint/``, atomically (see the module docstring).

    Args:
        run_dir: The run folder (created if missing).
        checkpoint: What to write.

    Returns:
        The checkpoint folder.

    Raises:
        TrainingCheckpointError: ``state`` is not JSON-serializable (the message names the
            offending value).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        state_json = json.dumps(encode_floats({**checkpoint.state, "step": checkpoint.step}), allow_nan=False,
                                sort_keys=True, indent=1)
    except (TypeError, ValueError) as exc:
        raise TrainingCheckpointError(f"{run_dir / CHECKPOINT_DIR / _FILES['state']}: the trainer state is not "
                                      f"JSON-serializable ({exc})") from exc
    _remove_stale_temporaries(run_dir)
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f"{_TMP_PREFIX}{checkpoint.step:08d}-", suffix=".tmp"))
    try:
        files = {_FILES["weights"]: _write_file(tmp / _FILES["weights"], _tensor_payload(checkpoint.weights))}
        if checkpoint.best_weights is not None:
            files[_FILES["best_weights"]] = _write_file(tmp / _FILES["best_weights"],
                                                        _tensor_payload(checkpoint.best_weights))
        files[_FILES["tensors"]] = _write_file(tmp / _FILES["tensors"], _tensor_payload(checkpoint.tensors))
        files[_FILES["state"]] = _write_file(tmp / _FILES["state"], state_json.encode("utf-8"))
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": checkpoint.step,
                    "torch_version": torch.__version__, "files": files}
        _write_file(tmp / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8"))
        fsync_folder(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    current, old = run_dir / CHECKPOINT_DIR, run_dir / _OLD
    if current.is_dir():
        if old.exists():
            shutil.rmtree(old)  # a writer was killed after step 3: checkpoint/ is valid
        os.replace(current, old)
    os.replace(tmp, current)
    fsync_folder(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return current


def _remove_stale_temporaries(run_dir: Path) -> None:
    for path in run_dir.glob(f"{_TMP_PREFIX}*.tmp"):
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------ reading


def load_checkpoint(run_dir: str | os.PathLike[str]) -> Checkpoint:
    """Read and verify the latest complete checkpoint of ``run_dir``.

    Args:
        run_dir: The run folder (the one given to ``MetaTrainer(run_dir=...)``).

    Returns:
        The checkpoint, with tensors on the CPU.

    Raises:
        TrainingCheckpointError: There is no checkpoint, or a file is missing, truncated,
            corrupted (size or SHA-256 differ from the manifest) or of another format or
            version. The message names the file.
    """
    run_dir = Path(run_dir)
    folder = checkpoint_dir(run_dir)
    if folder is None:
        raise TrainingCheckpointError(f"no checkpoint in {run_dir} (expected {run_dir / CHECKPOINT_DIR}/); "
                                      f"start the run without resume")
    manifest_path = folder / "manifest.json"
    try:
        manifest = _parse_json(manifest_path, manifest_path.read_bytes())
    except FileNotFoundError:
        raise TrainingCheckpointError(f"checkpoint file {manifest_path} is missing; the folder was not written by "
                                      f"save_checkpoint() or was modified since") from None
    except OSError as exc:
        raise TrainingCheckpointError(f"checkpoint file {manifest_path} cannot be read ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TrainingCheckpointError(f"checkpoint file {manifest_path} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TrainingCheckpointError(f"checkpoint file {manifest_path} has format version "
                                      f"{manifest.get('format_version')!r}; this release reads version "
                                      f"{FORMAT_VERSION} only")
    files = manifest.get("files")
    if not isinstance(files, dict) or any(_FILES[k] not in files for k in ("weights", "tensors", "state")):
        raise TrainingCheckpointError(f"checkpoint file {manifest_path} does not list {sorted(_FILES.values())}")
    unknown = sorted(str(name) for name in files if name not in _FILES.values())
    if unknown:
        # Only our own files are read: a manifest never sends the reader elsewhere.
        raise TrainingCheckpointError(f"checkpoint file {manifest_path} lists files this format does not have: "
                                      f"{unknown[:3]}")
    step = manifest.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise TrainingCheckpointError(f"checkpoint file {manifest_path}: step must be an integer >= 0, "
                                      f"got {str(step)[:40]!r}")
    payloads = {name: _verified_bytes(folder / name, entry) for name, entry in files.items()}
    state_path = folder / _FILES["state"]
    state = _parse_json(state_path, payloads[_FILES["state"]])
    try:
        state = decode_floats(state)
    except RecursionError:
        raise TrainingCheckpointError(f"checkpoint file {state_path} is nested too deeply to be a trainer "
                                      f"state") from None
    if not isinstance(state, dict) or state.get("step") != step:
        found = repr(state.get("step"))[:40] if isinstance(state, dict) else "?"
        raise TrainingCheckpointError(f"checkpoint file {state_path} does not belong to the manifest "
                                      f"{manifest_path} (step {found} != {step})")
    best = payloads.get(_FILES["best_weights"])
    return Checkpoint(step=int(state.pop("step")),
                      weights=_tensors(folder / _FILES["weights"], payloads[_FILES["weights"]]),
                      best_weights=None if best is None else _tensors(folder / _FILES["best_weights"], best),
                      tensors=_tensors(folder / _FILES["tensors"], payloads[_FILES["tensors"]]), state=state)


def _parse_json(path: Path, payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except RecursionError:
        raise TrainingCheckpointError(f"checkpoint file {path} is nested too deeply to be a checkpoint "
                                      f"file") from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise TrainingCheckpointError(f"checkpoint file {path} is not valid JSON ({exc})") from None


def _verified_bytes(path: Path, entry: Any) -> bytes:
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        raise TrainingCheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete and "
                                      f"cannot be resumed") from None
    except OSError as exc:
        raise TrainingCheckpointError(f"checkpoint file {path} cannot be read ({exc})") from exc
    if not isinstance(entry, dict) or len(payload) != entry.get("bytes") or (
            hashlib.sha256(payload).hexdigest() != entry.get("sha256")):
        raise TrainingCheckpointError(f"checkpoint file {path} is corrupted: its size or SHA-256 differs from "
                                      f"the manifest's ({len(payload)} bytes on disk, "
                                      f"{entry.get('bytes') if isinstance(entry, dict) else '?'!r} recorded)")
    return payload


def _tensors(path: Path, payload: bytes) -> dict[str, Tensor]:
    try:
        return safetensors.torch.load(payload)
    except (safetensors.SafetensorError, ValueError) as exc:
        raise TrainingCheckpointError(f"checkpoint file {path} is not a readable safetensors file ({exc})") from exc
