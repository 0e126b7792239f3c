"""The storage codecs bonemerge knows: how a weight sits on disk (see `base.py`).

The planner asks this registry which weights of a checkpoint a codec stores and never names
a format itself; formats no codec decodes are refused by name (`refused.py`). Adding a codec
is a module beside these and one entry in `REGISTRY`.
"""

from __future__ import annotations

import math

from bonemerge.checkpoint import Checkpoint
from bonemerge.codecs.base import ROUNDINGS, Bands, Codec, Derived, Encoded, Rounding, Stored
from bonemerge.codecs.bnb4 import BNB_4BIT
from bonemerge.codecs.compressed_fp8 import COMPRESSED_FP8
from bonemerge.codecs.dense import DENSE
from bonemerge.codecs.fp8_block import FP8_BLOCK
from bonemerge.codecs.mxfp4 import MXFP4
from bonemerge.codecs.refused import refuse_unsupported

REGISTRY: tuple[Codec, ...] = (DENSE, FP8_BLOCK, COMPRESSED_FP8, MXFP4, BNB_4BIT)


def find_stored(checkpoint: Checkpoint) -> dict[str, Stored]:
    """Every weight of `checkpoint` that is not plain dense, by name, with its companions;
    refuses a format that no codec decodes."""
    config = checkpoint.config() or {}
    refuse_unsupported(checkpoint, config)
    found: dict[str, Stored] = {}
    for codec in REGISTRY:
        found |= codec.find(checkpoint, config)
    return found


def describe_storage(checkpoint: Checkpoint) -> dict | None:
    """For `inspect`: how the checkpoint's weights are stored when some are not dense (the
    formats, how many weights each, which ones, the size dequantized to bf16), or why its
    format is refused; None for a dense checkpoint."""
    from collections import Counter

    from bonemerge.errors import BonemergeError

    try:
        found = find_stored(checkpoint)
    except BonemergeError as exc:
        return {"refused": str(exc)}
    if not found:
        return None
    stored = sum(s.weight.nbytes + sum(c.nbytes for c in s.companions.values()) for s in found.values())
    elements = sum(math.prod(s.values_shape) for s in found.values())
    total = sum(t.nbytes for t in checkpoint.tensors.values())
    return {
        "formats": dict(Counter(s.codec.describe(s) for s in found.values())),
        "quantized_tensors": sorted(found),
        "companion_tensors": sum(len(s.companions) for s in found.values()),
        "dequantized_bf16_bytes": total - stored + 2 * elements,
    }


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
    "describe_storage",
    "find_stored",
]
