"""Data-parallel meta-training: 2 gloo ranks compute exactly the single-process meta-batch."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed_worker import record_weights
from meta_training_specs import SMALL_SPEC

from flat_l2o_plugin import create_optimizer, create_task
from flat_l2o_plugin.errors import ConfigError
from flat_l2o_plugin.training import DistributedContext, MetaTrainConfig, MetaTrainer, read_metrics, run_meta_training

HERE = Path(__file__).resolve().parent


def test_a_single_process_context_is_the_identity():
    context = DistributedContext()
    assert context.is_main and context.owned(3) == [0, 1, 2]
    assert DistributedContext(rank=1, world_size=2).owned(5) == [1, 3]
    tensor = torch.arange(3.0)
    assert context.all_reduce_sum(tensor) is tensor and context.all_gather("x") == ["x"]
    assert context.broadcast({"a": 1}) == {"a": 1} and context.gather(2) == [2]


def test_every_rank_needs_a_trajectory():
    task = create_task("mlp_digits", batch_size=16)
    with pytest.raises(ConfigError, match=r"meta_batch \(2\) must be at least the number of processes \(4\)"):
        MetaTrainer(create_optimizer("rnnprop"), lambda g: (task, 1), config=MetaTrainConfig(meta_batch=2),
                    distributed=DistributedContext(rank=0, world_size=4))


@pytest.mark.integration
def test_two_gloo_ranks_stay_identical_and_match_one_process_with_the_same_meta_batch(tmp_path, monkeypatch):
    spec = copy.deepcopy(SMALL_SPEC)
    spec["trainer"].update(meta_steps=5, meta_batch=4, checkpoint_every=1, val_every=2)
    spec["val_tasks"] = 3
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    (tmp_path / "weights").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAT_L2O_")}
    env["OMP_NUM_THREADS"] = "1"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              str(HERE / "distributed_worker.py"), str(spec_file), str(tmp_path / "ranks"), str(tmp_path / "weights")]
    ranks = subprocess.Popen(launch, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    # Meanwhile, the same total meta-batch in this process.
    (tmp_path / "single_weights").mkdir()
    record_weights(tmp_path / "single_weights", setattr=monkeypatch.setattr)
    run_meta_training(spec, tmp_path / "single")

    _, stderr = ranks.communicate(timeout=300)
    assert ranks.returncode == 0, stderr
    rank0, rank1 = (load_file(tmp_path / "weights" / f"rank{r}.safetensors") for r in (0, 1))
    single = load_file(tmp_path / "single_weights" / "rank0.safetensors")
    assert sorted(rank0) == sorted(rank1) == sorted(single) == [f"step{s}" for s in range(5)]
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), f"the replicas parted at {key}"
        # The meta-gradient is summed in another order (per rank, then all-reduced): a few
        # float32 ulps of φ (|φ| < 1, ulp ≤ 1.2e-7) per meta-step. Seen: one ulp.
        assert torch.allclose(rank0[key], single[key], rtol=0, atol=1e-6), key
        assert not torch.equal(single[key], single["step0"]) or key == "step0"  # φ did move
    # Rank 0 alone wrote the run, and logged what the single process logged.
    distributed, alone = read_metrics(tmp_path / "ranks"), read_metrics(tmp_path / "single")
    assert [r["meta_step"] for r in distributed] == list(range(5))
    for ours, theirs in zip(distributed, alone):
        assert set(ours) == set(theirs)
        for key, value in theirs.items():
            if key != "seconds" and isinstance(value, float):
                assert math.isclose(ours[key], value, rel_tol=1e-5, abs_tol=1e-7), key
            elif key != "seconds":
                assert ours[key] == value, key
