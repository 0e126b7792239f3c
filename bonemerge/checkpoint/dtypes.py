"""safetensors dtype names, their sizes, and the few that bonemerge can compute with.

Sizes are in bits because safetensors has sub-byte types (F4, F6_*): a tensor's byte size is
`numel * bits / 8` and must come out whole. Torch is imported only when a conversion is
actually needed, so that header work stays cheap.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

# Floating dtypes bonemerge can read into fp32/fp64, compute on and round back to.
COMPUTABLE = ("F16", "BF16", "F32", "F64")

# safetensors name -> torch attribute, for every dtype torch can hold in memory.
TORCH_NAME = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}
BY_TORCH_NAME = {v: k for k, v in TORCH_NAME.items()}

# How each dtype spells NaN and Inf in its bits, as (element width in bytes, mask, value): an
# element is not finite when `bits & mask == value`. C64 is checked as its two F32 halves.
# Integer, boolean, F4 and F6 types hold neither.
_NOT_FINITE = {
    "F64": (8, 0x7FF0_0000_0000_0000, 0x7FF0_0000_0000_0000),
    "F32": (4, 0x7F80_0000, 0x7F80_0000),
    "C64": (4, 0x7F80_0000, 0x7F80_0000),
    "F16": (2, 0x7C00, 0x7C00),
    "BF16": (2, 0x7F80, 0x7F80),
    "F8_E5M2": (1, 0x7C, 0x7C),
    "F8_E4M3": (1, 0x7F, 0x7F),
    "F8_E4M3FNUZ": (1, 0xFF, 0x80),
    "F8_E5M2FNUZ": (1, 0xFF, 0x80),
    "F8_E8M0": (1, 0xFF, 0xFF),
}


def nbytes(dtype: str, numel: int) -> int | None:
    """Byte size of `numel` elements, or None when sub-byte elements do not fill whole bytes."""
    total_bits = numel * BITS[dtype]
    if total_bits % 8:
        return None
    return total_bits // 8


def all_finite_bytes(raw: memoryview, dtype: str) -> bool:
    """True when no element of `raw`, little-endian bytes of `dtype`, is NaN or Inf. It reads
    the bits with numpy rather than the values with torch, so that adapters are checked while
    torch is still loading."""
    rule = _NOT_FINITE.get(dtype)
    if rule is None or not len(raw):
        return True
    import numpy as np

    width, mask, value = rule
    bits = np.frombuffer(raw, dtype=f"<u{width}")
    return not bool(np.any((bits & bits.dtype.type(mask)) == value))


def float_values(raw: bytes | bytearray | memoryview, dtype: str):
    """Little-endian bytes of a COMPUTABLE `dtype` as a flat numpy array (float32, float64 for
    F64), without torch, which may still be loading; None for any other dtype."""
    import numpy as np

    if dtype == "BF16":
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    kind = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}.get(dtype)
    if kind is None:
        return None
    values = np.frombuffer(raw, dtype=kind)
    return values if dtype == "F64" else values.astype(np.float32)


def to_torch(dtype: str) -> torch.dtype:
    import torch

    return getattr(torch, TORCH_NAME[dtype])


def from_torch(dtype: torch.dtype) -> str:
    """safetensors name of a torch dtype; KeyError for dtypes safetensors cannot store."""
    return BY_TORCH_NAME[str(dtype).removeprefix("torch.")]


def rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """A tensor seen as rows: its first dimension, and everything else flattened; from three
    dimensions on, every dimension but the last (a fused [E, d1, d2] MoE tensor is E·d1 rows
    of d2), so that a chunk is a band of rows of one expert, never whole experts."""
    if len(shape) >= 3:
        return math.prod(shape[:-1]), shape[-1]
    rows = shape[0] if shape else 1
    return rows, (math.prod(shape) // rows if rows else 0)
