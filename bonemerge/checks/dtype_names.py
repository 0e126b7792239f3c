"""The dtype names bonemerge accepts, in one place for the command line and the Python API:
`auto`, the short names people type (`bf16`, `fp16`, `fp32`), torch's names (`bfloat16`,
`float16`, `float32`), those with their `torch.` prefix, and torch dtype objects themselves.
No torch import: the CLI checks options before torch loads."""

from __future__ import annotations

from bonemerge.errors import BonemergeError, shown

_ALIASES = {
    "bf16": "BF16",
    "bfloat16": "BF16",
    "fp16": "F16",
    "float16": "F16",
    "half": "F16",
    "fp32": "F32",
    "float32": "F32",
    "float": "F32",
}

HELP = "auto, bf16, fp16 or fp32 (or bfloat16, float16, float32, torch.bfloat16 …)"


def parse_dtype(value: object) -> str | None:
    """The safetensors dtype a user's name means (`bf16` -> `BF16`), or None for `auto`/None:
    keep each tensor's own dtype."""
    if value is None:
        return None
    text = str(value).strip().lower().removeprefix("torch.")
    if text == "auto":
        return None
    if text not in _ALIASES:
        raise BonemergeError(f"unknown dtype {shown(value)}; choose {HELP}.")
    return _ALIASES[text]
