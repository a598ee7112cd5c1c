"""One rank of ``run_meta_training`` under torchrun, recording its weights after every meta-step.

Usage (by test_distributed.py): ``torchrun ... distributed_worker.py SPEC.json RUN_DIR WEIGHTS_DIR``.
Each rank writes ``WEIGHTS_DIR/rank<r>.safetensors`` with one flat tensor per meta-step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from flat_l2o_plugin.training import meta_trainer, run_meta_training


def record_weights(out: Path, setattr: Callable[[Any, str, Any], None] = setattr) -> dict[str, torch.Tensor]:
    """Wrap ``MetaTrainer.step`` so that the weights after each step are kept, and saved by ``train``.

    ``setattr`` patches the class (a test passes ``monkeypatch.setattr`` to undo it afterwards).
    """
    seen: dict[str, torch.Tensor] = {}
    step, train = meta_trainer.MetaTrainer.step, meta_trainer.MetaTrainer.train

    def recording_step(self, meta_step):
        logs = step(self, meta_step)
        seen[f"step{meta_step}"] = torch.cat([p.detach().reshape(-1).clone() for p in self.optimizer.parameters()])
        return logs

    def saving_train(self, **kwargs):
        result = train(self, **kwargs)
        save_file(seen, out / f"rank{self.distributed.rank}.safetensors")
        return result

    setattr(meta_trainer.MetaTrainer, "step", recording_step)
    setattr(meta_trainer.MetaTrainer, "train", saving_train)
    return seen


if __name__ == "__main__":
    spec_file, run_dir, weights_dir = sys.argv[1:4]
    record_weights(Path(weights_dir))
    run_meta_training(json.loads(Path(spec_file).read_text()), run_dir)
