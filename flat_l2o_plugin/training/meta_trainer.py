"""The reference host loop: truncated-BPTT meta-training of a learned optimizer.

It uses only the public facade :class:`~flat_l2o_plugin.FlatL2O`, as any host would.
One meta-step advances every trajectory of the meta-batch by one unroll of ``unroll``
steps; a trajectory is reset (new task instance, new init seed) after ``horizon``
steps or when it diverges. The meta-loss of an unroll is

    L(φ) = 1/K Σ_t [ f_B(θ_t) + Σ_r flatness term_r(θ_t) ],

with θ_t the iterates the learned optimizer produced and the gradients it is fed
detached (second-order terms dropped, as in Andrychowicz et al. 2016). A non-finite
loss, term or meta-gradient never reaches φ: the unroll is dropped and counted.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..host import FlatL2O
from ..protocols import Task
from .curriculum import Curriculum
from .evaluate import batch_generator, train_with_learned_optimizer
from .imitation import TEACHERS, Teacher

__all__ = ["MetaTrainConfig", "MetaTrainer", "TaskSampler"]

TaskSampler = Callable[[torch.Generator], tuple[Task, int]]
"""Draws ``(task, init_seed)`` for a new trajectory from the trainer's generator."""


@dataclass
class MetaTrainConfig:
    """Budget and hyper-parameters of meta-training.

    Attributes:
        meta_steps: Number of meta-gradient steps (one unroll per trajectory each).
        unroll: K, the truncation length of backpropagation through time.
        horizon: T, the optimizee trajectory length before it is reset.
        meta_batch: Trajectories per meta-step (their meta-losses are averaged).
        meta_lr: Adam's learning rate on the learned optimizer's weights.
        clip: Max global norm of the meta-gradient (0 disables clipping).
        seed: Seeds everything the trainer draws (task instances, init seeds, batches).
        val_every: Validate (and keep the best weights) every this many meta-steps;
            0 disables validation.
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
    """

    meta_steps: int = 200
    unroll: int = 20
    horizon: int = 100
    meta_batch: int = 1
    meta_lr: float = 3e-3
    clip: float = 1.0
    seed: int = 0
    val_every: int = 50
    val_steps: int = 100
    curriculum: tuple[int, ...] = ()
    curriculum_patience: int = 1
    imitation_prob: float = 0.0
    imitation_teacher: str = "adam"
    imitation_lr: float = 1e-2
    imitation_rho: float = 0.05
    imitation_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("meta_steps", "unroll", "horizon", "meta_batch", "val_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MetaTrainConfig.{name} must be an integer >= 1, got {value!r}")
        if self.horizon % self.unroll:
            raise ValueError(f"MetaTrainConfig.horizon ({self.horizon}) must be a multiple of unroll ({self.unroll})")
        if not self.meta_lr > 0:
            raise ValueError(f"MetaTrainConfig.meta_lr must be > 0, got {self.meta_lr!r}")
        self.curriculum = tuple(self.curriculum)
        for h in self.curriculum:
            if h % self.unroll:
                raise ValueError(f"MetaTrainConfig.curriculum horizon {h} must be a multiple of unroll ({self.unroll})")
        if not 0.0 <= self.imitation_prob <= 1.0:
            raise ValueError(f"MetaTrainConfig.imitation_prob must be in [0, 1], got {self.imitation_prob!r}")
        if self.imitation_teacher not in TEACHERS:
            raise ValueError(f"MetaTrainConfig.imitation_teacher must be one of {sorted(TEACHERS)}, "
                             f"got {self.imitation_teacher!r}")


@dataclass
class _Trajectory:
    task: Task
    seed: int
    params: list[Tensor]
    state: dict[str, Tensor]
    generator: torch.Generator
    horizon: int
    step: int = 0
    initial_loss: float | None = None
    teacher: Teacher | None = None


@dataclass
class MetaTrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    validation: list[dict[str, float]] = field(default_factory=list)
    best_step: int | None = None
    best_score: float = -math.inf
    skipped: int = 0
    seconds: float = 0.0


