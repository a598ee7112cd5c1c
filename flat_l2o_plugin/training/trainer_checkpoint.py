"""The meta-trainer's side of a checkpoint: what it captures, how it restores, what must match.

:mod:`.checkpoint` writes and reads the folder (atomically, verified); this module
decides what goes into it. A :class:`TrainerCheckpointer` belongs to one
:class:`~.meta_trainer.MetaTrainer` and reads or writes, on the trainer, exactly the
state that makes a resume exact:

- φ (the learned optimizer's weights) and the meta-optimizer's moments;
- every RNG: torch's global one (and CUDA's), Python's, NumPy's, and each slot's;
- each slot's in-flight :class:`~.trajectory.Trajectory` and estimator state;
- the counters, the curriculum, the best weights and score, the wall time;
- the ``MetaTrainConfig``, the estimators' fingerprint and the host's ``run_config``, to
  refuse another run's checkpoint.

Restoring validates ``trainer.json`` against the layout this module writes before it
touches the trainer: a value of the wrong type is an error naming the file and the
entry, never a crash in the middle of the run that follows.
"""

from __future__ import annotations

import json
import logging
import math
import random
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from .checkpoint import (CHECKPOINT_DIR, Checkpoint, TrainingCheckpointError, checkpoint_dir, decode_floats,
                         encode_floats, load_checkpoint, save_checkpoint)
from .imitation import Teacher
from .metrics import MetricsLog
from .run_folder import RunLock, prepare_run_folder
from .trajectory import Trajectory

if TYPE_CHECKING:
    from .meta_trainer import MetaTrainer

__all__ = ["RESUMABLE_FIELDS", "STATE_LAYOUT", "TrainerCheckpointer", "validate_state"]

# The trainer's logger: interruption messages read as the trainer's, as they always have.
logger = logging.getLogger("flat_l2o_plugin.training.meta_trainer")

RESUMABLE_FIELDS = ("meta_steps", "checkpoint_every")
"""``MetaTrainConfig`` fields a resumed run may change (a longer budget, another checkpoint rate)."""


def as_json(value: Any) -> Any:
    """What ``value`` looks like after a trip through a checkpoint's JSON (tuples -> lists)."""
    return decode_floats(json.loads(json.dumps(encode_floats(value))))


