"""A plugin whose runtime hooks raise."""

from __future__ import annotations

from flat_l2o_plugin import hookimpl


class RaisingPluginFailure(RuntimeError):
    pass


@hookimpl
def flatness_terms(params, step):
    raise RaisingPluginFailure(f"flatness_terms failed at step {step}")


@hookimpl
def after_unroll(step):
    raise RaisingPluginFailure(f"after_unroll failed at step {step}")
