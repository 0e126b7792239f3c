"""Compiled loops for block-scaled e4m3 codes: decode, encode and the fused merge of one tile.

Merging into FP8 is a dozen element-wise steps per value (decode, add the update, divide by
the scale, find overflowing blocks, clamp, round, decode again to measure what survived). As
torch calls each step is a pass over memory and a few microseconds of dispatch, about 6 ns per
value on one core, several times what copying the bytes costs. Compiled with numba, the
steps run in vector registers, along a tile's rows (long unit-stride runs: a 128 × 128
block's rows are 128 separate cache lines, which no prefetcher follows). A merge is one pass
that encodes on the stored scales and measures as it goes, redoing the rare block that
overflows; values already merged (by torch) take three: find each block's largest
magnitude, encode on each block's scale, measure.

Every code is bit-identical to the torch route it replaces (which still serves fp64 maths and
CUDA): a value is code × scale rounded once to fp32, the update is added in fp32
(`add_(product, alpha=)` with an exact `alpha`), the quotient is fp32 division, and rounding
ports torch's own fp32 → `float8_e4m3fn` conversion (`c10/util/Float8_e4m3fn.h`: round to
nearest even, subnormals through one fp32 addition), branch-free so that it vectorizes. Only
the update's survival sums differ from torch's fp32 dot products: fp32 sums of a block's row
each, in vector lanes, added up in fp64.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from bonemerge.checkpoint.confine import expand_home
from bonemerge.codecs.fp8_block import MAX, OVERFLOW, TOP_CODE

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
_SIGN_BIT = -(1 << 31)  # 0x80000000 as an int32
_MANTISSA_KEPT = -(1 << 20)  # the sign, exponent and top 3 mantissa bits of an fp32
# the dtypes a scale may be stored in, as the kernels number them (new scales must fit)
SCALE_DTYPES = ("F32", "BF16", "F16")
_HALF_SMALLEST_NORMAL = 2.0**-14
_HALF_MAX = 65504.0
# what the fused merge returns in its status word
NON_FINITE = 1


def writable_folder(candidates: Iterable[Path]) -> Path | None:
    """The first of `candidates` that exists or can be made, and takes a file; else None."""
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError:
            continue
        return folder
    return None


def _cache_candidates() -> Iterable[Path]:
    """Where compiled kernels may be kept: beside this module (numba's default), then
    `$XDG_CACHE_HOME/bonemerge/numba`, then a folder of this user's among the temporary files.
    numba itself refuses to import the module where its default and its own fall-back (the
    home's cache) cannot be written, as in a read-only install with no home."""
    yield Path(__file__).parent / "__pycache__"
    yield expand_home(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "bonemerge" / "numba"
    try:
        yield Path(tempfile.gettempdir()) / f"bonemerge-numba-{getattr(os, 'getuid', lambda: 0)()}"
    except OSError:
        return


def _cached() -> bool:
    """Whether the kernels are cached (compiled once per install), choosing where unless
    NUMBA_CACHE_DIR says; without a writable folder they are compiled on each run."""
    if numba.config.CACHE_DIR:
        return True
    folder = writable_folder(_cache_candidates())
    if folder is not None and folder != Path(__file__).parent / "__pycache__":
        numba.config.CACHE_DIR = str(folder)
    return folder is not None


# numpy's error model: a float division by zero gives inf as in torch, without a check per
# element that would keep the loops from vectorizing
_JIT = {"nogil": True, "cache": _cached(), "error_model": "numpy"}


# numba types integer arithmetic as 64-bit, which halves the lanes of every vector; each
# integer step below is cast back to 32 bits, which LLVM then carries out in 32 (its results
# fit: the arithmetic is on fp32 bit patterns)
_I32 = np.int32


@njit(**_JIT)
def encode_value(value: np.float32) -> np.uint8:
    """The e4m3 code nearest to `value` (ties to even), NaN (0x7F) beyond the format."""
    value = np.float32(value)
    bits = value.view(np.int32)
    sign = _I32(_I32(bits >> _I32(24)) & _I32(0x80))
    magnitude = _I32(bits & _I32(0x7FFFFFFF))
    shifted = np.float32(np.float32(abs(value)) + np.float32(_SUBNORMAL_BIAS))
    subnormal = _I32(shifted.view(np.int32) - _I32(_SUBNORMAL_BIAS_BITS))
    odd = _I32(_I32(magnitude >> _I32(20)) & _I32(1))
    rounded = _I32(_I32(magnitude + _I32(_REBIAS)) + _I32(_I32(0x7FFFF) + odd))
    normal = _I32(_I32(rounded >> _I32(20)) & _I32(0xFF))
    code = subnormal if magnitude < _I32(_SMALLEST_NORMAL_BITS) else normal
    code = _I32(0x7F) if magnitude >= _I32(_NAN_FROM) else code
    return np.uint8(code | sign)


# inlined: a call per value keeps the loop from vectorizing
@njit(inline="always", **_JIT)
def encode_pair(value: np.float32):
    """`encode_value` of a value within ±448 (or NaN), and that code's value (`decode_value`
    of it, but for NaN's bits), from one rounding: the rounded magnitude's fp32 bits are the
    code's before they are rebiased (normal codes), or |value| + 2¹⁴ − 2¹⁴, on e4m3's
    subnormal steps (subnormal ones). Decoding the code again cost the merge 4 % more."""
    value = np.float32(value)
    bits = value.view(np.int32)
    sign = _I32(bits & _I32(_SIGN_BIT))
    magnitude = _I32(bits & _I32(0x7FFFFFFF))
    shifted = np.float32(np.float32(abs(value)) + np.float32(_SUBNORMAL_BIAS))
    odd = _I32(_I32(magnitude >> _I32(20)) & _I32(1))
    up = _I32(_I32(magnitude + _I32(0x7FFFF)) + odd)
    small = magnitude < _I32(_SMALLEST_NORMAL_BITS)
    subnormal = _I32(shifted.view(np.int32) - _I32(_SUBNORMAL_BIAS_BITS))
    normal = _I32(_I32(_I32(up + _I32(_REBIAS)) >> _I32(20)) & _I32(0xFF))
    code = subnormal if small else normal
    code = _I32(0x7F) if magnitude >= _I32(_NAN_FROM) else code  # NaN, as `encode_value`
    on_steps = np.float32(shifted - np.float32(_SUBNORMAL_BIAS)).view(np.int32)
    rounded = on_steps if small else _I32(up & _I32(_MANTISSA_KEPT))
    code_sign = _I32(_I32(sign >> _I32(24)) & _I32(0x80))
    return np.uint8(code | code_sign), _I32(rounded | sign).view(np.float32)


@njit(**_JIT)
def decode_value(code: np.uint8) -> np.float32:
    """The value of an e4m3 code, exactly, from its bits (a table look-up per vector lane
    costs more): a normal code's exponent and mantissa are a float32's, rebiased; a subnormal
    one is its mantissa × 2⁻⁹; 0x7F and 0xFF are NaN (with torch's bits)."""
    bits = _I32(code)
    magnitude = _I32(bits & _I32(0x7F))
    subnormal = np.float32(np.float32(_I32(bits & _I32(7))) * np.float32(_SUBNORMAL_STEP))
    normal = _I32(_I32(magnitude << _I32(20)) + _I32(_UNBIAS))
    value = subnormal.view(np.int32) if magnitude < _I32(8) else normal
    value = _I32(_NAN_BITS) if magnitude == _I32(0x7F) else value
    return _I32(value | _I32(_I32(bits & _I32(0x80)) << _I32(24))).view(np.float32)


# inlined by numba itself: LLVM finds this function too large to inline, and a call per value
# keeps the loop from vectorizing (4× slower)
@njit(inline="always", **_JIT)
def round_stochastic(value: np.float32, uniform: np.float32) -> np.uint8:
    """The e4m3 code of `value` (within ±448) rounded up in magnitude with probability equal
    to its fraction of the step between the codes around it: the upper code where `uniform`
    (in [0, 1)) is below that fraction, else the lower; an exact value keeps its code."""
    magnitude = np.float32(abs(value))
    nearest = _I32(encode_value(magnitude))
    at = decode_value(nearest)
    low = _I32(nearest - _I32(at > magnitude))
    # the code above: none beyond 448; the same code where the value is one (no step to take)
    step = _I32((at < magnitude) & (nearest < _I32(TOP_CODE)))
    high = min(_I32(nearest + step), _I32(TOP_CODE))
    lower = decode_value(low)
    fraction = np.float32(np.float32(magnitude - lower) / np.float32(decode_value(high) - lower))
    code = high if uniform < fraction else low
    return np.uint8(code | _I32(_I32(np.float32(value).view(np.int32) >> _I32(24)) & _I32(0x80)))


@njit(**_JIT)
def decode(codes, scale, row0, col0, block_rows, block_cols, out):
    """out = value × scale of each code of `codes[:, col0:col0 + out's width]` (rows from row
    `row0`): the exact product (4 + 24 significant bits fit fp64), rounded once to fp32 or
    kept in fp64. Tiles are passed as their whole rows and a column range throughout: a row
    of a C-contiguous array is a unit-stride run that vectorizes, a 2-D slice is not."""
    rows, cols = out.shape
    for i in range(rows):
        bi = (row0 + i) // block_rows
        j0 = col0
        while j0 < col0 + cols:
            bj = j0 // block_cols
            j1 = min(col0 + cols, (bj + 1) * block_cols)
            s = np.float64(scale[bi, bj])
            source = codes[i, j0:j1]
            row = out[i, j0 - col0 : j1 - col0]
            for j in range(j1 - j0):
                row[j] = np.float64(decode_value(source[j])) * s
            j0 = j1


@njit(**_JIT)
def _magnitude_bits(value: np.float32) -> np.int32:
    """|value|'s fp32 bits: ordered as the magnitudes are, NaN and inf above every finite one,
    so that a block's largest needs only integer maxima (which vectorize; float ones do not,
    without letting NaN go unseen)."""
    return _I32(np.float32(value).view(np.int32) & _I32(0x7FFFFFFF))


@njit(**_JIT)
def _column_blocks(col0, cols, block_cols):
    """The tile's first column block, and how many it touches."""
    first = col0 // block_cols
    return first, (col0 + cols - 1) // block_cols - first + 1


@njit(**_JIT)
def _span(tj, first, col0, cols, block_cols):
    """Tile-local columns [j0, j1) of the tile's column block `tj`."""
    j0 = max(col0, (first + tj) * block_cols) - col0
    return j0, min(cols, (first + tj + 1) * block_cols - col0)


@njit(**_JIT)
def fitting_scale(amax: np.float32, kind: int) -> np.float32:
    """`fp8_block.fitting_scale` for the scale dtype `SCALE_DTYPES[kind]`: float32(amax / 448),
    or the smallest bf16 or fp16 at or above amax / 448 (from the smallest float32 at or above
    it, whose low mantissa bits are then rounded up; below fp16's normal range, its steps of
    2⁻²⁴)."""
    exact = np.float64(amax) / MAX
    nearest = np.float32(exact)
    if kind == 0:
        return nearest
    bits = np.int64(nearest.view(np.uint32))
    bits += np.float64(nearest) < exact
    if kind == 1:
        return np.uint32((bits + 0xFFFF) & 0xFFFF0000).view(np.float32)
    above = np.uint32(bits).view(np.float32)
    if above < np.float32(_HALF_SMALLEST_NORMAL):
        return np.float32(math.ceil(np.float64(above) * 2.0**24) * 2.0**-24)
    rounded = np.uint32((bits + 0x1FFF) & ~0x1FFF).view(np.float32)
    return rounded if rounded <= np.float32(_HALF_MAX) else np.float32(np.inf)


@njit(**_JIT)
def _block_scales(largest, stored, scale, first_bi, first_bj, rescaled, kind):
    """The scale each of the tile's blocks is encoded on: the stored one, or `fitting_scale`
    where that would round the block's largest value beyond the format (written to `scale`,
    listed in `rescaled`). Returns them, how many were new, and whether a block holds
    a value that is not finite."""
    used = np.empty(largest.shape, dtype=np.float32)
    count = 0
    status = 0
    for ti in range(largest.shape[0]):
        for tj in range(largest.shape[1]):
            s = stored[first_bi + ti, first_bj + tj]
            if largest[ti, tj] >= _INFINITY_BITS:
                status |= NON_FINITE
            amax = np.uint32(largest[ti, tj]).view(np.float32)
            new = s
            if amax / s > np.float32(OVERFLOW):
                new = fitting_scale(amax, kind)
                scale[first_bi + ti, first_bj + tj] = new
                rescaled[count, 0] = first_bi + ti
                rescaled[count, 1] = first_bj + tj
                count += 1
            used[ti, tj] = new
    return used, count, status


@njit(**_JIT)
def _encode_rows(values, used, row0, col0, block_rows, block_cols, out, uniform):
    """The codes of the tile `values` on the scales `used` of its blocks, into columns
    `col0...` of the rows `out`, row by row (long unit-stride runs, which memory streams):
    rounded to nearest, or stochastically with `uniform` (tile-shaped; empty: to nearest)."""
    rows, cols = values.shape
    if uniform.shape[0] > 0:
        _encode_rows_stochastic(values, used, row0, col0, block_rows, block_cols, out, uniform)
        return
    first_bi = row0 // block_rows
    first_bj, count = _column_blocks(col0, cols, block_cols)
    top = np.float32(MAX)
    for i in range(rows):
        ti = (row0 + i) // block_rows - first_bi
        source = values[i]
        row = out[i]
        for tj in range(count):
            j0, j1 = _span(tj, first_bj, col0, cols, block_cols)
            scale = used[ti, tj]
            merged = source[j0:j1]
            codes = row[col0 + j0 : col0 + j1]
            for j in range(j1 - j0):
                codes[j] = encode_value(min(max(merged[j] / scale, -top), top))


@njit(**_JIT)
def _encode_rows_stochastic(values, used, row0, col0, block_rows, block_cols, out, uniform):
    rows, cols = values.shape
    first_bi = row0 // block_rows
    first_bj, count = _column_blocks(col0, cols, block_cols)
    top = np.float32(MAX)
    for i in range(rows):
        ti = (row0 + i) // block_rows - first_bi
        for tj in range(count):
            j0, j1 = _span(tj, first_bj, col0, cols, block_cols)
            scale = used[ti, tj]
            merged = values[i, j0:j1]
            draws = uniform[i, j0:j1]
            codes = out[i, col0 + j0 : col0 + j1]
            for j in range(j1 - j0):
                codes[j] = round_stochastic(min(max(merged[j] / scale, -top), top), draws[j])


@njit(fastmath={"reassoc"}, **_JIT)
def _survival(values, before, used, row0, col0, block_rows, block_cols, codes):
    """⟨deq(W′) − deq(W), ΔW⟩ and ‖ΔW‖² over the tile from its merged values, deq(W) and the
    codes written (columns `col0...` of the rows `codes`). Each block's row (at most 128 terms)
    is summed in fp32 vector lanes, and those sums in fp64: twice the lanes of fp64 throughout
    (this pass takes a third less time), and on the FP8 bench within 10⁻⁹ (relative) of fp64
    sums, for a figure reported to three digits. Only these sums may be reassociated: no code
    depends on them."""
    rows, cols = values.shape
    first_bi = row0 // block_rows
    first_bj, count = _column_blocks(col0, cols, block_cols)
    kept = 0.0
    update = 0.0
    for i in range(rows):
        ti = (row0 + i) // block_rows - first_bi
        for tj in range(count):
            j0, j1 = _span(tj, first_bj, col0, cols, block_cols)
            scale = used[ti, tj]
            merged = values[i, j0:j1]
            was = before[i, j0:j1]
            row = codes[i, col0 + j0 : col0 + j1]
            kept_here = np.float32(0)
            update_here = np.float32(0)
            for j in range(j1 - j0):
                moved = np.float32(decode_value(row[j]) * scale - was[j])
                wanted = np.float32(merged[j] - was[j])
                kept_here += moved * wanted
                update_here += wanted * wanted
            kept += np.float64(kept_here)
            update += np.float64(update_here)
    return kept, update


@intrinsic
def _fma(typing_context, a, b, c):
    """a × b + c rounded once (fp32): LLVM's fma, which vectorizes; numba has no fma of its own."""

    def codegen(context, builder, signature, args):
        single = ir.FloatType()
        fma = builder.module.declare_intrinsic("llvm.fma", [single], ir.FunctionType(single, [single] * 3))
        return builder.call(fma, args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@njit(inline="always", **_JIT)
def _pair_product(left_a, left_b, right, col0, out_a, out_b):
    """out_a, out_b = left_a, left_b @ right[:, col0:col0 + len(out_a)], each sum as BLAS's GEMM
    orders it for small ranks: one fused multiply-add per term, first term first (`fp8_block`
    checks this against torch's product before relying on it). Four terms per pass over the
    outputs, which stay in cache; the factor rows stream, each load serving both rows (a
    third less time per merged value than one row at a time; four rows were no faster)."""
    rank = left_a.shape[0]
    n = out_a.shape[0]
    col1 = col0 + n
    k = 0
    if rank >= 4:
        r0, r1, r2, r3 = right[0, col0:col1], right[1, col0:col1], right[2, col0:col1], right[3, col0:col1]
        a0, a1, a2, a3 = left_a[0], left_a[1], left_a[2], left_a[3]
        b0, b1, b2, b3 = left_b[0], left_b[1], left_b[2], left_b[3]
        for j in range(n):
            x0, x1, x2, x3 = r0[j], r1[j], r2[j], r3[j]
            out_a[j] = _fma(a3, x3, _fma(a2, x2, _fma(a1, x1, a0 * x0)))
            out_b[j] = _fma(b3, x3, _fma(b2, x2, _fma(b1, x1, b0 * x0)))
        k = 4
    else:
        out_a[:] = 0
        out_b[:] = 0
    while k + 4 <= rank:
        r0, r1, r2, r3 = (
            right[k, col0:col1],
            right[k + 1, col0:col1],
            right[k + 2, col0:col1],
            right[k + 3, col0:col1],
        )
        a0, a1, a2, a3 = left_a[k], left_a[k + 1], left_a[k + 2], left_a[k + 3]
        b0, b1, b2, b3 = left_b[k], left_b[k + 1], left_b[k + 2], left_b[k + 3]
        for j in range(n):
            x0, x1, x2, x3 = r0[j], r1[j], r2[j], r3[j]
            out_a[j] = _fma(a3, x3, _fma(a2, x2, _fma(a1, x1, _fma(a0, x0, out_a[j]))))
            out_b[j] = _fma(b3, x3, _fma(b2, x2, _fma(b1, x1, _fma(b0, x0, out_b[j]))))
        k += 4
    while k < rank:
        a, b, r = left_a[k], left_b[k], right[k, col0:col1]
        for j in range(n):
            x = r[j]
            out_a[j] = _fma(a, x, out_a[j])
            out_b[j] = _fma(b, x, out_b[j])
        k += 1


@njit(inline="always", **_JIT)
def _update_rows(left, right, col0, i, pair):
    """The products of rows i and i + 1 of `left` into the two rows of `pair`; a last row
    without a partner is paired with itself."""
    _pair_product(left[i], left[min(i + 1, left.shape[0] - 1)], right, col0, pair[0], pair[1])


@njit(**_JIT)
def product(left, right, col0, multiplier, out):
    """out = (left @ right[:, col0:col0 + out's width]) × multiplier, each rounded to fp32,
    computed as `merge` computes its update from factors."""
    m = np.float32(multiplier)
    pair = np.empty((2, out.shape[1]), dtype=np.float32)
    for i in range(out.shape[0]):
        if i % 2 == 0:
            _update_rows(left, right, col0, i, pair)
        row = out[i]
        update = pair[i % 2]
        for j in range(row.shape[0]):
            row[j] = update[j] * m


@njit(inline="always", **_JIT)
def _merge_row_span(source, added, m, factor, s, encoded_on, written, kept_lanes, update_lanes):
    """One block's span of one row: values = code × `s` + update × m × factor, encoded on the
    scale `encoded_on` into `written`; each column's survival terms are added to its lane (a
    sum per column, not a reduction, so that the loop vectorizes without reassociation, which
    could change codes). Returns the largest magnitude's bits."""
    top = np.float32(MAX)
    most = _I32(0)
    for j in range(source.shape[0]):
        b = decode_value(source[j]) * s
        v = np.float32(b + np.float32(added[j] * m) * factor)
        code, value = encode_pair(min(max(v / encoded_on, -top), top))
        written[j] = code
        moved = np.float32(value * encoded_on - b)
        wanted = np.float32(v - b)
        kept_lanes[j] += moved * wanted
        update_lanes[j] += wanted * wanted
        most = max(most, _magnitude_bits(v))
    return most


@njit(**_JIT)
def _lane_sums(kept_lanes, update_lanes, width):
    """The first `width` lanes summed in fp64, in order, and cleared."""
    kept = 0.0
    update = 0.0
    for j in range(width):
        kept += kept_lanes[j]
        update += update_lanes[j]
        kept_lanes[j] = 0
        update_lanes[j] = 0
    return kept, update


@njit(**_JIT)
def merge(
    codes,
    product,
    left,
    right,
    multiplier,
    alpha,
    cols,
    stored,
    scale,
    row0,
    col0,
    block_rows,
    block_cols,
    out,
    rescaled,
    kind,
):
    """The fused merge of one tile of whole blocks, columns `col0...col0 + cols` of the rows
    `codes` (from row `row0`; both block boundaries): values = code × stored scale + update ×
    alpha, encoded into the same columns of `out` on the stored scales, or on a new one
    (written to `scale`, listed in `rescaled`; a scale of dtype `SCALE_DTYPES[kind]`) where a
    block overflows. The update is `product` (tile-shaped) or, where that is empty, `left @
    right[:, col0:]` computed here (`left`: the tile's rows) times `multiplier`, each rounded
    to fp32: the tile's product never goes through memory.

    One pass per row encodes on the stored scale at once, as if no block overflowed; the rare
    block that does is merged again from its codes on its new scale (the product of a column
    does not depend on which columns are computed with it, so its bits are the same). Nothing
    but codes is stored: no tile of values waits for its blocks' maxima. The survival sums are
    kept per block (fp32 lanes over its rows, added up in fp64), so that a block merged again
    replaces its own. `out` must not share memory with `codes`, which a block merged again
    reads after the first pass wrote. Returns (status, kept, update, blocks rescaled)."""
    rows = codes.shape[0]
    factored = product.shape[0] == 0
    first_bi = row0 // block_rows
    first_bj, count = _column_blocks(col0, cols, block_cols)
    tile_block_rows = (row0 + rows - 1) // block_rows - first_bi + 1
    largest = np.zeros((tile_block_rows, count), dtype=np.int64)
    kept_blocks = np.zeros((tile_block_rows, count))
    update_blocks = np.zeros((tile_block_rows, count))
    kept_lanes = np.zeros((count, block_cols), dtype=np.float32)
    update_lanes = np.zeros((count, block_cols), dtype=np.float32)
    # the products of two rows (a buffer of their own: read where the codes are written, they
    # would make the vectorized loop's overlap check fail, and the loop run scalar)
    pair = np.empty((2, cols if factored else 0), dtype=np.float32)
    m = np.float32(multiplier)
    factor = np.float32(alpha)
    for i in range(rows):
        ti = (row0 + i) // block_rows - first_bi
        if factored:
            if i % 2 == 0:
                _update_rows(left, right, col0, i, pair)
            update = pair[i % 2]
        else:
            update = product[i]
        for tj in range(count):
            j0, j1 = _span(tj, first_bj, col0, cols, block_cols)
            s = stored[first_bi + ti, first_bj + tj]
            most = _merge_row_span(
                codes[i, col0 + j0 : col0 + j1],
                update[j0:j1],
                m,
                factor,
                s,
                s,
                out[i, col0 + j0 : col0 + j1],
                kept_lanes[tj],
                update_lanes[tj],
            )
            largest[ti, tj] = max(largest[ti, tj], most)
        if i == rows - 1 or (row0 + i + 1) % block_rows == 0:
            for tj in range(count):
                j0, j1 = _span(tj, first_bj, col0, cols, block_cols)
                kept_blocks[ti, tj], update_blocks[ti, tj] = _lane_sums(
                    kept_lanes[tj], update_lanes[tj], j1 - j0
                )
    used, rescaled_count, status = _block_scales(largest, stored, scale, first_bi, first_bj, rescaled, kind)
    for r in range(rescaled_count):
        ti, tj = rescaled[r, 0] - first_bi, rescaled[r, 1] - first_bj
        j0, j1 = _span(tj, first_bj, col0, cols, block_cols)
        redone = np.empty((2, j1 - j0 if factored else 0), dtype=np.float32)
        for i in range(
            max(0, (first_bi + ti) * block_rows - row0), min(rows, (first_bi + ti + 1) * block_rows - row0)
        ):
            if factored:
                _pair_product(left[i], left[i], right, col0 + j0, redone[0], redone[1])
                added = redone[0]
            else:
                added = product[i, j0:j1]
            _merge_row_span(
                codes[i, col0 + j0 : col0 + j1],
                added,
                m,
                factor,
                stored[first_bi + ti, first_bj + tj],
                used[ti, tj],
                out[i, col0 + j0 : col0 + j1],
                kept_lanes[0],
                update_lanes[0],
            )
        kept_blocks[ti, tj], update_blocks[ti, tj] = _lane_sums(kept_lanes[0], update_lanes[0], j1 - j0)
    kept = 0.0
    update = 0.0
    for ti in range(tile_block_rows):
        for tj in range(count):
            kept += kept_blocks[ti, tj]
            update += update_blocks[ti, tj]
    return status, kept, update, rescaled_count


@njit(**_JIT)
def merge_tiles(
    codes,
    left,
    right,
    multiplier,
    alpha,
    tiles,
    stored,
    scale,
    row0,
    col0,
    block_rows,
    block_cols,
    out,
    rescaled,
    kind,
):
    """`merge` of a low-rank update from its factors into each tile of `tiles` (rows of first
    row, end row, first column, end column, relative to the rows `codes` and their first row
    `row0`, and to column `col0`; `left` holds the factor's rows for `codes`): one call for
    all the tiles of a sub-chunk, so that the Python around a call, and the interpreter lock
    it holds, are paid once for them, not once per tile. The survival sums add up tile after
    tile, from zero. Returns (status, kept, update, blocks rescaled) for them all."""
    none = np.empty((0, 0), dtype=np.float32)
    status = 0
    kept = 0.0
    update = 0.0
    count = 0
    for t in range(tiles.shape[0]):
        r0, r1, c0, c1 = tiles[t, 0], tiles[t, 1], tiles[t, 2], tiles[t, 3]
        tile_status, tile_kept, tile_update, tile_count = merge(
            codes[r0:r1],
            none,
            left[r0:r1],
            right,
            multiplier,
            alpha,
            c1 - c0,
            stored,
            scale,
            row0 + r0,
            col0 + c0,
            block_rows,
            block_cols,
            out[r0:r1],
            rescaled[count:],
            kind,
        )
        status |= tile_status
        kept += tile_kept
        update += tile_update
        count += tile_count
    return status, kept, update, count


@njit(**_JIT)
def encode(values, before, uniform, stored, scale, row0, col0, block_rows, block_cols, out, rescaled, kind):
    """`merge` for values already merged (a tile, columns `col0...` of the rows `out`), given
    with `before` (deq(W); empty: not measured), rounded to nearest or, with `uniform` draws
    (tile-shaped; empty: to nearest), stochastically. Returns (kept, update, blocks rescaled)."""
    rows, cols = values.shape
    first_bi = row0 // block_rows
    first_bj, count = _column_blocks(col0, cols, block_cols)
    largest = np.zeros(((row0 + rows - 1) // block_rows - first_bi + 1, count), dtype=np.int64)
    for i in range(rows):
        ti = (row0 + i) // block_rows - first_bi
        for tj in range(count):
            j0, j1 = _span(tj, first_bj, col0, cols, block_cols)
            merged = values[i, j0:j1]
            most = _I32(0)
            for j in range(j1 - j0):
                most = max(most, _magnitude_bits(merged[j]))
            largest[ti, tj] = max(largest[ti, tj], most)
    used, rescaled_count, _ = _block_scales(largest, stored, scale, first_bi, first_bj, rescaled, kind)
    _encode_rows(values, used, row0, col0, block_rows, block_cols, out, uniform)
    if before.shape[0] == 0:
        return 0.0, 0.0, rescaled_count
    kept, update = _survival(values, before, used, row0, col0, block_rows, block_cols, out)
    return kept, update, rescaled_count
