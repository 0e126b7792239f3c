"""Compiled loops for block-scaled e4m3 codes: decode, encode and the fused merge of one tile.

Merging into FP8 is a dozen element-wise steps per value (decode, add the update, divide by
the scale, find overflowing blocks, clamp, round, decode again to measure what survived). As
torch calls each step is a pass over memory and a few microseconds of dispatch, about 6 ns per
value on one core, several times what copying the bytes costs. Compiled with numba, the
steps run per value in registers, a block at a time, at a fraction of that.

Every result is bit-identical to the torch route it replaces: a value is code × scale rounded
once to fp32, the update is added in fp32 (`add_(product, alpha=)` with an exact `alpha`), the
quotient is fp32 division, and rounding ports torch's own fp32 → `float8_e4m3fn` conversion
(`c10/util/Float8_e4m3fn.h`: round to nearest even, subnormals through one fp32 addition).
Only the update's survival sums differ, accumulated in fp64 instead of fp32 BLAS dots.
"""

from __future__ import annotations

import numpy as np
from numba import njit

MAX = np.float32(448.0)
# 448 plus half its code step: beyond it, rounding to nearest would need a code e4m3 lacks
OVERFLOW = np.float32(464.0)
# fp32 bits: below 2^-6 an e4m3 value is subnormal; 2^14 has an ulp of 2^-9, e4m3's finest step
_SMALLEST_NORMAL_BITS = 121 << 23
_SUBNORMAL_BIAS = np.float32(16384.0)
_SUBNORMAL_BIAS_BITS = 141 << 23
_NAN_FROM = 1087 << 20  # fp32 bits from which the rounded magnitude would not fit 0x7E
_REBIAS = (7 - 127) << 23
# what the fused merge returns in its status word
NON_FINITE = 1

_CACHE = {"nogil": True, "cache": True}


@njit(**_CACHE)
def encode_value(value: np.float32) -> np.uint8:
    """The e4m3 code nearest to `value` (ties to even), NaN (0x7F) beyond the format."""
    value = np.float32(value)
    bits = np.int64(value.view(np.uint32))
    sign = (bits >> 24) & 0x80
    magnitude = bits & 0x7FFFFFFF
    if magnitude >= _NAN_FROM:
        code = 0x7F
    elif magnitude < _SMALLEST_NORMAL_BITS:
        shifted = np.float32(np.float32(abs(value)) + np.float32(_SUBNORMAL_BIAS))
        code = np.int64(shifted.view(np.uint32)) - _SUBNORMAL_BIAS_BITS
    else:
        odd = (magnitude >> 20) & 1
        code = ((magnitude + _REBIAS + 0x7FFFF + odd) >> 20) & 0xFF
    return np.uint8(code | sign)


@njit(**_CACHE)
def decode(codes, table, scale, row0, col0, block_rows, block_cols, out):
    """out = table[code] × scale of its block, for codes from row `row0`, column `col0`."""
    rows, cols = codes.shape
    for i in range(rows):
        bi = (row0 + i) // block_rows
        for j in range(cols):
            out[i, j] = table[codes[i, j]] * scale[bi, (col0 + j) // block_cols]


@njit(**_CACHE)
def _encode_block(values, before, count_rows, count_cols, stored, amax, table, codes, i0, j0):
    """Encode one block's values (`values[:count_rows, :count_cols]`) on `stored`, or on a new
    scale float32(amax / 448) when the stored one would overflow; returns the scale used and
    ⟨deq(W′) − deq(W), ΔW⟩, ‖ΔW‖² (with `before`, deq(W), else zeros)."""
    top = np.float32(MAX)
    scale = stored
    if amax / stored > OVERFLOW:
        scale = np.float32(np.float64(amax) / 448.0)
    kept = 0.0
    update = 0.0
    measure = before.shape[0] > 0
    for i in range(count_rows):
        for j in range(count_cols):
            v = values[i, j]
            q = v / scale
            if q > top:
                q = top
            elif q < -top:
                q = -top
            code = encode_value(q)
            codes[i0 + i, j0 + j] = code
            if measure:
                b = before[i, j]
                moved = table[code] * scale - b
                wanted = v - b
                kept += np.float64(moved) * np.float64(wanted)
                update += np.float64(wanted) * np.float64(wanted)
    return scale, kept, update


@njit(**_CACHE)
def merge(codes, product, alpha, stored, scale, row0, col0, block_rows, block_cols, table, out, rescaled):
    """The fused merge of one tile of whole blocks: values = code × stored scale + product ×
    alpha, encoded on the stored scales (a new scale, written to `scale` and listed in
    `rescaled`, where a block overflows). Returns (status, kept, update, blocks rescaled)."""
    rows, cols = codes.shape
    values = np.empty((block_rows, block_cols), dtype=np.float32)
    before = np.empty((block_rows, block_cols), dtype=np.float32)
    factor = np.float32(alpha)
    status = 0
    kept = 0.0
    update = 0.0
    count = 0
    for i0 in range(0, rows, block_rows):
        n0 = min(block_rows, rows - i0)
        bi = (row0 + i0) // block_rows
        for j0 in range(0, cols, block_cols):
            n1 = min(block_cols, cols - j0)
            bj = (col0 + j0) // block_cols
            s = stored[bi, bj]
            amax = np.float32(0.0)
            for i in range(n0):
                for j in range(n1):
                    b = table[codes[i0 + i, j0 + j]] * s
                    v = b + product[i0 + i, j0 + j] * factor
                    before[i, j] = b
                    values[i, j] = v
                    m = abs(v)
                    if m > amax:
                        amax = m
                    elif not m <= amax:
                        status |= NON_FINITE  # NaN
            if not amax < np.inf:
                status |= NON_FINITE
            used, k, u = _encode_block(values, before, n0, n1, s, amax, table, out, i0, j0)
            if used != s:
                scale[bi, bj] = used
                rescaled[count, 0] = bi
                rescaled[count, 1] = bj
                count += 1
            kept += k
            update += u
    return status, kept, update, count


@njit(**_CACHE)
def encode(values, before, stored, scale, row0, col0, block_rows, block_cols, table, out, rescaled):
    """`merge` for values already merged (`before`, deq(W), may be empty: not measured)."""
    rows, cols = values.shape
    measure = before.shape[0] > 0
    block_values = np.empty((block_rows, block_cols), dtype=np.float32)
    block_before = np.empty((block_rows if measure else 0, block_cols), dtype=np.float32)
    kept = 0.0
    update = 0.0
    count = 0
    for i0 in range(0, rows, block_rows):
        n0 = min(block_rows, rows - i0)
        bi = (row0 + i0) // block_rows
        for j0 in range(0, cols, block_cols):
            n1 = min(block_cols, cols - j0)
            bj = (col0 + j0) // block_cols
            s = stored[bi, bj]
            amax = np.float32(0.0)
            for i in range(n0):
                for j in range(n1):
                    v = values[i0 + i, j0 + j]
                    block_values[i, j] = v
                    if measure:
                        block_before[i, j] = before[i0 + i, j0 + j]
                    m = abs(v)
                    if m > amax:
                        amax = m
            used, k, u = _encode_block(block_values, block_before, n0, n1, s, amax, table, out, i0, j0)
            if used != s:
                scale[bi, bj] = used
                rescaled[count, 0] = bi
                rescaled[count, 1] = bj
                count += 1
            kept += k
            update += u
    return kept, update, count
