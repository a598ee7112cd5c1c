"""A plugin shipping one pre-trained learned optimizer, ``example-tiny``.

Its weights (``tiny.safetensors``) and their SHA-256 (``manifest.json``) are written
by the test that builds this distribution, before it is installed; the plugin reads
the digest as data it ships, like any published plugin would hard-code it.
"""

import json
from importlib import resources

from flat_l2o_plugin import PretrainedInfo, hookimpl

_MANIFEST = json.loads(resources.files(__name__).joinpath("manifest.json").read_text())


@hookimpl
def register_pretrained(register):
    register(PretrainedInfo(
        name="example-tiny", optimizer="learned_correction", options={"base": "adam", "lr": 0.05},
        package=__name__, weights="tiny.safetensors", sha256=_MANIFEST["sha256"], version="0.1",
        license="Apache-2.0", card="card.json", description="A tiny example: Adam plus a learned correction.",
    ))
