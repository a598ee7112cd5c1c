"""Learned optimizers in timm's ``train.py``, with no edit to the script.

timm has no entry point through which a package adds optimizers, so a name has to be
registered in the process that trains. Importing this module does that: it calls
:func:`~flat_l2o_plugin.integrations.timm.register_installed_with_timm`, so every
installed learned optimizer is selectable as ``l2o-<name>`` (``l2o-rnnprop``,
``l2o-dm``, ``l2o-scale``, ...; :func:`~flat_l2o_plugin.integrations.timm.timm_name`)
and is built from the weights file given as ``--opt-kwargs weights=FILE``.

Two ways to get it imported, both leaving ``train.py`` as it is:

- ``train.py``'s own import option, ``--device-modules`` (it imports each module it
  names before building anything)::

      python train.py DATA --model resnet18 --device-modules flat_l2o_plugin.integrations.timm_train \\
          --opt l2o-rnnprop --opt-kwargs weights=rnnprop.safetensors --lr 0.1

- this module as a launcher, which registers and then runs the script as ``__main__``
  with the remaining arguments (for scripts without such an option, and under
  ``torchrun -m``)::

      python -m flat_l2o_plugin.integrations.timm_train train.py DATA --model resnet18 \\
          --opt l2o-rnnprop --opt-kwargs weights=rnnprop.safetensors --lr 0.1

Always pass ``--lr``: without it ``train.py`` derives a learning rate from the batch
size (0.1 × batch/256), far too small a multiplier for a learned step (see
:data:`~flat_l2o_plugin.integrations.torch_optim.LR_RULE`). ``--opt
lookahead_l2o-rnnprop`` adds timm's Lookahead; ``--resume`` restores the learned
optimizer's state and refuses a checkpoint written with other weights.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Sequence

from .timm import register_installed_with_timm

__all__ = ["main"]

register_installed_with_timm()

_USAGE = "usage: python -m flat_l2o_plugin.integrations.timm_train SCRIPT [SCRIPT ARGUMENTS ...]"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``argv[0]`` (a script such as timm's ``train.py``) as ``__main__`` with ``argv[1:]``.

    The learned optimizers are registered by the time it runs (importing this module
    did it). The script sees the ``sys.argv`` and ``sys.path[0]`` it would see when run
    directly, and its ``sys.exit`` ends the process as it would. Returns 0 when the
    script ends without calling it, 2 for a missing script.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE, file=sys.stderr if not args else sys.stdout)
        return 2 if not args else 0
    script = Path(args[0])
    if not script.is_file():
        print(f"{_USAGE}\ntimm_train: error: script {str(script)!r} is not a file", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args[1:]]
    sys.path[0] = str(script.resolve().parent)
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
