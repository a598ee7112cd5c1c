"""Data-parallel meta-training over tasks with ``torch.distributed``.

The meta-batch is a list of trajectory *slots* 0 .. B−1. Slot k owns everything random
about its trajectories: its own generator (seeded from the trainer's seed and k) draws
the tasks, init seeds, batch streams and imitation coin flips, and it has its own copy
of the flatness estimators' state (:mod:`.estimator_state`). Rank r of W runs the slots
k ≡ r (mod W). A slot computes the same thing whichever process runs it, so the union
of the ranks' trajectories is exactly the single-process meta-batch.

Per meta-step the ranks exchange (see :meth:`.MetaTrainer.step`):

1. the per-slot records (meta-loss values, logs, divergences), gathered by every rank
   so that all agree on how many trajectories are finite and log the same thing;
2. one all-reduce (sum) of a flat buffer holding each rank's summed meta-gradient, a
   has-gradient mask per weight, and a non-finite flag. Every rank divides by the
   global count of finite trajectories, so the result is the single-process mean up to
   floating-point summation order, and skips the update when the flag is set anywhere,
   so the replicas never part.

Validation tasks are split across ranks the same way and their scores gathered.
Only rank 0 writes checkpoints, metrics and progress; it gathers the other ranks'
trajectories for a checkpoint. Launch with ``torchrun`` (``env://`` rendezvous): gloo
for a learned optimizer on the CPU, NCCL for one on a GPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import ConfigError, FlatL2OError

__all__ = ["DistributedContext", "ReplicaMismatchError", "init_distributed", "shutdown_distributed"]


class ReplicaMismatchError(FlatL2OError):
    """The learned optimizer's weights differ between ranks; the message names a weight."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the process group, and the few collectives we need.

    The default is a single process (rank 0 of 1), for which every collective is the
    identity, so the trainer runs one code path either way.

    Attributes:
        rank: This process's rank.
        world_size: Number of processes.
        backend: ``"gloo"``, ``"nccl"``, or ``None`` for a single process.
        device: Where collective buffers must live (``cuda:<local rank>`` for NCCL).
    """

    rank: int = 0
    world_size: int = 1
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @classmethod
    def current(cls) -> DistributedContext:
        """The initialized default process group, or a single process if there is none."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        backend = str(dist.get_backend())
        device = torch.device("cpu")
        if backend == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), backend=backend, device=device)

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files."""
        return self.rank == 0

    def owned(self, count: int) -> list[int]:
        """The indices in ``range(count)`` this rank handles (round robin)."""
        return list(range(self.rank, count, self.world_size))

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """The elementwise sum of ``tensor`` over ranks (a new tensor on ``tensor``'s device)."""
        if self.world_size == 1:
            return tensor
        buffer = tensor.to(self.device, copy=True)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        return buffer.to(tensor.device)

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (a picklable Python object; in memory only)."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0, in rank order; ``None`` on the other ranks."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_replicas(self, module: nn.Module, *, step: int) -> None:
        """Raise unless ``module``'s weights are bitwise identical on every rank.

        Costs two all-reduces of the weights; the trainer runs it at each checkpoint.

        Raises:
            ReplicaMismatchError: Naming the first weight that differs.
        """
        if self.world_size == 1:
            return
        names, tensors = zip(*module.state_dict().items()) if module.state_dict() else ((), ())
        floats = [t.detach().reshape(-1).to(torch.float64) for t in tensors if t.is_floating_point()]
        if not floats:
            return
        flat = torch.cat(floats)
        high, low = flat.to(self.device, copy=True), (-flat).to(self.device, copy=True)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MAX)
        differs = (high.cpu() != -low.cpu())
        if bool(differs.any()):
            index, offset = int(differs.nonzero()[0]), 0
            for name, tensor in zip(names, tensors):
                if not tensor.is_floating_point():
                    continue
                if index < offset + tensor.numel():
                    break
                offset += tensor.numel()
            raise ReplicaMismatchError(f"meta-step {step}: learned-optimizer weight {name!r} differs across the "
                                       f"{self.world_size} ranks; every rank must build the optimizer from the "
                                       f"same seed and apply the same all-reduced update")


def init_distributed(backend: str | None = None, *, device: str = "cpu",
                     timeout: datetime.timedelta | None = None) -> DistributedContext:
    """Join the process group that ``torchrun`` describes, or stay a single process.

    With ``WORLD_SIZE`` set in the environment (``torchrun`` sets it, with ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) the default process group is
    initialized with ``init_method="env://"``, unless it already is.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; ``None`` picks NCCL for ``device="cuda"`` and
            gloo otherwise.
        device: Where the learned optimizer lives, ``"cpu"`` or ``"cuda"``.
        timeout: Collective timeout (torch's default if ``None``).

    Returns:
        This process's :class:`DistributedContext`.

    Raises:
        ConfigError: A backend this torch build lacks, or NCCL without CUDA.
    """
    if dist.is_available() and dist.is_initialized():
        return DistributedContext.current()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE is set but this torch build has no torch.distributed")
    backend = backend or ("nccl" if device == "cuda" else "gloo")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError("distributed backend 'nccl' needs CUDA; use backend='gloo' on CPU-only machines")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    elif backend != "gloo":
        raise ConfigError(f"distributed backend must be 'gloo' or 'nccl', got {backend!r}")
    options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend=backend, init_method="env://", **options)
    return DistributedContext.current()


def shutdown_distributed() -> None:
    """Leave the default process group, if one is initialized."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
