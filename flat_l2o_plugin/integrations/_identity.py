"""Which learned optimizer a saved optimizer state belongs to.

Recurrent state only means something to the network that wrote it, so
:class:`~flat_l2o_plugin.integrations.torch_optim.LearnedOptimizerTorch` records an
identity in its ``state_dict`` and compares it on load. Plain strings and numbers only,
so the state_dict still loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any, Mapping

import torch
from torch import Tensor, nn

__all__ = ["describe_identity", "identity_differences", "learned_identity", "weights_digest"]

# Compared whenever present; name and options are unknown (None) for a module built
# outside the registry, and are compared only when both sides know them.
_ALWAYS = ("class", "weights_sha256")
_WHEN_KNOWN = ("optimizer", "options", "pretrained")


def weights_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 of a state_dict: every name, dtype, shape and byte, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}\0{data.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def learned_identity(module: nn.Module, *, name: str | None, options: Mapping[str, Any] | None,
                     weights_file: str | None, pretrained: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The identity of a learned optimizer: registered name, class, options, weights digest, file.

    ``pretrained`` is ``{"name", "version"}`` of a pre-trained optimizer, ``None`` otherwise.
    """
    return {
        "pretrained": None if pretrained is None else dict(pretrained),
        "optimizer": name,
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "options": None if options is None else copy.deepcopy(dict(options)),
        "weights_sha256": weights_digest(module.state_dict()),
        "weights_file": weights_file,  # where it came from, for messages; never compared
    }


def identity_differences(saved: Mapping[str, Any], mine: Mapping[str, Any]) -> list[str]:
    """The fields in which two identities disagree (empty: the same learned optimizer)."""
    differs = [field for field in _ALWAYS if saved.get(field) != mine.get(field)]
    return differs + [field for field in _WHEN_KNOWN
                      if None not in (saved.get(field), mine.get(field)) and saved.get(field) != mine.get(field)]


def describe_identity(identity: Mapping[str, Any]) -> str:
    """``'rnnprop', weights sha256 3b4d530be95b from runs/rnnprop.safetensors``."""
    name = identity.get("optimizer") or str(identity.get("class", "?")).rsplit(".", 1)[-1]
    pretrained = identity.get("pretrained")
    if isinstance(pretrained, Mapping):
        name = f"{pretrained.get('name')} version {pretrained.get('version')}"
    text = f"{name!r}, weights sha256 {str(identity.get('weights_sha256'))[:12]}"
    return text + (f" from {identity['weights_file']}" if identity.get("weights_file") else "")
