"""The storage codecs bonemerge knows: how a weight sits on disk (see `base.py`).

The planner asks this registry which weights of a checkpoint a codec stores and never names
a format itself; formats no codec decodes are refused by name (`refused.py`). Adding a codec
is a module beside these and one entry in `REGISTRY`.
"""

from __future__ import annotations

from bonemerge.checkpoint import Checkpoint
from bonemerge.codecs.base import ROUNDINGS, Bands, Codec, Derived, Encoded, Rounding, Stored
from bonemerge.codecs.dense import DENSE
from bonemerge.codecs.fp8_block import FP8_BLOCK
from bonemerge.codecs.refused import refuse_unsupported

REGISTRY: tuple[Codec, ...] = (DENSE, FP8_BLOCK)


def find_stored(checkpoint: Checkpoint) -> dict[str, Stored]:
    """Every weight of `checkpoint` that is not plain dense, by name, with its companions;
    refuses a format that no codec decodes."""
    config = checkpoint.config() or {}
    refuse_unsupported(checkpoint, config)
    found: dict[str, Stored] = {}
    for codec in REGISTRY:
        found |= codec.find(checkpoint, config)
    return found


__all__ = [
    "DENSE",
    "REGISTRY",
    "ROUNDINGS",
    "Bands",
    "Codec",
    "Derived",
    "Encoded",
    "Rounding",
    "Stored",
    "find_stored",
]