class MetaTrainer:
    """Meta-trains ``optimizer`` on tasks drawn by ``sample_task``.

    Args:
        optimizer: A learned optimizer (``nn.Module`` with ``init_state`` / ``step``).
        sample_task: Draws ``(task, init_seed)`` for each new trajectory.
        flat: The facade with the activated regularizers (``None``: no flatness terms).
        config: The budget; see :class:`MetaTrainConfig`.
        val_tasks: ``(task, seed)`` pairs to validate on. Scored by accuracy on each
            task's ``val`` split after ``val_steps`` steps; the best weights are restored
            at the end. The ``test`` split is never touched.
    """

    def __init__(self, optimizer: nn.Module, sample_task: TaskSampler, *, flat: FlatL2O | None = None,
                 config: MetaTrainConfig | None = None, val_tasks: Sequence[tuple[Task, int]] = ()) -> None:
        self.optimizer = optimizer
        self.sample_task = sample_task
        self.flat = flat if flat is not None else FlatL2O()
        self.config = config or MetaTrainConfig()
        self.val_tasks = list(val_tasks)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.meta_optimizer = torch.optim.Adam(optimizer.parameters(), lr=self.config.meta_lr)
        self._trajectories: list[_Trajectory | None] = [None] * self.config.meta_batch
        self.skipped = 0
        self.curriculum = (Curriculum(self.config.curriculum, self.config.curriculum_patience)
                           if self.config.curriculum else None)

    @property
    def horizon(self) -> int:
        """The trajectory length now (the curriculum's current stage, if there is one)."""
        return self.curriculum.horizon if self.curriculum else self.config.horizon

    # ------------------------------------------------------------------ trajectories

    def _new_trajectory(self) -> _Trajectory:
        task, seed = self.sample_task(self.generator)
        params = [p.detach() for p in task.init_params(seed)]
        gen = batch_generator(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))
        return _Trajectory(task, seed, params, self.optimizer.init_state(params), gen, self.horizon)

    def _unroll(self, traj: _Trajectory) -> tuple[Tensor, dict[str, float]]:
        """One truncated unroll of K steps; returns the meta-loss (in φ's graph) and its logs."""
        cfg, flat = self.config, self.flat
        params = [p.detach().requires_grad_(True) for p in traj.params]
        state = {k: v.detach() for k, v in traj.state.items()}
        loss_fn = partial(traj.task.loss, batch=traj.task.sample_batch(traj.generator))
        loss = loss_fn(params)
        if traj.initial_loss is None:
            traj.initial_loss = float(loss.detach())
        schedule = {"horizon": traj.horizon, "initial_loss": traj.initial_loss}
        total_loss = params[0].new_zeros(())
        terms_sum: dict[str, float] = {}
        for _ in range(cfg.unroll):
            objective = loss
            extra = flat.optimizee_penalty(params, loss_fn, traj.step, loss=loss, **schedule)
            if extra is not None:
                objective = loss + extra
            grads = [g.detach() for g in torch.autograd.grad(objective, params, retain_graph=True)]
            params, state = self.optimizer.step(params, grads, state)
            traj.step += 1
            loss_fn = partial(traj.task.loss, batch=traj.task.sample_batch(traj.generator))
            loss = loss_fn(params)
            total_loss = total_loss + loss
            terms = flat.flatness_terms(params, loss_fn, traj.step, optimizer=self.optimizer,
                                        loss=loss, **schedule)
            for name, term in terms.items():
                total_loss = total_loss + term
                terms_sum[name] = terms_sum.get(name, 0.0) + float(term.detach())
        traj.params = [p.detach() for p in params]
        traj.state = {k: v.detach() for k, v in state.items()}
        logs = {"loss": float(loss.detach()), **{f"term/{k}": v / cfg.unroll for k, v in terms_sum.items()}}
        return total_loss / cfg.unroll, logs

    def _imitation_unroll(self, traj: _Trajectory) -> tuple[Tensor, dict[str, float]]:
        """K steps along the teacher's trajectory; the meta-loss is the imitation error."""
        cfg = self.config
        if traj.teacher is None:
            traj.teacher = TEACHERS[cfg.imitation_teacher](lr=cfg.imitation_lr, rho=cfg.imitation_rho)
        params = [p.detach() for p in traj.params]
        state = {k: v.detach() for k, v in traj.state.items()}
        total = params[0].new_zeros(())
        for _ in range(cfg.unroll):
            loss_fn = partial(traj.task.loss, batch=traj.task.sample_batch(traj.generator))
            leaves = [p.detach().requires_grad_(True) for p in params]
            loss = loss_fn(leaves)
            grads = [g.detach() for g in torch.autograd.grad(loss, leaves)]
            learned, state = self.optimizer.step(params, grads, state)
            target = traj.teacher.update(params, grads, loss_fn)
            sq_err = sum(((new - old - d) ** 2).sum() for new, old, d in zip(learned, params, target))
            total = total + sq_err / sum(p.numel() for p in params) / cfg.imitation_lr**2
            params = [p + d for p, d in zip(params, target)]
            traj.step += 1
        traj.params = params
        traj.state = {k: v.detach() for k, v in state.items()}
        imitation = total / cfg.unroll
        return cfg.imitation_weight * imitation, {"loss": float(loss.detach()), "imitation": float(imitation.detach())}

    # ------------------------------------------------------------------ the loop

    def validate(self) -> dict[str, float]:
        """Mean accuracy and loss on the ``val`` split after ``val_steps`` steps of each val task."""
        accs, losses = [], []
        steps = self.curriculum.horizon if self.curriculum else self.config.val_steps
        for task, seed in self.val_tasks:
            run = train_with_learned_optimizer(self.optimizer, task, seed, steps, eval_every=steps)
            metrics = task.evaluate(run.params, "val") if run.diverged_at is None else {"accuracy": 0.0,
                                                                                        "loss": math.inf}
            accs.append(metrics["accuracy"])
            losses.append(metrics["loss"])
        return {"val_accuracy": sum(accs) / len(accs), "val_loss": sum(losses) / len(losses)}

    def step(self, meta_step: int) -> dict[str, Any]:
        """One meta-step: an unroll of every trajectory, then (if all is finite) an update of φ.

        The meta-gradient is left in the learned optimizer's ``.grad`` (after clipping).
        Returns the step's logs, which the ``after_unroll`` hook has seen.
        """
        cfg = self.config
        self.meta_optimizer.zero_grad(set_to_none=True)
        logs: dict[str, Any] = {"meta_step": meta_step}
        meta_losses, skipped = [], False
        for i in range(cfg.meta_batch):
            traj = self._trajectories[i]
            if traj is None or traj.step >= traj.horizon:
                traj = self._trajectories[i] = self._new_trajectory()
            imitate = cfg.imitation_prob > 0 and float(torch.rand((), generator=self.generator)) < cfg.imitation_prob
            meta_loss, unroll_logs = (self._imitation_unroll if imitate else self._unroll)(traj)
            if not torch.isfinite(meta_loss):
                skipped = True
                self._trajectories[i] = None  # the optimizee is reset; φ never sees this unroll
                logs["diverged_task"], logs["diverged_seed"] = traj.task.name, traj.seed
                continue
            meta_losses.append(meta_loss)
            for k, v in unroll_logs.items():
                logs[k] = logs.get(k, 0.0) + v / cfg.meta_batch
        meta_loss = torch.stack(meta_losses).mean() if meta_losses else torch.tensor(math.nan)
        logs.update(self.flat.stats())
        logs["meta_loss"] = float(meta_loss.detach())
        if meta_losses:
            meta_loss.backward()
            weights = [p for p in self.optimizer.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(weights, cfg.clip if cfg.clip > 0 else math.inf)
            if torch.isfinite(norm):
                self.meta_optimizer.step()
                logs["meta_grad_norm"] = float(norm)
            else:
                skipped = True
                self.meta_optimizer.zero_grad(set_to_none=True)
                self._trajectories = [None] * cfg.meta_batch
        self.skipped += int(skipped)
        logs["skipped"], logs["skipped_total"] = skipped, self.skipped
        self.flat.after_unroll(step=meta_step, meta_loss=meta_loss.detach(), logs=logs)
        return logs

    def train(self, *, progress: bool | Callable[[int], Any] = False) -> MetaTrainResult:
        """Run ``config.meta_steps`` meta-steps and restore the best validated weights."""
        cfg = self.config
        result = MetaTrainResult()
        best_state: dict[str, Tensor] | None = None
        start = time.perf_counter()
        bar = _progress_bar(cfg.meta_steps, progress)
        for meta_step in range(cfg.meta_steps):
            logs = self.step(meta_step)
            if self.val_tasks and cfg.val_every and ((meta_step + 1) % cfg.val_every == 0
                                                     or meta_step + 1 == cfg.meta_steps):
                scores = self.validate()
                logs.update(scores)
                result.validation.append({"meta_step": meta_step + 1, **scores})
                if scores["val_accuracy"] > result.best_score:
                    result.best_score, result.best_step = scores["val_accuracy"], meta_step + 1
                    best_state = copy.deepcopy(self.optimizer.state_dict())
                if self.curriculum is not None and self.curriculum.observe(scores["val_accuracy"]):
                    # Next stage: longer trajectories, starting from the best weights so far.
                    self.optimizer.load_state_dict(best_state)
                    self._trajectories = [None] * cfg.meta_batch
                    # Scores at different horizons are not comparable: the best is per stage.
                    result.best_score = -math.inf
                    logs["curriculum_advanced"] = True
            if self.curriculum is not None:
                logs["curriculum_stage"], logs["horizon"] = self.curriculum.stage, self.curriculum.horizon
            logs["seconds"] = time.perf_counter() - start
            result.history.append(logs)
            bar(meta_step, logs)
        bar.close()
        if best_state is not None:
            self.optimizer.load_state_dict(best_state)
        result.skipped = self.skipped
        result.seconds = time.perf_counter() - start
        return result

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)


class _progress_bar:  # noqa: N801 - used like a function
    """A tqdm bar when ``progress`` is true, a user callback when it is callable, else nothing."""

    def __init__(self, total: int, progress: bool | Callable[[int], Any]) -> None:
        self._callback = progress if callable(progress) else None
        self._bar = None
        if progress is True:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc="meta-train", leave=False)

    def __call__(self, step: int, logs: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{logs.get('loss', math.nan):.3f}", skipped=logs["skipped_total"])
        if self._callback is not None:
            self._callback(step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
