"""Compiled loops for block-scaled e4m3 codes: decode, encode and the fused merge of one tile.

Merging into FP8 is a dozen element-wise steps per value (decode, add the update, divide by
the scale, find overflowing blocks, clamp, round, decode again to measure what survived). As
torch calls each step is a pass over memory and a few microseconds of dispatch, about 6 ns per
value on one core, several times what copying the bytes costs. Compiled with numba, the
steps run per value in registers, a block row at a time, in vector lanes.

Every code is bit-identical to the torch route it replaces: a value is code × scale rounded
once to fp32, the update is added in fp32 (`add_(product, alpha=)` with an exact `alpha`), the
quotient is fp32 division, and rounding ports torch's own fp32 → `float8_e4m3fn` conversion
(`c10/util/Float8_e4m3fn.h`: round to nearest even, subnormals through one fp32 addition),
branch-free so that it vectorizes. Only the update's survival sums differ from torch's fp32
dot products: they are fp64 sums, one per column, added at the end of each block.
"""

from __future__ import annotations

import numpy as np
from numba import njit

MAX = 448.0
# 448 plus half its code step: beyond it, rounding to nearest would need a code e4m3 lacks
OVERFLOW = 464.0
# fp32 bits: below 2^-6 an e4m3 value is subnormal; 2^14 has an ulp of 2^-9, e4m3's finest step
_SMALLEST_NORMAL_BITS = 121 << 23
_SUBNORMAL_BIAS = 16384.0
_SUBNORMAL_BIAS_BITS = 141 << 23
_NAN_FROM = 1087 << 20  # fp32 bits from which the rounded magnitude would not fit 0x7E
_REBIAS = (7 - 127) << 23
_UNBIAS = (127 - 7) << 23
_SUBNORMAL_STEP = 2.0**-9
_NAN_BITS = 0x7FF00000
_INFINITY_BITS = 0x7F800000
# what the fused merge returns in its status word
NON_FINITE = 1

# numpy's error model: a float division by zero gives inf as in torch, without a check per
# element that would keep the loops from vectorizing
_JIT = {"nogil": True, "cache": True, "error_model": "numpy"}


@njit(**_JIT)
def encode_value(value: np.float32) -> np.uint8:
    """The e4m3 code nearest to `value` (ties to even), NaN (0x7F) beyond the format."""
    value = np.float32(value)
    bits = np.int64(value.view(np.uint32))
    sign = (bits >> 24) & 0x80
    magnitude = bits & 0x7FFFFFFF
    shifted = np.float32(np.float32(abs(value)) + np.float32(_SUBNORMAL_BIAS))
    subnormal = np.int64(shifted.view(np.uint32)) - _SUBNORMAL_BIAS_BITS
    normal = ((magnitude + _REBIAS + 0x7FFFF + ((magnitude >> 20) & 1)) >> 20) & 0xFF
    code = subnormal if magnitude < _SMALLEST_NORMAL_BITS else normal
    code = 0x7F if magnitude >= _NAN_FROM else code
    return np.uint8(code | sign)


@njit(**_JIT)
def decode_value(code: np.uint8) -> np.float32:
    """The value of an e4m3 code, exactly, from its bits (a table look-up per vector lane
    costs more): a normal code's exponent and mantissa are a float32's, rebiased; a subnormal
    one is its mantissa × 2⁻⁹; 0x7F and 0xFF are NaN (with torch's bits)."""
    bits = np.int64(code)
    magnitude = bits & 0x7F
    subnormal = np.float32(np.float32(bits & 7) * np.float32(_SUBNORMAL_STEP))
    value = np.int64(subnormal.view(np.uint32)) if magnitude < 8 else (magnitude << 20) + _UNBIAS
    value = _NAN_BITS if magnitude == 0x7F else value
    return np.uint32(value | (bits & 0x80) << 24).view(np.float32)


@njit(**_JIT)
def decode(codes, scale, row0, col0, block_rows, block_cols, out):
    """out = code's value × scale of its block, for codes from row `row0`, column `col0`: the
    exact product (4 + 24 significant bits fit fp64), rounded once to fp32 or kept in fp64."""
    rows, cols = codes.shape
    for i in range(rows):
        bi = (row0 + i) // block_rows
        j0 = 0
        while j0 < cols:
            bj = (col0 + j0) // block_cols
            j1 = min(cols, (bj + 1) * block_cols - col0)
            s = scale[bi, bj]
            source = codes[i, j0:j1]
            row = out[i, j0:j1]
            for j in range(j1 - j0):
                row[j] = np.float64(decode_value(source[j])) * np.float64(s)
            j0 = j1


