"""A process in which no optional package is installed, for the core-only tests.

``test_extras.py`` runs the checkout this way and ``test_packaging.py`` the installed
wheel: ``sitecustomize`` installs a finder that refuses every optional package, as a
real install without extras would.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

# Every optional package the package imports, and the extra that installs it.
OPTIONAL = {"timm": "timm", "torchvision": "timm", "sklearn": "data", "scipy": "data", "mnist1d": "data",
            "matplotlib": "plot", "learn2learn": "learn2learn"}

BLOCKER = textwrap.dedent(f"""
    import sys
    from importlib.abc import MetaPathFinder

    BLOCKED = {sorted(OPTIONAL)!r}

    class _NotInstalled(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, _NotInstalled())
""")

# Run by a python in that process (``python -c CORE_CHECK``); prints what the tests check.
CORE_CHECK = textwrap.dedent("""
    import importlib, pkgutil, sys
    import flat_l2o_plugin
    from flat_l2o_plugin.errors import MissingExtraError

    # Every module of the package imports without an extra, except the timm integration.
    for info in pkgutil.walk_packages(flat_l2o_plugin.__path__, "flat_l2o_plugin."):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except MissingExtraError as exc:
            assert info.name.startswith("flat_l2o_plugin.integrations.timm"), (info.name, exc)
            print(exc)
    from flat_l2o_plugin import FlatL2O, create_optimizer
    from flat_l2o_plugin.integrations import LearnedOptimizerTorch

    # The command line, in this process: listing needs no extra, a plot names its extra.
    import contextlib, io
    from flat_l2o_plugin.cli import main
    for argv in (["plugins"], ["list", "regularizers"], ["list", "tasks"]):
        assert main(argv) == 0, argv
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        print("plot exit", main(["plot", "."]), repr(err.getvalue()))
    print("core ok", flat_l2o_plugin.__file__)
""")


def core_only_env(folder: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables for a process in which no optional package is installed."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(folder), *filter(None, [env.get("PYTHONPATH")])])
    return env
