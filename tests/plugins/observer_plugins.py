"""Several observer plugins in one module (``observer_plugins:alpha`` etc.), for load order."""

from __future__ import annotations

from flat_l2o_plugin import hookimpl

CALLS: list[str] = []


class Observer:
    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    def after_unroll(self, step) -> None:
        CALLS.append(self.name)


alpha = Observer("alpha")
middle = Observer("middle")
zeta = Observer("zeta")