@njit(**_JIT)
def _magnitude_bits(value: np.float32) -> np.int64:
    """|value|'s fp32 bits: ordered as the magnitudes are, NaN and inf above every finite one,
    so that a block's largest needs only integer maxima (which vectorize; float ones do not,
    without letting NaN go unseen)."""
    return np.int64(np.float32(value).view(np.uint32)) & 0x7FFFFFFF


@njit(**_JIT)
def _block_scale(stored, largest):
    """The scale a block is encoded on: `stored`, or float32(amax / 448) where the stored one
    would round its largest value beyond the format."""
    amax = np.uint32(largest).view(np.float32)
    if amax / stored > np.float32(OVERFLOW):
        return np.float32(np.float64(amax) / MAX)
    return stored


@njit(**_JIT)
def _encode_block(values, vi, vj, n0, n1, scale, codes, ci, cj):
    """The codes of `values[vi:vi + n0, vj:vj + n1]` on `scale`, into `codes` from (ci, cj)."""
    top = np.float32(MAX)
    for i in range(n0):
        source = values[vi + i, vj : vj + n1]
        row = codes[ci + i, cj : cj + n1]
        for j in range(n1):
            row[j] = encode_value(min(max(source[j] / scale, -top), top))


@njit(fastmath={"reassoc"}, **_JIT)
def _survival(values, before, vi, vj, n0, n1, codes, ci, cj, scale):
    """⟨deq(W′) − deq(W), ΔW⟩ and ‖ΔW‖² over one block, in fp64. Only these sums may be
    reassociated (summed in vector lanes): no code depends on them."""
    kept = 0.0
    update = 0.0
    for i in range(n0):
        merged = values[vi + i, vj : vj + n1]
        was = before[vi + i, vj : vj + n1]
        row = codes[ci + i, cj : cj + n1]
        for j in range(n1):
            moved = np.float64(decode_value(row[j]) * scale - was[j])
            wanted = np.float64(merged[j] - was[j])
            kept += moved * wanted
            update += wanted * wanted
    return kept, update


@njit(**_JIT)
def merge(codes, product, alpha, stored, scale, row0, col0, block_rows, block_cols, out, rescaled):
    """The fused merge of one tile of whole blocks (from row `row0` and column `col0`, block
    boundaries): values = code × stored scale + product × alpha, encoded into `out` on the
    stored scales, or on a new one (written to `scale`, listed in `rescaled`) where a block
    overflows. Returns (status, kept, update, blocks rescaled)."""
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
            largest = 0
            for i in range(n0):
                source = codes[i0 + i, j0 : j0 + n1]
                added = product[i0 + i, j0 : j0 + n1]
                for j in range(n1):
                    b = decode_value(source[j]) * s
                    v = np.float32(b + added[j] * factor)
                    before[i, j] = b
                    values[i, j] = v
                    largest = max(largest, _magnitude_bits(v))
            if largest >= _INFINITY_BITS:
                status |= NON_FINITE
            used = _block_scale(s, largest)
            _encode_block(values, 0, 0, n0, n1, used, out, i0, j0)
            k, u = _survival(values, before, 0, 0, n0, n1, out, i0, j0, used)
            kept += k
            update += u
            if used != s:
                scale[bi, bj] = used
                rescaled[count, 0] = bi
                rescaled[count, 1] = bj
                count += 1
    return status, kept, update, count


@njit(**_JIT)
def encode(values, before, stored, scale, row0, col0, block_rows, block_cols, out, rescaled):
    """`merge` for values already merged, given with `before` (deq(W); empty: not measured).
    Returns (kept, update, blocks rescaled)."""
    rows, cols = values.shape
    measure = before.shape[0] > 0
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
            largest = 0
            for i in range(n0):
                source = values[i0 + i, j0 : j0 + n1]
                for j in range(n1):
                    largest = max(largest, _magnitude_bits(source[j]))
            used = _block_scale(s, largest)
            _encode_block(values, i0, j0, n0, n1, used, out, i0, j0)
            if measure:
                k, u = _survival(values, before, i0, j0, n0, n1, out, i0, j0, used)
                kept += k
                update += u
            if used != s:
                scale[bi, bj] = used
                rescaled[count, 0] = bi
                rescaled[count, 1] = bj
                count += 1
    return kept, update, count
