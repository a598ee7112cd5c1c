"""Study jobs: plain-data descriptions and a content-addressed cache (executors: :mod:`.executors`).

A job is ``(kind, arguments)`` with ``kind`` one of :data:`KINDS` and the arguments
plain JSON data, so any process (or machine) can run it from the registry alone. Its
key is the SHA-256 of its canonical JSON: the same job always lands in the same file,
so a study that is run again reuses every finished job and runs only what is missing.

A result is written atomically (a temporary file renamed into place; the JSON last, so
its presence means the job is complete): a worker killed mid-job leaves nothing behind
that a later run could mistake for a result. Meta-trained weights go to a safetensors
file next to the JSON; nothing is ever pickled.

Every job fixes its own thread count (one), default dtype (float32) and seeds, so where
it runs does not change what it computes.
"""

from __future__ import annotations

import hashlib
import json
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..errors import FlatL2OError

__all__ = ["KINDS", "Job", "JobCache", "JobFailure", "StudyJobError", "job_key", "pending",
           "run_job", "run_job_captured", "weights_digest"]

KINDS = ("evaluate", "meta_train")


class StudyJobError(FlatL2OError):
    """Jobs of a study failed; the message names each one (its key and what it was)."""


@dataclass(frozen=True)
class Job:
    """One unit of work: what to run and with which arguments (plain JSON data)."""

    kind: str
    args: dict[str, Any]

    @property
    def key(self) -> str:
        return job_key(self.kind, self.args)

    def describe(self) -> str:
        """The job's kind and arguments on one line (a task's options shortened to its name)."""
        args = dict(self.args)
        for key in ("task", "tasks"):
            if key in args:
                specs = [args[key]] if key == "task" else args[key]
                args[key] = [spec[0] for spec in specs] if key == "tasks" else specs[0][0]
        return f"{self.kind} {json.dumps(args, sort_keys=True, default=str)}"


@dataclass(frozen=True)
class JobFailure:
    """A job that raised: its key, what it was, and the error."""

    job: Job
    error: str
    trace: str = ""


def job_key(kind: str, args: Mapping[str, Any]) -> str:
    """The content address of a job: SHA-256 of ``{"kind", "args"}`` as canonical JSON (24 hex digits)."""
    # Tuples and lists serialize alike, and 1.0 stays distinct from 1 (an option may care).
    payload = json.dumps({"kind": kind, "args": args}, sort_keys=True, allow_nan=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def weights_digest(state_dict: Mapping[str, Any]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class JobCache:
    """The folder of finished jobs: ``<key>.json`` (and ``<key>.safetensors`` for weights)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def json_path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def weights_path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.json_path(key).is_file()

    def load(self, key: str, *, weights: bool = False) -> dict[str, Any]:
        """A finished job's result; with ``weights``, its ``state_dict`` too (from safetensors)."""
        result = json.loads(self.json_path(key).read_text())
        if weights and result.get("has_weights"):
            from safetensors.torch import load_file

            result["state_dict"] = load_file(str(self.weights_path(key)))
        return result

    def store(self, key: str, result: Mapping[str, Any]) -> None:
        """Write a result atomically; a ``state_dict`` entry goes to safetensors."""
        from .._atomic import write_atomically

        self.folder.mkdir(parents=True, exist_ok=True)
        result = dict(result)
        state_dict = result.pop("state_dict", None)
        if state_dict is not None:
            from safetensors.torch import save

            tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
            write_atomically(self.weights_path(key), save(tensors), OSError)
            result["has_weights"] = True
        write_atomically(self.json_path(key), json.dumps(result, allow_nan=True).encode(), OSError)


def _meta_train(args: Mapping[str, Any], cache: JobCache) -> dict[str, Any]:
    from ..training.experiment import meta_train

    result = meta_train(**args)
    result["weights_digest"] = weights_digest(result["state_dict"])
    # Per-meta-step logs are large and the study reads only the validations.
    result.pop("history", None)
    return result


def _evaluate(args: Mapping[str, Any], cache: JobCache) -> dict[str, Any]:
    from ..training.experiment import evaluate

    learned = args.get("learned")
    if learned is not None and "weights_key" in learned:
        # A meta-trained optimizer is named by the key of the job that made it, so the
        # job (and its key) does not depend on where the cache folder lies.
        key = learned["weights_key"]
        if not cache.has(key):
            raise StudyJobError(f"the meta-training job {key} this evaluation needs is not in {cache.folder}")
        state = cache.load(key, weights=True)["state_dict"]
        args = {**args, "learned": {**{k: v for k, v in learned.items() if k != "weights_key"}, "state_dict": state}}
    return evaluate(**args)


_RUNNERS: dict[str, Callable[[Mapping[str, Any], JobCache], dict[str, Any]]] = {"meta_train": _meta_train,
                                                                               "evaluate": _evaluate}


def run_job(kind: str, args: dict[str, Any], cache_dir: str) -> str:
    """Run one job unless its result is cached, store the result, and return the key.

    This is the function executors ship to workers: it needs only the package, the job's
    plain data and a cache folder the worker can write.
    """
    import torch

    cache = JobCache(cache_dir)
    key = job_key(kind, args)
    if not cache.has(key):
        # A worker process may have been left in another dtype by whatever ran before.
        dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            result = _RUNNERS[kind](args, cache)
        finally:
            torch.set_default_dtype(dtype)
        cache.store(key, result)
    return key


def run_job_captured(kind: str, args: dict[str, Any], cache_dir: str) -> tuple[str, str | None, str]:
    """:func:`run_job` returning ``(key, error, traceback)``: what executors ship to workers.

    A job that raises comes back as data (``error`` set), so an exception from the engine
    itself always means the worker was lost (killed, out of memory), never the job.
    """
    try:
        return run_job(kind, args, cache_dir), None, ""
    except Exception as exc:  # noqa: BLE001 - a failed job is reported, the others go on
        return job_key(kind, args), f"{type(exc).__name__}: {exc}", traceback.format_exc()


def pending(jobs: Iterable[Job], cache: JobCache) -> list[Job]:
    """The jobs not yet in the cache, each once, in order."""
    seen: set[str] = set()
    todo = []
    for job in jobs:
        key = job.key
        if key not in seen and not cache.has(key):
            seen.add(key)
            todo.append(job)
    return todo
