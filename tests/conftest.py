"""Fixtures shared by the whole suite.

No test may depend on the caller's environment or on what happens to be installed:
``FLAT_L2O_*`` variables are removed before every test, and tests that load plugins
through entry points fake ``importlib.metadata.entry_points`` with
:func:`fake_entry_points`, pointing at the fixture plugins in ``tests/plugins/``.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import pytest
from hypothesis import settings

# Property tests draw the same examples on every machine and every run: a new finding fails
# where it was searched for (HYPOTHESIS_PROFILE=explore), not at random in CI.
settings.register_profile("suite", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)  # HYPOTHESIS_PROFILE=explore searches anew
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

PLUGINS_DIR = Path(__file__).parent / "plugins"

# Fixture plugins are top-level modules, imported by the fake entry points' ``load()``.
if str(PLUGINS_DIR) not in sys.path:
    sys.path.insert(0, str(PLUGINS_DIR))

FIXTURE_PLUGIN_MODULES = tuple(sorted(p.stem for p in PLUGINS_DIR.glob("*.py")))
"""Module names of the fixture plugins (``good_plugin``, ``broken_plugin``, ...)."""

GROUP = "flat_l2o_plugin"


def _fake_distribution(name: str, version: str) -> SimpleNamespace:
    # The manager reads only ``dist.metadata["Name"]`` and ``dist.version``.
    return SimpleNamespace(metadata={"Name": name}, version=version)


def make_entry_point(name: str, value: str, dist: str | None = None,
                     version: str = "1.0.0") -> metadata.EntryPoint:
    """A real ``EntryPoint`` of our group, attached to a fake distribution if ``dist``."""
    ep = metadata.EntryPoint(name=name, value=value, group=GROUP)
    # EntryPoint refuses attribute assignment; ``_for`` is how importlib attaches a dist.
    return ep._for(_fake_distribution(dist, version)) if dist else ep


def builtin_entry_point() -> metadata.EntryPoint:
    """Our own plugin as the installed package declares it."""
    return make_entry_point("builtin", "flat_l2o_plugin.builtin", dist="flat-l2o-plugin", version="0.1.0")


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch):
    for name in [n for n in os.environ if n.startswith("FLAT_L2O_")]:
        monkeypatch.delenv(name)
    # Fixture plugins keep module-level records of their calls: each test imports them afresh.
    for module in FIXTURE_PLUGIN_MODULES:
        sys.modules.pop(module, None)
    yield
    for module in FIXTURE_PLUGIN_MODULES:
        sys.modules.pop(module, None)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Optimizees and batches here are tiny: on a two-core machine intra-op threads only
    # contend with each other and with the subprocesses some tests start.
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def entry_point() -> Callable[..., metadata.EntryPoint]:
    """``entry_point(name, value, dist=None, version="1.0.0")``: build one entry point."""
    return make_entry_point


@pytest.fixture
def fake_entry_points(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[metadata.EntryPoint]]:
    """``fake_entry_points(*eps, builtin=True)``: make these the only entry points of our group.

    ``builtin=True`` adds our own ``builtin`` entry point, as an installed package has it.
    Returns the full list the manager will see.
    """

    real_entry_points = metadata.entry_points

    def install(*eps: metadata.EntryPoint, builtin: bool = True) -> list[metadata.EntryPoint]:
        chosen = [*eps, *([builtin_entry_point()] if builtin else [])]

        def entry_points(**selection: str):
            # Other libraries (torch, triton) discover their own groups during a test:
            # only our group is faked.
            if selection.get("group") != GROUP:
                return real_entry_points(**selection)
            return metadata.EntryPoints(
                ep for ep in chosen if all(getattr(ep, key) == value for key, value in selection.items()))

        monkeypatch.setattr(metadata, "entry_points", entry_points)
        return chosen

    return install


def float64_rounding(hessian: "torch.Tensor") -> float:
    """How far float64 rounding alone can move an eigenvalue of ``hessian`` as we compute it.

    A Hessian-vector product and the matrix ``hessian`` (both by autograd, in different
    orders) each accumulate at most d·ε·‖H‖_F per product of length d, and ``eigvalsh``
    is backward stable to about that: 2·d·ε·‖H‖_F bounds the disagreement of an exact
    eigenvalue with one from HVPs by rounding alone (observed: about 1% of it).
    """
    import torch

    d = hessian.shape[0]
    return 2 * d * torch.finfo(hessian.dtype).eps * float(torch.linalg.matrix_norm(hessian))


@pytest.fixture
def rounding() -> Callable[["torch.Tensor"], float]:
    """``rounding(hessian)``: see :func:`float64_rounding`."""
    return float64_rounding