class TrainerCheckpointer:
    """Captures a trainer's state into a :class:`~.checkpoint.Checkpoint` and restores it.

    Args:
        trainer: The trainer whose state this reads and writes; it must have a ``run_dir``
            for :meth:`save`, :meth:`read` and :meth:`refuse_fresh_start`.
    """

    def __init__(self, trainer: MetaTrainer) -> None:
        self.trainer = trainer
        self._snapshot: Checkpoint | None = None
        self._saved_step: int | None = None

    @property
    def run_dir(self) -> Path:
        if self.trainer.run_dir is None:
            raise ConfigError("MetaTrainer has no run_dir= to write checkpoints to or resume from")
        return self.trainer.run_dir

    # ------------------------------------------------------------------ the folder

    @contextmanager
    def lock(self, *, create: bool) -> Iterator[RunLock | _Unlocked]:
        """Hold the run folder's lock (rank 0) for the ``with`` block; create the folder if ``create``.

        Without a ``run_dir``, on other ranks, or when resuming from a folder that does
        not exist (the read then says so), there is nothing to lock.
        """
        t = self.trainer
        if t.run_dir is None or not t.distributed.is_main:
            yield _Unlocked()
            return
        prepare_run_folder(t.run_dir, create=create)
        if not t.run_dir.is_dir():
            yield _Unlocked()
            return
        with RunLock(t.run_dir) as held:
            yield held

    # ------------------------------------------------------------------ during a run

    def track(self, step: int, *, saved: bool) -> None:
        """Start a run at ``step``; ``saved``: the folder already holds that step (a resume)."""
        self._snapshot = self.capture(step)
        self._saved_step = step if saved else None

    def completed(self, step: int, metrics: MetricsLog | None) -> None:
        """Meta-step ``step - 1`` is done: keep its state, and write it every ``checkpoint_every`` steps."""
        self._snapshot = self.capture(step)
        every = self.trainer.config.checkpoint_every
        if every and step % every == 0:
            self._write(metrics)

    def flush(self, metrics: MetricsLog | None) -> None:
        """Write the last completed step, unless it is already on disk (the end of a run)."""
        if self._snapshot is not None and self._saved_step != self._snapshot.step:
            self._write(metrics)

    def interrupted(self, metrics: MetricsLog | None) -> None:
        """Ctrl-C: write the last whole meta-step where the ranks can still agree on it, and say where it is."""
        snapshot, dist_ctx = self._snapshot, self.trainer.distributed
        if snapshot is None:
            return
        if self._saved_step != snapshot.step and dist_ctx.world_size == 1:
            self._write(metrics)
        elif self._saved_step != snapshot.step and dist_ctx.is_main:
            logger.warning("interrupted mid-step: the ranks cannot gather their trajectories now, so no "
                           "checkpoint is written for meta-step %d", snapshot.step)
        if self._saved_step is not None and dist_ctx.is_main:
            logger.warning("interrupted: the checkpoint in %s holds meta-step %d; train(resume=True) "
                           "continues from there", self.run_dir / CHECKPOINT_DIR, self._saved_step)

    def _write(self, metrics: MetricsLog | None) -> None:
        assert self._snapshot is not None
        self.save(self._snapshot, metrics)
        self._saved_step = self._snapshot.step

    # ------------------------------------------------------------------ capture and save

    def capture(self, step: int) -> Checkpoint:
        """The state after ``step`` completed meta-steps, as a checkpoint in memory.

        Tensors that the loop replaces rather than writes into (trajectory params and
        states, probes, teacher moments, best weights) are referenced, not copied; what
        is updated in place (φ, Adam's moments, generators) is copied. Taken after every
        meta-step, so that an interruption mid-step can still save the last whole one.
        """
        t = self.trainer
        tensors: dict[str, Tensor] = {"rng/torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng/cuda/{index}"] = cuda_state
        np_state = np.random.get_state(legacy=True)
        tensors["rng/numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
        version, internal, gauss = random.getstate()
        optimizer_state = t.meta_optimizer.state_dict()
        optimizer_scalars: dict[str, dict[str, Any]] = {}
        for index, entries in optimizer_state["state"].items():
            for key, value in entries.items():
                if isinstance(value, Tensor):
                    tensors[f"meta_optimizer/{index}/{key}"] = value.detach().clone()
                else:
                    optimizer_scalars.setdefault(str(index), {})[key] = value
        slots: dict[str, Any] = {}
        for slot in t._slots:
            prefix = f"slot/{slot}"
            tensors[f"{prefix}/generator"] = t._slot_generators[slot].get_state()
            estimator_tensors, estimator_meta = t._estimators.export(slot, f"{prefix}/estimators")
            tensors.update(estimator_tensors)
            slots[str(slot)] = {"trajectory": _export_trajectory(t._trajectories[slot], prefix, tensors),
                                "estimators": estimator_meta}
        state = {
            "config": as_json(asdict(t.config)),
            "seconds": t._seconds,
            "skipped": t.skipped,
            "diverged": t.diverged,
            "best_score": t._best_score,
            "best_step": t._best_step,
            "curriculum": t.curriculum.state_dict() if t.curriculum is not None else None,
            "meta_optimizer": {"param_groups": optimizer_state["param_groups"], "state": optimizer_scalars},
            "rng": {"python": [version, list(internal), gauss],
                    "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]},
            "estimators": t._estimators.fingerprint,
            "slots": slots,
            "learned_optimizer": type(t.optimizer).__qualname__,
            "world_size": t.distributed.world_size,
        }
        if t.run_config is not None:
            state["run_config"] = as_json(t.run_config)
        weights = {k: v.detach().clone() for k, v in t.optimizer.state_dict().items()}
        return Checkpoint(step=step, weights=weights, best_weights=t._best_weights, tensors=tensors, state=state)

    def save(self, snapshot: Checkpoint, metrics: MetricsLog | None) -> None:
        """Write ``snapshot`` (rank 0, with the other ranks' slots gathered)."""
        t = self.trainer
        parts = t.distributed.gather(None if t.distributed.is_main else (
            {k: v.detach().cpu() for k, v in snapshot.tensors.items() if k.startswith("slot/")},
            snapshot.state["slots"]))
        if t.distributed.is_main:
            tensors, slots = dict(snapshot.tensors), dict(snapshot.state["slots"])
            for part in (parts or [])[1:]:
                tensors.update(part[0])
                slots.update(part[1])
            if metrics is not None:
                metrics.sync()  # the checkpoint refers to these lines
            save_checkpoint(self.run_dir, Checkpoint(step=snapshot.step, weights=snapshot.weights,
                                                     best_weights=snapshot.best_weights, tensors=tensors,
                                                     state={**snapshot.state, "slots": slots}))
        t.distributed.check_replicas(t.optimizer, step=snapshot.step)

    def refuse_fresh_start(self) -> None:
        """Raise if the run folder already holds a checkpoint (a fresh start would overwrite it)."""
        dist_ctx = self.trainer.distributed
        existing = dist_ctx.broadcast(str(checkpoint_dir(self.run_dir)) if dist_ctx.is_main
                                      and checkpoint_dir(self.run_dir) is not None else None)
        if existing is not None:
            raise TrainingCheckpointError(f"{existing} already holds a checkpoint of this run folder; pass "
                                          f"resume=True to continue it, or choose a new run_dir")

    # ------------------------------------------------------------------ read and restore

    def read(self) -> Checkpoint:
        """The run folder's checkpoint, read by rank 0 and broadcast to every rank."""
        payload: Checkpoint | TrainingCheckpointError | None = None
        if self.trainer.distributed.is_main:
            try:
                payload = load_checkpoint(self.run_dir)
            except TrainingCheckpointError as exc:
                payload = exc
        # Rank 0 reads, everyone gets it: run_dir need not be on a shared file system.
        payload = self.trainer.distributed.broadcast(payload)
        if isinstance(payload, Exception):
            raise payload
        return payload

    def restore(self, checkpoint: Checkpoint) -> None:
        """Load ``checkpoint`` into the trainer; raise if it belongs to another run."""
        folder = checkpoint_dir(self.run_dir) or self.run_dir / CHECKPOINT_DIR
        state_file = folder / "trainer.json"
        validate_state(checkpoint.state, state_file)
        self._check_estimator_entries(checkpoint.state, state_file)
        try:
            self._check_compatible(checkpoint, folder)
            self._restore_state(checkpoint, state_file)
        except KeyError as exc:
            raise TrainingCheckpointError(f"checkpoint {folder} lacks the entry {exc}; it was written by another "
                                          f"version of this trainer and cannot be resumed") from exc
        except (TypeError, ValueError, IndexError, OverflowError, RuntimeError, AttributeError) as exc:
            if isinstance(exc, TrainingCheckpointError):
                raise
            raise TrainingCheckpointError(f"checkpoint {folder} does not hold what this trainer wrote "
                                          f"({type(exc).__name__}: {one_line(exc)}); it cannot be resumed") from exc

    def _check_estimator_entries(self, state: dict[str, Any], state_file: Path) -> None:
        """Each slot's estimator entries have the layout :meth:`EstimatorSlots.export` writes, and
        every plain value the type its attribute had when the estimator was built."""
        built = self.trainer._estimators.fingerprint
        for slot, entry in state["slots"].items():
            if not slot.isdigit() or int(slot) >= self.trainer.config.meta_batch:
                continue  # refused with the slot count by _check_compatible
            fresh = self.trainer._estimators.export(int(slot), "")[1]
            for key, attrs in entry["estimators"].items():
                if key in fresh and sorted(attrs) != sorted(fresh[key]):
                    raise TrainingCheckpointError(f"checkpoint file {state_file}: slots.{slot}.estimators.{key} holds "
                                                  f"{sorted(attrs)[:8]}, the estimator has {sorted(fresh[key])[:8]}")
                for name, item in attrs.items():
                    where = f"checkpoint file {state_file}: slots.{slot}.estimators.{key}.{name}"
                    kind = item.get("kind")
                    fields = {"generator": {"device": str}, "tensor": {"device": str}, "value": {},
                              "tensors": {"device": str, "length": int, "tuple": bool}}.get(
                        kind if isinstance(kind, str) else "")
                    if fields is None or any(not isinstance(item.get(f), t) for f, t in fields.items()):
                        raise TrainingCheckpointError(f"{where} is not an estimator entry this trainer wrote")
                    was = fresh.get(key, {}).get(name, {}).get("kind")
                    if was == "generator" and kind != "generator":
                        raise TrainingCheckpointError(f"{where} must be a generator's state, as the estimator's is")
                    if kind != "value":
                        continue
                    value, initial = item.get("value", _MISSING), built.get(key, {}).get(name)
                    if value is not None and not isinstance(value, (bool, int, float, str)) or (
                            initial is not None and not _same_kind(value, initial)):
                        expected = type(initial).__name__ if initial is not None else "a number, string or null"
                        raise TrainingCheckpointError(f"{where} must be {expected} like the estimator's own, got "
                                                      f"{json.dumps(value)[:40] if value is not _MISSING else 'none'}")

    def _check_compatible(self, checkpoint: Checkpoint, folder: Path) -> None:
        t = self.trainer
        state, state_file = checkpoint.state, folder / "trainer.json"
        saved, now = state["config"], as_json(asdict(t.config))
        changed = [k for k in sorted(set(saved) | set(now))
                   if k not in RESUMABLE_FIELDS and saved.get(k) != now.get(k)]
        if changed:
            details = ", ".join(f"{k}={saved.get(k)!r} (now {now.get(k)!r})" for k in changed)
            raise TrainingCheckpointError(f"checkpoint file {state_file} was written with another MetaTrainConfig: "
                                          f"{details}; resume with the same config (only {', '.join(RESUMABLE_FIELDS)}"
                                          f" may change) or start a new run_dir")
        if t.config.meta_steps < checkpoint.step:
            raise TrainingCheckpointError(f"checkpoint file {state_file} is at meta-step {checkpoint.step}, past "
                                          f"meta_steps={t.config.meta_steps}; resume with meta_steps >= "
                                          f"{checkpoint.step}")
        allowed = {k: (saved.get(k), now.get(k)) for k in RESUMABLE_FIELDS if saved.get(k) != now.get(k)}
        if allowed and t.distributed.is_main:
            logger.warning("resuming %s at meta-step %d with %s (a run's %s may change on resume)", folder,
                           checkpoint.step, ", ".join(f"{k} changed from {a} to {b}" for k, (a, b) in allowed.items()),
                           " and ".join(RESUMABLE_FIELDS))
        fingerprint = as_json(t._estimators.fingerprint)
        if state["estimators"] != fingerprint:
            raise TrainingCheckpointError(f"checkpoint file {state_file} was written with other activated "
                                          f"regularizers or estimator options ({state['estimators']}; now "
                                          f"{fingerprint}); resume with the same regularizers config")
        try:
            t.optimizer.load_state_dict(checkpoint.weights)
        except RuntimeError as exc:
            raise TrainingCheckpointError(f"checkpoint file {folder / 'weights.safetensors'} does not fit this "
                                          f"learned optimizer ({type(t.optimizer).__name__}; the checkpoint's was "
                                          f"{state.get('learned_optimizer')}): {one_line(exc)}") from exc
        if sorted(int(k) for k in state["slots"]) != list(range(t.config.meta_batch)):
            raise TrainingCheckpointError(f"checkpoint file {state_file} holds trajectory slots "
                                          f"{sorted(state['slots'])}, expected 0 .. {t.config.meta_batch - 1}")

    def _restore_state(self, checkpoint: Checkpoint, state_file: Path) -> None:
        t = self.trainer
        state, tensors = checkpoint.state, checkpoint.tensors
        moments: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("meta_optimizer/"):
                _, index, name = key.split("/", 2)
                moments.setdefault(int(index), {})[name] = value
        for index, scalars in state["meta_optimizer"]["state"].items():
            moments.setdefault(int(index), {}).update(scalars)
        groups = self._param_groups(state["meta_optimizer"]["param_groups"], state_file)
        try:
            t.meta_optimizer.load_state_dict({"state": moments, "param_groups": groups})
        except (ValueError, RuntimeError) as exc:
            raise TrainingCheckpointError(f"checkpoint file {state_file}: the meta-optimizer state does not fit "
                                          f"this learned optimizer's weights ({one_line(exc)})") from exc

        torch.set_rng_state(tensors["rng/torch"])
        cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda/")]
        if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        version, internal, gauss = state["rng"]["python"]
        random.setstate((version, tuple(internal), gauss))
        name, position, has_gauss, cached = state["rng"]["numpy"]
        np.random.set_state((name, tensors["rng/numpy"].numpy().astype(np.uint32), position, has_gauss, cached))

        t.skipped, t.diverged, t._seconds = int(state["skipped"]), int(state["diverged"]), state["seconds"]
        t._best_score, t._best_step = state["best_score"], state["best_step"]
        t._best_weights = checkpoint.best_weights
        if t.curriculum is not None:
            t.curriculum.load_state_dict(state["curriculum"])
        for slot, generator in enumerate(t._slot_generators):
            generator.set_state(tensors[f"slot/{slot}/generator"])
        for slot in t._slots:
            entry = state["slots"][str(slot)]
            try:
                t._estimators.load(slot, f"slot/{slot}/estimators", tensors, entry["estimators"])
            except KeyError as exc:
                raise TrainingCheckpointError(f"checkpoint file {state_file}: {exc.args[0]}") from exc
            t._trajectories[slot] = self._import_trajectory(slot, entry["trajectory"], tensors, state_file)

    def _param_groups(self, saved: list[dict[str, Any]], state_file: Path) -> list[dict[str, Any]]:
        """The checkpoint's Adam param groups, which must be this trainer's own but for the rate.

        The trainer builds Adam with fixed settings and sets ``lr`` at every step, so a
        group that differs elsewhere was not written by this trainer. Keys only one side
        has (another torch release's settings) are left to this release's defaults.
        """
        live = self.trainer.meta_optimizer.state_dict()["param_groups"]
        as_saved = json.loads(json.dumps(live))  # tuples -> lists, as in the file
        if len(saved) != len(live):
            raise TrainingCheckpointError(f"checkpoint file {state_file}: meta_optimizer.param_groups has "
                                          f"{len(saved)} groups, this trainer {len(live)}")
        for index, (group, ours) in enumerate(zip(saved, as_saved)):
            lr = group.get("lr")
            changed = sorted(k for k in set(group) & set(ours) if k != "lr" and group[k] != ours[k])
            if changed or not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr < math.inf:
                raise TrainingCheckpointError(f"checkpoint file {state_file}: meta_optimizer.param_groups.{index} "
                                              f"differs from this trainer's Adam settings in "
                                              f"{changed or ['lr']}")
        return [{**group, "lr": float(saved[i]["lr"])} for i, group in enumerate(live)]

    def _import_trajectory(self, slot: int, entry: dict[str, Any] | None, tensors: dict[str, Tensor],
                           state_file: Path) -> Trajectory | None:
        if entry is None:
            return None
        key = f"slot/{slot}/trajectory"
        # The task object is not saved: drawing again from the saved generator state rebuilds it.
        replay = torch.Generator()
        replay.set_state(tensors[f"{key}/sample_generator"])
        task, seed = self.trainer.sample_task(replay)
        if int(seed) != entry["seed"] or task.name != entry["task"]:
            raise TrainingCheckpointError(
                f"checkpoint file {state_file}: trajectory slot {slot} was task {entry['task']!r} with init seed "
                f"{entry['seed']}, but sample_task now draws {task.name!r} with seed {seed} from the same generator "
                f"state; sample_task must draw only from the generator it is given, from the same task list")
        device = torch.device(entry["device"])
        params = [tensors[f"{key}/param/{j}"].to(device) for j in range(entry["params"])]
        state = {name: tensors[f"{key}/state/{name}"].to(device) for name in entry["state_keys"]}
        batches = torch.Generator()
        batches.set_state(tensors[f"{key}/batches"])
        traj = Trajectory(task, int(seed), params, state, batches, int(entry["horizon"]), slot=slot,
                          sample_state=tensors[f"{key}/sample_generator"], step=int(entry["step"]),
                          initial_loss=entry["initial_loss"])
        teacher = entry["teacher"]
        if teacher is not None:
            traj.teacher = Teacher(lr=teacher["lr"], betas=tuple(teacher["betas"]), eps=teacher["eps"],
                                   rho=teacher["rho"])
            count = teacher["moments"]
            traj.teacher.load_state_dict({
                "exp_avg": [tensors[f"{key}/teacher/exp_avg/{j}"].to(device) for j in range(count)],
                "exp_avg_sq": [tensors[f"{key}/teacher/exp_avg_sq/{j}"].to(device) for j in range(count)],
                "step": teacher["step"]})
        return traj


def _export_trajectory(traj: Trajectory | None, prefix: str, tensors: dict[str, Tensor]) -> dict[str, Any] | None:
    if traj is None:
        return None
    key = f"{prefix}/trajectory"
    for j, p in enumerate(traj.params):
        tensors[f"{key}/param/{j}"] = p
    for name, value in traj.state.items():
        tensors[f"{key}/state/{name}"] = value
    tensors[f"{key}/batches"] = traj.generator.get_state()
    tensors[f"{key}/sample_generator"] = traj.sample_state
    teacher = None
    if traj.teacher is not None:
        moments = traj.teacher.state_dict()
        for j, (m, v) in enumerate(zip(moments["exp_avg"], moments["exp_avg_sq"])):
            tensors[f"{key}/teacher/exp_avg/{j}"], tensors[f"{key}/teacher/exp_avg_sq/{j}"] = m, v
        teacher = {"lr": traj.teacher.lr, "betas": list(traj.teacher.betas), "eps": traj.teacher.eps,
                   "rho": traj.teacher.rho, "step": moments["step"], "moments": len(moments["exp_avg"])}
    return {"task": traj.task.name, "seed": traj.seed, "horizon": traj.horizon, "step": traj.step,
            "initial_loss": traj.initial_loss, "params": len(traj.params), "state_keys": list(traj.state),
            "device": str(traj.params[0].device) if traj.params else "cpu", "teacher": teacher}


class _Unlocked:
    """Stands in for a :class:`RunLock` where there is nothing to lock."""

    def record_holder(self) -> None:
        pass


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``exc``'s message on one line (torch's errors span several), cut to ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ------------------------------------------------------------------ trainer.json's layout

class _Optional:
    def __init__(self, spec: Any) -> None:
        self.spec = spec


class _DictOf:
    def __init__(self, spec: Any) -> None:
        self.spec = spec


_MISSING = object()
_NUMBER = "number"  # int or float, inf and nan included (a best score starts at -inf)
_COUNT = "count"  # an int >= 0
_ANY = "any"  # compared as a whole elsewhere (config, fingerprints) or checked by its owner

_TEACHER = {"lr": _NUMBER, "betas": [_NUMBER], "eps": _NUMBER, "rho": _NUMBER, "step": _COUNT, "moments": _COUNT}
_TRAJECTORY = {"task": str, "seed": int, "horizon": _COUNT, "step": _COUNT, "initial_loss": _Optional(_NUMBER),
               "params": _COUNT, "state_keys": [str], "device": str, "teacher": _Optional(_TEACHER)}
STATE_LAYOUT: dict[str, Any] = {
    "config": dict,
    "seconds": _NUMBER,
    "skipped": _COUNT,
    "diverged": _COUNT,
    "best_score": _NUMBER,
    "best_step": _Optional(_COUNT),
    "curriculum": _Optional({"stage": _COUNT, "stale": _COUNT, "stage_best": _NUMBER}),
    "meta_optimizer": {"param_groups": [dict], "state": _DictOf(dict)},
    "rng": {"python": (int, [int], _Optional(_NUMBER)), "numpy": (str, int, int, _NUMBER)},
    "estimators": _ANY,
    "slots": _DictOf({"trajectory": _Optional(_TRAJECTORY), "estimators": _DictOf(_DictOf(dict))}),
}
"""What :meth:`TrainerCheckpointer.capture` writes to ``trainer.json`` (``run_config``,
``learned_optimizer`` and ``world_size`` are informative or compared as a whole)."""


def validate_state(state: Any, state_file: Path) -> None:
    """Check ``state`` (a parsed ``trainer.json``) against :data:`STATE_LAYOUT`.

    Raises:
        TrainingCheckpointError: An entry is missing or of the wrong type; the message
            names the file and the entry (``slots.0.trajectory.step``).
    """
    _check(state, STATE_LAYOUT, "", state_file)


def _check(value: Any, spec: Any, where: str, state_file: Path) -> None:
    def fail(expected: str) -> None:
        shown = json.dumps(value)[:60] if _jsonable(value) else type(value).__name__
        raise TrainingCheckpointError(f"checkpoint file {state_file}: {where or 'the top level'} must be {expected}, "
                                      f"got {shown}; the file was not written by this trainer or was edited")

    if spec == _ANY:
        return
    if isinstance(spec, _Optional):
        if value is not None:
            _check(value, spec.spec, where, state_file)
        return
    if spec == _NUMBER:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            fail("a number")
    elif spec == _COUNT:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            fail("an integer >= 0")
    elif spec in (int, str, dict):
        if not isinstance(value, spec) or isinstance(value, bool):
            fail({int: "an integer", str: "a string", dict: "an object"}[spec])
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            fail("an object")
        for key, sub in spec.items():
            if key not in value:
                raise TrainingCheckpointError(f"checkpoint file {state_file}: {_join(where, key)} is missing; the "
                                              f"file was not written by this trainer or was edited")
            _check(value[key], sub, _join(where, key), state_file)
    elif isinstance(spec, _DictOf):
        if not isinstance(value, dict):
            fail("an object")
        for key, item in value.items():
            _check(item, spec.spec, _join(where, key), state_file)
    elif isinstance(spec, list):
        if not isinstance(value, list):
            fail("a list")
        for index, item in enumerate(value):
            _check(item, spec[0], _join(where, str(index)), state_file)
    elif isinstance(spec, tuple):
        if not isinstance(value, list) or len(value) != len(spec):
            fail(f"a list of {len(spec)} entries")
        for index, (item, sub) in enumerate(zip(value, spec)):
            _check(item, sub, _join(where, str(index)), state_file)


def _same_kind(value: Any, like: Any) -> bool:
    """``value`` can stand where ``like`` stood: a bool for a bool, an int for an int, a number for a float."""
    if isinstance(like, bool) or isinstance(value, bool):
        return isinstance(like, bool) and isinstance(value, bool)
    if isinstance(like, int):
        return isinstance(value, int)
    if isinstance(like, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(like))


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        return False
    return True

