"""The reference host loop: truncated-BPTT meta-training of a learned optimizer.

It uses only the public facade :class:`~flat_l2o_plugin.FlatL2O`, as any host would.
One meta-step advances every trajectory of the meta-batch by one unroll of ``unroll``
steps; a trajectory is reset (new task instance, new init seed) after ``horizon``
steps or when it diverges. The meta-loss of an unroll is

    L(φ) = 1/K Σ_t [ f_B(θ_t) + Σ_r flatness term_r(θ_t) ],

with θ_t the iterates the learned optimizer produced and the gradients it is fed
detached (second-order terms dropped, as in Andrychowicz et al. 2016). The meta-batch's
meta-gradient is the mean over its finite unrolls; Adam applies it with the rate of
:mod:`.lr_schedule`.

What makes it safe to leave running for days:

- **Divergence.** A non-finite loss, flatness term or meta-gradient never reaches φ. A
  non-finite unroll is dropped and its trajectory reset; a non-finite meta-gradient
  skips the update and resets every trajectory. Each event is counted, written to the
  step's metrics (``diverged_task``, ``diverged_seed``, ``diverged_step``) and logged
  through :mod:`logging` (logger ``flat_l2o_plugin.training.meta_trainer``).
- **Checkpoints.** With ``run_dir``, the complete trainer state (weights, Adam moments,
  every RNG, the in-flight optimizee trajectories, estimator probes, curriculum, best
  weights, counters) is written to ``run_dir/checkpoint/`` every ``checkpoint_every``
  meta-steps, at the end, and on Ctrl-C, atomically. What goes in and how it comes back
  is :mod:`.trainer_checkpoint`'s business; the folder format is :mod:`.checkpoint`'s.
  ``train(resume=True)`` continues exactly: a run killed at any moment and resumed
  produces the same metrics as one never interrupted.
- **Metrics.** One JSON line per meta-step in ``run_dir/metrics.jsonl``
  (:mod:`.metrics`), cut back to the checkpoint on resume.
- **Scale-out.** Under ``torch.distributed`` the meta-batch is split across ranks and
  the meta-gradient all-reduced (:mod:`.distributed`).

Determinism: everything random about trajectory slot k (its tasks, init seeds, batch
streams, imitation coin flips, estimator probes) comes from slot k's own generator,
seeded from ``config.seed`` and k. The learned optimizer's initial weights and the
estimators' seeds come from torch's global RNG when they are built, so seed that first.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial, reduce
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError, PluginHookError
from ..host import FlatL2O
from ..protocols import Task
from ..wrappers.stack import host_step
from .curriculum import Curriculum
from .distributed import DistributedContext
from .estimator_state import EstimatorSlots
from .evaluate import batch_generator, train_with_learned_optimizer
from .imitation import TEACHERS
from .lr_schedule import META_LR_SCHEDULES, meta_learning_rate
from .checkpoint import Checkpoint
from .metrics import METRICS_FILE, MetricsLog
from .trainer_checkpoint import TrainerCheckpointer
from .trajectory import Trajectory

__all__ = ["MetaTrainConfig", "MetaTrainResult", "MetaTrainer", "TaskSampler"]

logger = logging.getLogger(__name__)

TaskSampler = Callable[[torch.Generator], tuple[Task, int]]
"""Draws ``(task, init_seed)`` for a new trajectory from the slot's generator.

