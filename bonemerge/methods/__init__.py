"""The adapter methods bonemerge knows, found by PEFT's `peft_type`.

Every method-specific decision lives in one `Method` object (see `base.py`); the rest of
bonemerge asks this registry for the method of a config or a tensor key and never names a
method itself. Adding a method is a module beside these and one entry in `REGISTRY`.
"""

from __future__ import annotations

import re

from bonemerge.methods.base import (
    INPUT_EMBEDDINGS,
    OUTPUT_EMBEDDINGS,
    PREFIX,
    About,
    AdapterConfig,
    Block,
    BlockOp,
    BlockSettings,
    Converted,
    ErrorBound,
    KeyClaim,
    LowRankUpdate,
    Method,
    RankRequest,
    Reduction,
    RowMaths,
    Target,
    shared_tensors,
)
from bonemerge.methods.bone import BONE
from bonemerge.methods.ia3 import IA3
from bonemerge.methods.lora import LORA
from bonemerge.methods.vera import VERA

REGISTRY: tuple[Method, ...] = (BONE, LORA, IA3, VERA)

# Tensor names of PEFT's tuners: a key like these that the adapter's own method does not
# claim belongs to another method (or to a training checkpoint), and is never taken for a
# full tensor that replaces a base weight.
PEFT_TENSOR = re.compile(
    r"(?:^|\.)(lora|ia3|oft|boft|vera|hra|bone|miss|fourierft|vblora|hada|lokr|randlora|c3a|"
    r"shira|road|delora|gralora|waveft|osf|adaption)_\w*(?:\.|$)|(?:^|\.)token_adapter\."
)


def method_for(peft_type: object) -> Method | None:
    """The method that reads adapters of `peft_type`, or None."""
    for method in REGISTRY:
        if peft_type in method.peft_types:
            return method
    return None


def kind_name(peft_type: str) -> str:
    """How messages name adapters of `peft_type` (`Bone`, `MiSS`, `LoRA`)."""
    method = method_for(peft_type)
    return method.kind_names[peft_type] if method else peft_type


def _listed(names: list[str]) -> str:
    """`A, B and C`."""
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]


def supported() -> str:
    """`Bone/MiSS, LoRA, IA³ and VeRA`: the methods, as messages name them."""
    return _listed([method.name for method in REGISTRY])


def method_names() -> str:
    """`Bone, Bat, MiSS, LoRA, rsLoRA, DoRA, ...`: every variant users know, for the help texts,
    so that they name every method the registry holds and nothing else."""
    return _listed([variant for method in REGISTRY for variant in method.variants or (method.name,)])


def claim_training(name: str) -> tuple[Method, KeyClaim] | None:
    """The method and part of a full PeftModel state-dict key, if any method knows it."""
    for method in REGISTRY:
        claim = method.claim_training(name)
        if claim is not None:
            return method, claim
    return None


def conversion_help() -> str:
    """What `strip --to` can do, from each method that converts, for the help text."""
    return "; ".join(method.conversion_help for method in REGISTRY if method.conversion_help)


def conversion_names() -> tuple[str, ...]:
    """Every `strip --to` name some method offers."""
    return tuple(dict.fromkeys(name for method in REGISTRY for name in method.conversion_names()))


__all__ = [
    "INPUT_EMBEDDINGS",
    "OUTPUT_EMBEDDINGS",
    "PEFT_TENSOR",
    "PREFIX",
    "REGISTRY",
    "About",
    "AdapterConfig",
    "Block",
    "BlockOp",
    "BlockSettings",
    "Converted",
    "ErrorBound",
    "KeyClaim",
    "LowRankUpdate",
    "Method",
    "RankRequest",
    "Reduction",
    "RowMaths",
    "Target",
    "claim_training",
    "conversion_help",
    "conversion_names",
    "kind_name",
    "method_for",
    "method_names",
    "shared_tensors",
    "supported",
]
