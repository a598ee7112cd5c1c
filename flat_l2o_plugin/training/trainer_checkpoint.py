"""The meta-trainer's side of a checkpoint: what it captures, how it restores, what must match.

:mod:`.checkpoint` writes and reads the folder (atomically, verified); this module
decides what goes into it. A :class:`TrainerCheckpointer` belongs to one
:class:`~.meta_trainer.MetaTrainer` and reads or writes, on the trainer, exactly the
state that makes a resume exact:

- φ (the learned optimizer's weights) and the meta-optimizer's moments;
- every RNG: torch's global one (and CUDA's), Python's, NumPy's, and each slot's;
- each slot's in-flight :class:`~.trajectory.Trajectory` and estimator state;
- the counters, the curriculum, the best weights and score, the wall time;
- the ``MetaTrainConfig`` and the estimators' fingerprint, to refuse another run's checkpoint.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from .checkpoint import (CHECKPOINT_DIR, Checkpoint, TrainingCheckpointError, checkpoint_dir, decode_floats,
                         encode_floats, load_checkpoint, save_checkpoint)
from .imitation import Teacher
from .metrics import MetricsLog
from .trajectory import Trajectory

if TYPE_CHECKING:
    from .meta_trainer import MetaTrainer

__all__ = ["RESUMABLE_FIELDS", "TrainerCheckpointer"]

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
        try:
            self._check_compatible(checkpoint, folder)
            self._restore_state(checkpoint, state_file)
        except KeyError as exc:
            raise TrainingCheckpointError(f"checkpoint {folder} lacks the entry {exc}; it was written by another "
                                          f"version of this trainer and cannot be resumed") from exc

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
                                          f"{state.get('learned_optimizer')}): {exc}") from exc
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
        groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
                  for group in state["meta_optimizer"]["param_groups"]]
        try:
            t.meta_optimizer.load_state_dict({"state": moments, "param_groups": groups})
        except (ValueError, RuntimeError) as exc:
            raise TrainingCheckpointError(f"checkpoint file {state_file}: the meta-optimizer state does not fit "
                                          f"this learned optimizer's weights ({exc})") from exc

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