It must draw only from the generator it is given: on resume the trainer replays it with
the saved generator state to rebuild each in-flight trajectory's task.
"""

META_OBJECTIVES = ("train", "heldout")
"""The values ``MetaTrainConfig.meta_objective`` accepts."""


@dataclass
class MetaTrainConfig:
    """Budget and hyper-parameters of meta-training.

    Attributes:
        meta_steps: Number of meta-gradient steps (one unroll per trajectory each).
        unroll: K, the truncation length of backpropagation through time.
        horizon: T, the optimizee trajectory length before it is reset.
        meta_batch: Trajectories per meta-step (their meta-losses are averaged).
        meta_lr: Adam's learning rate on the learned optimizer's weights (after warmup).
        meta_lr_schedule: ``"constant"``, or ``"cosine"`` decay from ``meta_lr`` to
            ``meta_lr_min`` over the meta-steps after warmup (:mod:`.lr_schedule`).
        meta_lr_warmup: Meta-steps of linear warmup to ``meta_lr`` (0: none).
        meta_lr_min: The cosine schedule's final rate.
        clip: Max global norm of the meta-gradient (0 disables clipping).
        seed: Seeds everything the trainer draws (task instances, init seeds, batches).
        val_every: Validate (and keep the best weights) every this many meta-steps;
            0 disables validation.
        val_at_start: Also validate the initial weights (as meta-step 0), so they compete
            for the best checkpoint: a learned optimizer that starts as a hand-designed
            one (``learned_correction``) then never ends worse than it on validation.
        val_steps: Optimizee steps of each validation run (with a curriculum: the
            current stage's horizon).
        curriculum: Trajectory lengths by stage, e.g. ``(100, 200, 500, 1000)``: the
            enhanced training's curriculum (:mod:`.curriculum`). Empty: a fixed ``horizon``.
        curriculum_patience: Validations without improvement that end a stage.
        imitation_prob: Probability that an unroll imitates a teacher optimizer instead
            of minimizing the loss (:mod:`.imitation`); 0 disables imitation.
        imitation_teacher: ``"adam"`` or ``"sam"``.
        imitation_lr: The teacher's learning rate.
        imitation_rho: The SAM teacher's radius.
        imitation_weight: Scale of the imitation loss in the meta-loss.
        checkpoint_every: With a ``run_dir``, write a checkpoint every this many
            meta-steps (0: only at the end and on interruption).
        meta_objective: What the meta-loss measures at each iterate: ``"train"``, the
            mini-batch training loss (the L2O default), or ``"heldout"``, the loss on a
            mini-batch of data the optimizee does not train on (the task's
            ``sample_heldout_batch``), which rewards update rules whose optimizees
            generalize rather than those that fit fastest. Flatness terms are always
            taken on the training mini-batch.
    """

    meta_steps: int = 200
    unroll: int = 20
    horizon: int = 100
    meta_batch: int = 1
    meta_lr: float = 3e-3
    meta_lr_schedule: str = "constant"
    meta_lr_warmup: int = 0
    meta_lr_min: float = 0.0
    clip: float = 1.0
    seed: int = 0
    val_every: int = 50
    val_at_start: bool = False
    val_steps: int = 100
    curriculum: tuple[int, ...] = ()
    curriculum_patience: int = 1
    imitation_prob: float = 0.0
    imitation_teacher: str = "adam"
    imitation_lr: float = 1e-2
    imitation_rho: float = 0.05
    imitation_weight: float = 1.0
    checkpoint_every: int = 10
    meta_objective: str = "train"

    def __post_init__(self) -> None:
        for name in ("meta_steps", "unroll", "horizon", "meta_batch", "val_steps", "curriculum_patience"):
            _check_int(self, name, minimum=1)
        for name in ("meta_lr_warmup", "checkpoint_every", "val_every"):
            _check_int(self, name, minimum=0)
        _check_int(self, "seed", minimum=0, maximum=MAX_SEED)
        if self.horizon % self.unroll:
            raise ConfigError(f"MetaTrainConfig.horizon ({self.horizon}) must be a multiple of unroll ({self.unroll})")
        # Adam moves each weight by about meta_lr per step: above 1 it throws φ around
        # (and past float32's range it cannot even apply the step).
        _check_number(self, "meta_lr", 0.0, MAX_META_LR, low_open=True)
        if self.meta_lr_schedule not in META_LR_SCHEDULES:
            raise ConfigError(f"MetaTrainConfig.meta_lr_schedule must be one of {META_LR_SCHEDULES}, "
                              f"got {self.meta_lr_schedule!r}")
        _check_number(self, "meta_lr_min", 0.0, self.meta_lr)
        _check_number(self, "clip", 0.0, math.inf)
        if not isinstance(self.curriculum, (list, tuple)):
            raise ConfigError(f"MetaTrainConfig.curriculum must be a list of horizons, got {self.curriculum!r}")
        self.curriculum = tuple(self.curriculum)
        for h in self.curriculum:
            if not isinstance(h, int) or isinstance(h, bool) or h < 1 or h % self.unroll:
                raise ConfigError(f"MetaTrainConfig.curriculum horizon {h!r} must be a positive multiple of unroll "
                                  f"({self.unroll})")
        if list(self.curriculum) != sorted(self.curriculum):
            raise ConfigError(f"MetaTrainConfig.curriculum horizons must increase, got {list(self.curriculum)}")
        _check_number(self, "imitation_prob", 0.0, 1.0)
        if self.meta_objective not in META_OBJECTIVES:
            raise ConfigError(f"MetaTrainConfig.meta_objective must be one of {META_OBJECTIVES}, "
                              f"got {self.meta_objective!r}")
        if self.imitation_teacher not in TEACHERS:
            raise ConfigError(f"MetaTrainConfig.imitation_teacher must be one of {sorted(TEACHERS)}, "
                              f"got {self.imitation_teacher!r}")
        _check_number(self, "imitation_lr", 0.0, MAX_META_LR, low_open=True)
        _check_number(self, "imitation_rho", 0.0, math.inf)
        _check_number(self, "imitation_weight", 0.0, math.inf)


MAX_SEED = 2**63 - 1
"""The largest ``MetaTrainConfig.seed`` (torch's generators take 64-bit seeds)."""

MAX_META_LR = 1.0
"""The largest meta-learning rate (and imitation teacher rate) a config may ask for."""


def _check_int(config: MetaTrainConfig, name: str, *, minimum: int, maximum: int | None = None) -> None:
    value = getattr(config, name)
    if (not isinstance(value, int) or isinstance(value, bool) or value < minimum
            or (maximum is not None and value > maximum)):
        bound = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
        raise ConfigError(f"MetaTrainConfig.{name} must be {bound}, got {value!r}")


def _check_number(config: MetaTrainConfig, name: str, low: float, high: float, *, low_open: bool = False) -> None:
    value = getattr(config, name)
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if low_open else value >= low) and value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]" if math.isfinite(high) else (
            f"> {low:g}" if low_open else f">= {low:g}")
        where = f"in {interval}" if math.isfinite(high) else interval
        raise ConfigError(f"MetaTrainConfig.{name} must be a finite number {where}, got {value!r}")


