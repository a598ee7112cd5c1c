"""Run specs shared by the meta-training tests (a plain module, importable by any test file)."""

from __future__ import annotations

SMALL_SPEC = {
    "optimizer": {"name": "rnnprop", "options": {}},
    "task": {"name": "mlp_digits", "options": {"batch_size": 32}},
    "regularizers": {"hessian_top_eigenvalue": {"weight": 0.1, "iters": 3}},
    "trainer": {"meta_steps": 4, "unroll": 2, "horizon": 4, "meta_batch": 2, "val_every": 2, "val_steps": 4,
                "checkpoint_every": 2, "imitation_prob": 0.3, "seed": 3},
    "val_tasks": 1,
    "threads": 1,
}
"""A run of a few seconds that still exercises every piece of trainer state: two slots,
warm-started estimator probes, imitation teachers, validation with best weights."""
