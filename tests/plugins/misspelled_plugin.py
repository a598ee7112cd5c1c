"""A plugin whose hook names are misspelled, so pluggy would never call them."""

from __future__ import annotations

from flat_l2o_plugin import hookimpl


@hookimpl
def register_regularisers(register) -> None:
    raise AssertionError("a hook without a spec must never be called")


@hookimpl
def flatness_term(params, loss_fn):
    raise AssertionError("a hook without a spec must never be called")