class _Unroll(NamedTuple):
    meta_loss: Tensor
    logs: dict[str, float]
    first_step: int
    values: list[Tensor]  # detached per-iterate objectives, values[i] at θ_{first_step + i}


@dataclass
class MetaTrainResult:
    """What :meth:`MetaTrainer.train` returns.

    Attributes:
        history: One logs dict per meta-step, from meta-step 0 (on a resumed run, the
            steps before the checkpoint are read back from ``metrics.jsonl``).
        validation: ``{"meta_step", "val_score", "val_loss"}`` (and ``"val_accuracy"``) per validation.
        best_step: The meta-step count of the best validation (in the current
            curriculum stage), or ``None``.
        best_score: Its validation score (accuracy, or minus the loss for tasks without one).
        skipped: Meta-steps in which something diverged.
        diverged: Trajectories dropped for a non-finite unroll.
        seconds: Wall time, summed over all runs of a resumed training.
        resumed_from: The checkpoint's meta-step, if this run resumed one.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    validation: list[dict[str, float]] = field(default_factory=list)
    best_step: int | None = None
    best_score: float = -math.inf
    skipped: int = 0
    diverged: int = 0
    seconds: float = 0.0
    resumed_from: int | None = None


def _mean_by_key(dicts: Sequence[dict[str, float]]) -> dict[str, float]:
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for d in dicts:
        for key, value in d.items():
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}


def _takes_generator(init_state: Callable[..., Any]) -> bool:
    try:
        return "generator" in inspect.signature(init_state).parameters
    except (TypeError, ValueError):
        return False


def _gradient_graph(flat: FlatL2O, params: list[Tensor], loss: Tensor, step: int,
                    schedule: Mapping[str, Any]) -> tuple[Tensor, ...] | None:
    """∇f(θ_t) with its graph when a due regularizer takes the host's ``grads``, else ``None``."""
    if not flat.wants_gradient(step, loss=loss, **schedule):
        return None
    return torch.autograd.grad(loss, params, create_graph=True)


def _step_gradient(params: list[Tensor], loss: Tensor, extra: Tensor | None,
                   graph: Sequence[Tensor] | None) -> list[Tensor]:
    """The detached gradient fed to the learned optimizer: of the loss, plus ``extra`` if any."""
    if extra is None and graph is not None:
        # The gradient graph built for the regularizers is also this step's gradient.
        return [g.detach() for g in graph]
    objective = loss if extra is None else loss + extra
    return [g.detach() for g in torch.autograd.grad(objective, params, retain_graph=True)]


def _heldout_loss(traj: Trajectory, params: list[Tensor]) -> Tensor:
    """The loss at ``params`` on a batch of the task's held-out training data (``meta_objective="heldout"``)."""
    sample = getattr(traj.task, "sample_heldout_batch", None)
    if sample is None:
        raise ConfigError(f"MetaTrainConfig.meta_objective='heldout' needs tasks with sample_heldout_batch(); "
                          f"task {getattr(traj.task, 'name', traj.task)!r} has none")
    return traj.task.loss(params, sample(traj.generator))


class MetaTrainer:
    """Meta-trains ``optimizer`` on tasks drawn by ``sample_task``.

    Args:
        optimizer: A learned optimizer (``nn.Module`` with ``init_state`` / ``step``).
        sample_task: Draws ``(task, init_seed)`` for each new trajectory from the
            generator it is given (and from nothing else, for resume to be exact).
        flat: The facade with the activated regularizers (``None``: no flatness terms).
        config: The budget; see :class:`MetaTrainConfig`.
        val_tasks: ``(task, seed)`` pairs to validate on. Scored by accuracy on each
            task's ``val`` split after ``val_steps`` steps; the best weights are restored
            at the end. The ``test`` split is never touched.
        run_dir: Folder for ``metrics.jsonl`` and ``checkpoint/`` (``None``: nothing is
            written and the run cannot be resumed). Locked while :meth:`train` runs
            (:mod:`.run_folder`): a second writer is refused.
        distributed: The process group to split the meta-batch over; by default the
            initialized ``torch.distributed`` group, or a single process.
        run_config: The host's description of the run (plain JSON data, e.g. the
            runner's spec), recorded in every checkpoint as ``run_config`` so that a
            resume can compare against what the run was made with
            (:meth:`read_checkpoint`).

    Raises:
        ConfigError: ``meta_batch`` smaller than the number of ranks.
    """

    def __init__(self, optimizer: nn.Module, sample_task: TaskSampler, *, flat: FlatL2O | None = None,
                 config: MetaTrainConfig | None = None, val_tasks: Sequence[tuple[Task, int]] = (),
                 run_dir: str | Path | None = None, distributed: DistributedContext | None = None,
                 run_config: Mapping[str, Any] | None = None) -> None:
        self.optimizer = optimizer
        self.run_config = run_config
        self.sample_task = sample_task
        self.flat = flat if flat is not None else FlatL2O()
        self.config = cfg = config or MetaTrainConfig()
        self.val_tasks = list(val_tasks)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.distributed = distributed if distributed is not None else DistributedContext.current()
        if cfg.meta_batch < self.distributed.world_size:
            raise ConfigError(f"MetaTrainConfig.meta_batch ({cfg.meta_batch}) must be at least the number of "
                              f"processes ({self.distributed.world_size}): every rank needs a trajectory")
        root = torch.Generator().manual_seed(cfg.seed)
        self._slot_generators = [torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=root)))
                                 for _ in range(cfg.meta_batch)]
        self._slots = self.distributed.owned(cfg.meta_batch)
        self._trajectories: list[Trajectory | None] = [None] * cfg.meta_batch
        self._estimators = EstimatorSlots(self.flat, cfg.meta_batch)
        self._init_takes_generator = _takes_generator(optimizer.init_state)
        self.meta_optimizer = torch.optim.Adam(optimizer.parameters(), lr=cfg.meta_lr)
        self.skipped = 0
        self.diverged = 0
        self.curriculum = Curriculum(cfg.curriculum, cfg.curriculum_patience) if cfg.curriculum else None
        self._best_weights: dict[str, Tensor] | None = None
        self._best_score = -math.inf
        self._best_step: int | None = None
        self._seconds = 0.0
        self._checkpoints = TrainerCheckpointer(self)
        self._resumed_from: int | None = None

    @property
    def horizon(self) -> int:
        """The trajectory length now (the curriculum's current stage, if there is one)."""
        return self.curriculum.horizon if self.curriculum else self.config.horizon

    def meta_lr(self, meta_step: int) -> float:
        """The meta-learning rate of ``meta_step`` under the configured schedule."""
        cfg = self.config
        return meta_learning_rate(meta_step, base=cfg.meta_lr, total=cfg.meta_steps, schedule=cfg.meta_lr_schedule,
                                  warmup=cfg.meta_lr_warmup, minimum=cfg.meta_lr_min)

    # ------------------------------------------------------------------ trajectories

    def _new_trajectory(self, slot: int) -> Trajectory:
        generator = self._slot_generators[slot]
        sample_state = generator.get_state()
        task, seed = self.sample_task(generator)
        params = [p.detach() for p in task.init_params(seed)]
        batches = batch_generator(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        # Random scaling factors (RNNProp) come from the slot's stream, not the global one.
        state = (self.optimizer.init_state(params, generator=generator) if self._init_takes_generator
                 else self.optimizer.init_state(params))
        return Trajectory(task, int(seed), params, state, batches, self.horizon, slot=slot, sample_state=sample_state)

    def _unroll(self, traj: Trajectory) -> _Unroll:
        """One truncated unroll of K steps; returns the meta-loss (in φ's graph) and its logs."""
        cfg, flat = self.config, self.flat
        first_step = traj.step
        params = [p.detach().requires_grad_(True) for p in traj.params]
        state = {k: v.detach() for k, v in traj.state.items()}
        # The loss_fn handed to the regularizers replays the random state of the host's own
        # evaluation, so the loss and gradient graph below are theirs to use.
        loss, loss_fn = flat.evaluate_loss(partial(traj.task.loss, batch=traj.task.sample_batch(traj.generator)),
                                           params)
        if traj.initial_loss is None:
            traj.initial_loss = float(loss.detach())
        schedule = {"horizon": traj.horizon, "initial_loss": traj.initial_loss}
        total_loss = params[0].new_zeros(())
        terms_sum: dict[str, float] = {}
        heldout = cfg.meta_objective == "heldout"
        values = [loss.detach()]
        graph_grads = None
        for _ in range(cfg.unroll):
            extra = flat.optimizee_penalty(params, loss_fn, traj.step, loss=loss, grads=graph_grads, **schedule)
            grads = _step_gradient(params, loss, extra, graph_grads)
            params, state = host_step(self.optimizer, params, grads, state, loss_fn=loss_fn)
            traj.step += 1
            loss, loss_fn = flat.evaluate_loss(
                partial(traj.task.loss, batch=traj.task.sample_batch(traj.generator)), params)
            graph_grads = _gradient_graph(flat, params, loss, traj.step, schedule)
            step_total = loss if not heldout else _heldout_loss(traj, params)
            terms = flat.flatness_terms(params, loss_fn, traj.step, optimizer=self.optimizer,
                                        loss=loss, grads=graph_grads, **schedule)
            for name, term in terms.items():
                step_total = step_total + term
                terms_sum[name] = terms_sum.get(name, 0.0) + float(term.detach())
            total_loss = total_loss + step_total
            values.append(step_total.detach())
        traj.params = [p.detach() for p in params]
        traj.state = {k: v.detach() for k, v in state.items()}
        logs = {"loss": float(loss.detach()), **{f"term/{k}": v / cfg.unroll for k, v in terms_sum.items()}}
        return _Unroll(total_loss / cfg.unroll, logs, first_step, values)

    def _imitation_unroll(self, traj: Trajectory) -> _Unroll:
        """K steps along the teacher's trajectory; the meta-loss is the imitation error."""
        cfg = self.config
        if traj.teacher is None:
            traj.teacher = TEACHERS[cfg.imitation_teacher](lr=cfg.imitation_lr, rho=cfg.imitation_rho)
        first_step = traj.step
        params = [p.detach() for p in traj.params]
        state = {k: v.detach() for k, v in traj.state.items()}
        total = params[0].new_zeros(())
        values = []
        for _ in range(cfg.unroll):
            loss_fn = partial(traj.task.loss, batch=traj.task.sample_batch(traj.generator))
            leaves = [p.detach().requires_grad_(True) for p in params]
            loss = loss_fn(leaves)
            grads = [g.detach() for g in torch.autograd.grad(loss, leaves)]
            learned, state = host_step(self.optimizer, params, grads, state, loss_fn=loss_fn)
            target = traj.teacher.update(params, grads, loss_fn)
            sq_err = sum(((new - old - d) ** 2).sum() for new, old, d in zip(learned, params, target))
            error = sq_err / sum(p.numel() for p in params) / cfg.imitation_lr**2
            total = total + error
            values.append(loss.detach() + error.detach())
            params = [p + d for p, d in zip(params, target)]
            traj.step += 1
        traj.params = params
        traj.state = {k: v.detach() for k, v in state.items()}
        imitation = total / cfg.unroll
        logs = {"loss": float(loss.detach()), "imitation": float(imitation.detach())}
        return _Unroll(cfg.imitation_weight * imitation, logs, first_step, values)

    # ------------------------------------------------------------------ one meta-step

    def validate(self) -> dict[str, float]:
        """Scores on the ``val`` split after ``val_steps`` steps of each val task.

        ``val_score`` selects checkpoints: the mean accuracy when every val task reports
        one (classifiers), else minus the mean loss (quadratics, Rosenbrock). A diverged
        run scores accuracy 0 and loss ∞. Under ``torch.distributed`` the val tasks are
        split across ranks and every rank returns the same means.
        """
        local = []
        steps = self.curriculum.horizon if self.curriculum else self.config.val_steps
        for index in self.distributed.owned(len(self.val_tasks)):
            task, seed = self.val_tasks[index]
            run = train_with_learned_optimizer(self.optimizer, task, seed, steps, eval_every=steps)
            metrics = task.evaluate(run.params, "val") if run.diverged_at is None else {"accuracy": 0.0,
                                                                                        "loss": math.inf}
            loss = metrics["loss"] if math.isfinite(metrics["loss"]) else math.inf
            local.append((index, metrics.get("accuracy", math.nan), loss))
        results = sorted(r for part in self.distributed.all_gather(local) for r in part)
        accs, losses = [r[1] for r in results], [r[2] for r in results]
        scores = {"val_loss": sum(losses) / len(losses)}
        if not any(math.isnan(a) for a in accs):
            scores["val_accuracy"] = sum(accs) / len(accs)
        scores["val_score"] = scores.get("val_accuracy", -scores["val_loss"])
        return scores

    def step(self, meta_step: int) -> dict[str, Any]:
        """One meta-step: an unroll of every trajectory, then (if all is finite) an update of φ.

        The meta-gradient is left in the learned optimizer's ``.grad`` (after clipping).
        Returns the step's logs, which the ``after_unroll`` hook has seen; they are the
        same on every rank.

        Raises:
            PluginHookError: A plugin raised in a hook; the message names the meta-step,
                the trajectory (slot, task, init seed) and the optimizee step.
        """
        lr = self.meta_lr(meta_step)
        for group in self.meta_optimizer.param_groups:
            group["lr"] = lr
        self.meta_optimizer.zero_grad(set_to_none=True)
        unrolls, local_records = self._unroll_owned_slots(meta_step)
        records = sorted((r for part in self.distributed.all_gather(local_records) for r in part),
                         key=lambda r: r["slot"])
        finite = [r for r in records if "diverged" not in r]
        diverged = [r for r in records if "diverged" in r]

        logs: dict[str, Any] = {"meta_step": meta_step, "meta_lr": lr}
        logs.update(_mean_by_key([r["logs"] for r in finite]))
        logs.update(_mean_by_key([r["stats"] for r in finite]))
        logs["meta_loss"] = sum(r["meta_loss"] for r in finite) / len(finite) if finite else math.nan
        for r in diverged:
            if self.distributed.is_main:
                d = r["diverged"]
                logger.warning("meta-step %d: trajectory slot %d (task %s, init seed %d) diverged at optimizee step "
                               "%d (non-finite loss or flatness term); the unroll is dropped and the trajectory "
                               "reset", meta_step, r["slot"], d["task"], d["seed"], d["step"])
        if diverged:
            first = diverged[0]["diverged"]
            logs["diverged_task"], logs["diverged_seed"], logs["diverged_step"] = (first["task"], first["seed"],
                                                                                   first["step"])
        gradient_failed = bool(finite) and not self._apply_meta_gradient(meta_step, unrolls, len(finite), logs)
        skipped = bool(diverged) or gradient_failed
        self.skipped += int(skipped)
        self.diverged += len(diverged)
        logs["skipped"], logs["skipped_total"] = skipped, self.skipped
        logs["diverged"], logs["diverged_total"] = len(diverged), self.diverged
        try:
            self.flat.after_unroll(step=meta_step, meta_loss=torch.tensor(logs["meta_loss"]), logs=logs)
        except PluginHookError as exc:
            raise PluginHookError(f"meta-step {meta_step}: {exc}") from exc.__cause__
        return logs

    def _unroll_owned_slots(self, meta_step: int) -> tuple[list[tuple[Tensor, dict[str, Any]]], list[dict[str, Any]]]:
        """Unroll this rank's trajectories: the finite meta-losses with their source, and every slot's record."""
        cfg = self.config
        unrolls: list[tuple[Tensor, dict[str, Any]]] = []
        records: list[dict[str, Any]] = []
        for slot in self._slots:
            traj = self._trajectories[slot]
            if traj is None or traj.step >= traj.horizon:
                traj = self._trajectories[slot] = self._new_trajectory(slot)
            imitate = cfg.imitation_prob > 0 and (
                float(torch.rand((), generator=self._slot_generators[slot])) < cfg.imitation_prob)
            try:
                with self._estimators.use(slot):
                    unroll = (self._imitation_unroll if imitate else self._unroll)(traj)
                    stats = self.flat.stats()
            except PluginHookError as exc:
                raise PluginHookError(f"meta-step {meta_step}, trajectory slot {slot} (task {traj.task.name}, init "
                                      f"seed {traj.seed}): {exc}") from exc.__cause__
            value = float(unroll.meta_loss.detach())
            record: dict[str, Any] = {"slot": slot, "meta_loss": value, "logs": unroll.logs, "stats": stats}
            if math.isfinite(value):
                unrolls.append((unroll.meta_loss, {"slot": slot, "task": traj.task.name, "seed": traj.seed,
                                                   "steps": [unroll.first_step, traj.step]}))
            else:
                bad = next((i for i, v in enumerate(unroll.values) if not bool(torch.isfinite(v))),
                           len(unroll.values) - 1)
                record["diverged"] = {"task": traj.task.name, "seed": traj.seed, "step": unroll.first_step + bad}
                self._trajectories[slot] = None  # the optimizee is reset; φ never sees this unroll
            records.append(record)
        return unrolls, records

    def _apply_meta_gradient(self, meta_step: int, unrolls: list[tuple[Tensor, dict[str, Any]]], count: int,
                             logs: dict[str, Any]) -> bool:
        """Back-propagate, average over ranks, clip and step φ; False (nothing applied) if not finite."""
        if unrolls:
            # The graphs are kept to the end of the step, to name the unroll behind a non-finite gradient.
            torch.stack([loss for loss, _ in unrolls]).sum().backward(retain_graph=True)
        finite_gradient = self._average_meta_gradient(count)
        weights = [p for p in self.optimizer.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(weights, self.config.clip if self.config.clip > 0 else math.inf)
        if finite_gradient and bool(torch.isfinite(norm)):
            self.meta_optimizer.step()
            logs["meta_grad_norm"] = float(norm)
            return True
        sources = self._non_finite_sources(unrolls)
        self.meta_optimizer.zero_grad(set_to_none=True)
        for slot in self._slots:
            self._trajectories[slot] = None
        logs["meta_grad_non_finite"] = True
        if sources:
            logs["non_finite_task"], logs["non_finite_seed"] = sources[0]["task"], sources[0]["seed"]
        if self.distributed.is_main:
            named = "; ".join(f"trajectory slot {s['slot']}: task {s['task']}, init seed {s['seed']}, optimizee "
                              f"steps {s['steps'][0]}-{s['steps'][1]}" for s in sources[:4])
            named += f"; and {len(sources) - 4} more" if len(sources) > 4 else ""
            logger.warning("meta-step %d: the meta-gradient is not finite (%s); the learned optimizer is not "
                           "updated and every trajectory is reset", meta_step,
                           f"from {named}" if sources else "each unroll's is finite; their sum overflows")
        return False

    def _non_finite_sources(self, unrolls: list[tuple[Tensor, dict[str, Any]]]) -> list[dict[str, Any]]:
        """The trajectories (of every rank) whose own meta-gradient, or its norm, is not finite."""
        weights = [p for p in self.optimizer.parameters() if p.requires_grad]
        local = []
        for loss, source in unrolls:
            grads = [g for g in torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
                     if g is not None]
            if grads and not bool(torch.isfinite(torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g) for g in grads])))):
                local.append(source)
        return sorted((s for part in self.distributed.all_gather(local) for s in part), key=lambda s: s["slot"])

    def _average_meta_gradient(self, count: int) -> bool:
        """Sum every rank's meta-gradient, divide by ``count``; False if any rank's was not finite.

        One all-reduce carries the gradients, a has-gradient mask (a weight no unroll
        reached keeps ``grad=None``, which Adam skips, exactly as in a single process) and
        the non-finite flag, so that all ranks take the same decision.
        """
        params = list(self.optimizer.parameters())
        if not params:
            return True
        dtype = reduce(torch.promote_types, (p.dtype for p in params))
        local = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                           for p in params])
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=local.device)
        flag = (~torch.isfinite(local)).any().to(dtype).reshape(1)
        buffer = self.distributed.all_reduce_sum(torch.cat([local, has_grad, flag]))
        offset = 0
        present = buffer[local.numel():local.numel() + len(params)].tolist()
        for p, reached in zip(params, present):
            size = p.numel()
            p.grad = (buffer[offset:offset + size] / count).view_as(p).to(p.dtype) if reached > 0 else None
            offset += size
        return not bool(buffer[-1] > 0)

    # ------------------------------------------------------------------ resume

    def read_checkpoint(self) -> Checkpoint:
        """The run folder's checkpoint, verified, on every rank (rank 0 reads and broadcasts).

        Its ``state["run_config"]`` is the ``run_config`` the run was made with (absent in
        checkpoints written before it was recorded): a host compares it with its own
        before :meth:`resume`, and before writing anything into the folder.

        Raises:
            TrainingCheckpointError: No checkpoint, or a missing, corrupt or unreadable file.
        """
        return self._checkpoints.read()

    def lock(self, *, create: bool = True) -> ContextManager[Any]:
        """A ``with`` block holding the run folder's lock (rank 0), for a host that checks
        and writes the folder itself around :meth:`train` (which takes it too).

        Yields an object whose ``record_holder()`` writes this process into the lock file
        once the host's checks passed. ``create``: create the folder if missing.

        Raises:
            RunFolderLockedError: Another process holds the folder.
            ConfigError: ``run_dir`` is a file, lies under one, or cannot be created.
        """
        return self._checkpoints.lock(create=create)

    def resume(self, checkpoint: Checkpoint | None = None) -> int:
        """Restore the run folder's checkpoint (or ``checkpoint``) into this trainer.

        :meth:`train` with ``resume=True`` then continues from it; it calls this itself
        when nothing was restored yet. Only ``MetaTrainConfig.meta_steps`` and
        ``checkpoint_every`` may differ from the checkpoint's config.

        Returns:
            The meta-step training continues with.

        Raises:
            TrainingCheckpointError: The checkpoint is unreadable or does not fit this
                trainer (another config, learned optimizer, regularizers or task list);
                the message names the file and the difference.
        """
        if self._resumed_from is not None:
            return self._resumed_from
        if self.run_dir is None:
            raise ConfigError("MetaTrainer.resume() needs run_dir= to resume from")
        checkpoint = checkpoint if checkpoint is not None else self._checkpoints.read()
        self._checkpoints.restore(checkpoint)
        self._resumed_from = checkpoint.step
        return checkpoint.step

    # ------------------------------------------------------------------ the loop

    def train(self, *, progress: bool | Callable[[int], Any] = False, resume: bool = False) -> MetaTrainResult:
        """Run meta-steps up to ``config.meta_steps`` and restore the best validated weights.

        Args:
            progress: ``True`` for a progress bar (rank 0), or a callback ``f(meta_step)``.
            resume: Continue from ``run_dir/checkpoint/`` instead of starting afresh.

        Raises:
            TrainingCheckpointError: ``resume`` without a readable checkpoint that fits
                this trainer, or a fresh start in a ``run_dir`` that already holds one.
            RunFolderLockedError: Another process is running in ``run_dir``.
            ConfigError: ``run_dir`` is a file, lies under one, or cannot be created.
            KeyboardInterrupt: Re-raised after writing a checkpoint at the last completed
                meta-step (single process; under ``torch.distributed`` the last periodic
                checkpoint is the resume point).
        """
        resume = resume or self._resumed_from is not None
        result = MetaTrainResult()
        with self._checkpoints.lock(create=not resume) as lock:
            start = 0
            if resume:
                start = result.resumed_from = self.resume()
            elif self.run_dir is not None:
                self._checkpoints.refuse_fresh_start()
            lock.record_holder()  # the checks passed: the run starts
            result.seconds = self._run(start, progress, result)
        return result

    def _run(self, start: int, progress: bool | Callable[[int], Any], result: MetaTrainResult) -> float:
        """Meta-steps ``start .. meta_steps - 1``; fills ``result``; returns the wall time."""
        cfg, dist_ctx = self.config, self.distributed
        metrics = self._open_metrics(start, result)
        if start == 0 and cfg.val_at_start and self.val_tasks:
            self._keep_if_best(0, self.validate(), result)
        checkpoints = self._checkpoints if self.run_dir is not None else None
        if checkpoints is not None:
            checkpoints.track(start, saved=self._resumed_from is not None)
        clock = time.perf_counter() - self._seconds
        bar = _progress_bar(cfg.meta_steps, progress if dist_ctx.is_main else False, initial=start)
        try:
            for meta_step in range(start, cfg.meta_steps):
                logs = self.step(meta_step)
                self._validate_and_advance(meta_step, logs, result)
                if self.curriculum is not None:
                    logs["curriculum_stage"], logs["horizon"] = self.curriculum.stage, self.curriculum.horizon
                logs["seconds"] = self._seconds = time.perf_counter() - clock
                result.history.append(logs)
                if metrics is not None:
                    metrics.append(logs)
                bar(meta_step, logs)
                if checkpoints is not None:
                    checkpoints.completed(meta_step + 1, metrics)
            if checkpoints is not None:
                checkpoints.flush(metrics)
        except KeyboardInterrupt:
            if checkpoints is not None:
                checkpoints.interrupted(metrics)
            raise
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        if self._best_weights is not None:
            self.optimizer.load_state_dict(self._best_weights)
        result.best_score, result.best_step = self._best_score, self._best_step
        result.skipped, result.diverged = self.skipped, self.diverged
        self._seconds = time.perf_counter() - clock
        return self._seconds

    def _open_metrics(self, start: int, result: MetaTrainResult) -> MetricsLog | None:
        """``metrics.jsonl`` cut back to ``start`` (rank 0 with a run folder), its records put in ``result``."""
        if self.run_dir is None or not self.distributed.is_main:
            return None
        metrics = MetricsLog(self.run_dir / METRICS_FILE)
        result.history = metrics.open(keep=start)
        result.validation = [{"meta_step": h["meta_step"] + 1,
                              **{k: h[k] for k in ("val_score", "val_accuracy", "val_loss") if k in h}}
                             for h in result.history if "val_score" in h]
        return metrics

    def _validate_and_advance(self, meta_step: int, logs: dict[str, Any], result: MetaTrainResult) -> None:
        cfg = self.config
        if not (self.val_tasks and cfg.val_every and ((meta_step + 1) % cfg.val_every == 0
                                                       or meta_step + 1 == cfg.meta_steps)):
            return
        scores = self.validate()
        logs.update(scores)
        self._keep_if_best(meta_step + 1, scores, result)
        if self.curriculum is not None and self.curriculum.observe(scores["val_score"]):
            # Next stage: longer trajectories, starting from the best weights so far.
            self.optimizer.load_state_dict(self._best_weights)
            self._trajectories = [None] * cfg.meta_batch
            # Scores at different horizons are not comparable: the best is per stage.
            self._best_score = -math.inf
            logs["curriculum_advanced"] = True

    def _keep_if_best(self, meta_steps_done: int, scores: dict[str, float], result: MetaTrainResult) -> None:
        result.validation.append({"meta_step": meta_steps_done, **scores})
        if scores["val_score"] > self._best_score:
            self._best_score, self._best_step = scores["val_score"], meta_steps_done
            self._best_weights = copy.deepcopy(self.optimizer.state_dict())

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)


class _progress_bar:  # noqa: N801 - used like a function
    """A tqdm bar when ``progress`` is true, a user callback when it is callable, else nothing."""

    def __init__(self, total: int, progress: bool | Callable[[int], Any], *, initial: int = 0) -> None:
        self._callback = progress if callable(progress) else None
        self._bar = None
        if progress is True:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="meta-train", leave=False)

    def __call__(self, step: int, logs: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{logs.get('loss', math.nan):.3f}", skipped=logs["skipped_total"])
        if self._callback is not None:
            self._callback(step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
