"""MXFP4 experts (gpt-oss; REFERENCE.md §10).

A weight `X` is stored as `X_blocks`, uint8 [E, rows, cols/32, 16], beside `X_scales`, uint8
[E, rows, cols/32]: 32 values per block along the last (input) dimension, two e2m1 codes per
byte (low nibble first; magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6, sign in the top bit), value =
e2m1 × 2^(scale − 127). Rows are outputs: the module's parameter (`gate_up_proj` [E, H, 2I])
is each expert's stored matrix transposed, which transformers' `convert_moe_packed_tensors`
does when it dequantizes.

The engine streams the blocks as E·rows rows of cols/2 bytes; each row's values are cols
wide (`values_per_code` 2). Merging keeps the stored scales: codes = round((deq(W) + ΔW) /
2^(s − 127)) to e2m1, ties to even. A 32-value block whose merged values no longer fit (|v|
beyond 6 plus half the top step, 7, times the scale) gets the smallest power-of-two scale
that holds its largest value, and is recorded. `--dtype` writes the module's dense parameter
`X` [E, cols, rows], as transformers' dequantized checkpoints do, in bfloat16 (its values are
exact there), one band of rows at a time from one expert's packed bytes.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from bonemerge.codecs.base import Bands, Codec, Rounding, Stored, ceil_div, dequantized_source, round_once
from bonemerge.errors import CheckpointError, MergeError

if TYPE_CHECKING:
    import torch

    from bonemerge.checkpoint import Checkpoint, RangeReader, TensorRef
    from bonemerge.plan.build import Step

BLOCKS, SCALES = "_blocks", "_scales"
BLOCK = 32
MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
MAX = 6.0
# 6 plus half its step (2): beyond it rounding to nearest would need a code e2m1 lacks.
OVERFLOW = 7.0
SIGN = 0x8
# Rows per stochastic-rounding generator (and per chunk boundary): reproducible, and cheap.
BAND = 64
BIAS = 127
MAX_SCALE = 254  # 255 is E8M0's NaN
# Rows decoded at once for `--dtype` (a few MB of float64 scratch for gpt-oss's widths)
DECODE_ROWS = 256


class Mxfp4(Codec):
    name = "mxfp4"
    values_per_code = 2

    def find(self, checkpoint: Checkpoint, config: Mapping) -> dict[str, Stored]:
        quantization = config.get("quantization_config") or {}
        packed = [n for n, t in checkpoint.tensors.items() if n.endswith(BLOCKS) and t.dtype == "U8"]
        if not packed and quantization.get("quant_method") != "mxfp4":
            return {}
        if not packed:
            raise CheckpointError(
                f"{checkpoint.root}'s config.json says quant_method 'mxfp4', but it holds no uint8 "
                "…_blocks tensors; the checkpoint is incomplete or its config is wrong."
            )
        found = {}
        for name in packed:
            blocks = checkpoint.tensors[name]
            scale_name = name.removesuffix(BLOCKS) + SCALES
            scales = checkpoint.tensors.get(scale_name)
            if scales is None:
                raise CheckpointError(
                    f"{checkpoint.root} holds {name} but not the scales {scale_name} of its MXFP4 blocks; "
                    "the checkpoint is incomplete."
                )
            shape = tuple(blocks.shape)
            if (
                len(shape) != 4
                or shape[-1] != BLOCK // 2
                or scales.dtype != "U8"
                or scales.shape != shape[:-1]
            ):
                raise CheckpointError(
                    f"{name} in {blocks.path} is {blocks.dtype} {list(shape)} beside {scale_name}, "
                    f"{scales.dtype} {list(scales.shape)}; MXFP4 experts need uint8 blocks [experts, rows, "
                    "cols/32, 16] and uint8 scales [experts, rows, cols/32]."
                )
            found[name] = Stored(self, name, blocks, {"scales": scales}, {"scales": scale_name}, shape)
        return found

    def row_band(self, stored: Stored | None) -> int:
        return BAND

    def grid(self, stored: Stored) -> tuple[int, int]:
        experts, rows, groups, half = stored.params
        return experts * rows, groups * half

    def describe(self, stored: Stored) -> str:
        return "MXFP4 (e2m1, 32-value blocks, power-of-two scales)"

    def prepare(
        self,
        stored: Stored | None,
        load: Callable[[TensorRef], torch.Tensor],
        rounding: Rounding,
        device: torch.device | str,
    ) -> Bands:
        assert stored is not None
        scales = load(stored.companions["scales"]).to(device)
        reload = lambda: load(stored.companions["scales"])  # noqa: E731
        return Mxfp4Bands(stored, scales.reshape(self.grid(stored)[0], -1), rounding, reload)

    def dequantized(self, step: Step, stored: Stored, dtype: str) -> Step:
        """The module's dense parameter `X` [E, cols, rows] in place of `X_blocks`, as
        transformers writes it (each expert transposed), with the step's ops on it. Its rows
        are made when the engine reaches them (`DequantizedRows`), in bfloat16: e2m1 times a
        power of two has two significant bits, so they are exact."""
        from dataclasses import replace

        experts, rows, groups, _ = stored.params
        name = stored.name.removesuffix(BLOCKS)
        shape = (experts, groups * BLOCK, rows)

        def whole() -> torch.Tensor:
            from bonemerge.checkpoint import RangeReader

            with RangeReader() as reader:
                return DequantizedRows(stored)(reader, 0, experts * groups * BLOCK).view(shape)

        source = dequantized_source(name, shape, whole, stored, rows=lambda: DequantizedRows(stored))
        return replace(step, name=name, dtype=dtype, shape=shape, source=source, decode=None, encode=None)


class DequantizedRows:
    """Rows of the dequantized parameter [E·cols, rows] (each expert's stored [rows, cols]
    transposed), made from the packed bytes of one expert at a time.

    Output rows are input columns, so no order streams both: a band of output rows needs its
    32-column blocks from every stored row of the expert. The expert's packed bytes (4 bits a
    value: 8 MiB for a gpt-oss expert) are read once and kept while the engine's chunks walk
    through it; each band decodes only the blocks it covers, DECODE_ROWS stored rows at a time,
    so the working set is one expert's bytes plus a band, whatever the number of experts."""

    def __init__(self, stored: Stored) -> None:
        self.stored = stored
        self.expert = -1
        self.blocks: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None

    def _load(self, reader: RangeReader, expert: int) -> None:
        import torch

        if expert == self.expert:
            return
        _, rows, groups, half = self.stored.params
        weight, scales = self.stored.weight, self.stored.companions["scales"]
        size = rows * groups * half
        raw = reader.read(weight.path, weight.offset + expert * size, size)
        self.blocks = torch.frombuffer(raw, dtype=torch.uint8).view(rows, groups, half)
        raw = reader.read(scales.path, scales.offset + expert * rows * groups, rows * groups)
        self.scales = torch.frombuffer(raw, dtype=torch.uint8).view(rows, groups)
        self.expert = expert

    def __call__(self, reader: RangeReader, start: int, stop: int) -> torch.Tensor:
        import torch

        _, rows, groups, _ = self.stored.params
        cols = groups * BLOCK
        out = torch.empty(stop - start, rows, dtype=torch.bfloat16)
        for expert in range(start // cols, ceil_div(stop, cols)):
            first, last = (
                max(start, expert * cols) - expert * cols,
                min(stop, (expert + 1) * cols) - expert * cols,
            )
            self._load(reader, expert)
            assert self.blocks is not None and self.scales is not None
            g0, g1 = first // BLOCK, ceil_div(last, BLOCK)
            band = out[expert * cols + first - start : expert * cols + last - start]
            for r0 in range(0, rows, DECODE_ROWS):
                r1 = min(rows, r0 + DECODE_ROWS)
                values = _values(self.blocks[r0:r1, g0:g1], self.scales[r0:r1, g0:g1], wide=False)
                _into(values[:, first - g0 * BLOCK : last - g0 * BLOCK], band[:, r0:r1].t())
        return out


def _lut(dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    import torch

    values = torch.tensor(MAGNITUDES, dtype=dtype, device=device)
    return torch.cat([values, -values])


# The e2m1 steps around each magnitude code, toward zero and away from it. A merged 6 stands
# for values up to 7 (rounding clamps there); nothing lies beyond a restored 6 on its scale.
_TOWARD = (0.5, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 2.0)
_AWAY = (0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 2.0, 2.0)
_UNSURE_TABLES: dict[str, torch.Tensor] = {}


def _unsure(device: torch.device | str) -> torch.Tensor:
    """For each (merged byte, restored byte), how many of its two codes an unmerge may not
    have restored, as a table of 65536 counts.

    The merge rounded the exact merged value x to the merged code m, so x lies within half
    m's step below it and half its step above it; the unmerge computes r' = m − ΔW = w + (m − x)
    from the original w and rounds it to r. A code other than r lies within reach of w only
    where one of m's steps is coarser than r's step on the same side: otherwise w = r (exact
    ties aside). This holds on the block's stored scale, the merge's own unless it gave the
    block a new one. Signed zeros count alike: their values are equal."""
    import torch

    key = str(device)
    if key not in _UNSURE_TABLES:
        codes = torch.arange(16)
        magnitude, negative = codes % 8, codes >= 8
        toward, away = torch.tensor(_TOWARD)[magnitude], torch.tensor(_AWAY)[magnitude]
        beyond = torch.where(magnitude == 7, torch.inf, away)  # a restored 6 has no code above
        merged_below, merged_above = torch.where(negative, away, toward), torch.where(negative, toward, away)
        restored_below = torch.where(negative, beyond, toward)
        restored_above = torch.where(negative, toward, beyond)
        unsure = (merged_below[:, None] > restored_below[None, :]) | (
            merged_above[:, None] > restored_above[None, :]
        )  # [merged code, restored code]
        pairs = torch.arange(256)
        low, high = pairs & 0x0F, pairs >> 4
        table = unsure[low[:, None], low[None, :]].int() + unsure[high[:, None], high[None, :]].int()
        _UNSURE_TABLES[key] = table.to(torch.uint8).reshape(-1).to(device)
    return _UNSURE_TABLES[key]


_PAIRS: dict[tuple[torch.dtype, str], torch.Tensor] = {}


def _pairs(dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """The two values of each of the 256 bytes (low nibble first), [256, 2]: one look-up a
    byte, not a split into nibbles and two."""
    import torch

    key = (dtype, str(device))
    if key not in _PAIRS:
        codes = torch.arange(256)
        _PAIRS[key] = _lut(dtype, device)[torch.stack([codes & 0x0F, codes >> 4], dim=-1)]
    return _PAIRS[key]


def _values(blocks: torch.Tensor, scales: torch.Tensor, wide: bool) -> torch.Tensor:
    """The values of packed `blocks` [rows, groups, 16] on `scales` [rows, groups]: [rows,
    groups · 32], exact. e2m1 × 2^(s − 127) has two significant bits, so float32 holds it
    exactly for every scale but E8M0's NaN (255), or overflows where any narrower float would
    too; float64 where `wide` is asked for (a float64 output) or a scale is 255."""
    import torch

    rows = blocks.shape[0]
    dtype = torch.float64 if wide or bool((scales == 255).any()) else torch.float32
    index = blocks.reshape(-1).to(torch.int32)
    values = torch.index_select(_pairs(dtype, blocks.device), 0, index).view(rows, -1, BLOCK)
    exponent = scales.to(torch.int32) - BIAS
    values *= torch.ldexp(torch.ones(exponent.shape, dtype=dtype, device=scales.device), exponent).unsqueeze(
        -1
    )
    return values.view(rows, -1)


def _into(values: torch.Tensor, out: torch.Tensor) -> None:
    """Exact `values` into `out`, rounded once: a cast from float32 rounds once."""
    import torch

    if values.dtype == torch.float64:
        round_once(values, out)
    else:
        out.copy_(values)


def _nearest(magnitude: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (0-7) of `magnitude` (≥ 0, ≤ 6), to nearest, ties to the even code."""
    import torch

    code = torch.zeros(magnitude.shape, dtype=torch.uint8, device=magnitude.device)
    for index in range(len(MAGNITUDES) - 1):
        middle = (MAGNITUDES[index] + MAGNITUDES[index + 1]) / 2
        # a tie goes up only to an even code
        code += (magnitude >= middle if index % 2 else magnitude > middle).to(torch.uint8)
    return code


def _below(magnitude: torch.Tensor) -> torch.Tensor:
    """The code of the largest e2m1 magnitude ≤ each of `magnitude` (≥ 0)."""
    import torch

    code = torch.zeros(magnitude.shape, dtype=torch.uint8, device=magnitude.device)
    for value in MAGNITUDES[1:]:
        code += (magnitude >= value).to(torch.uint8)
    return code


class Mxfp4Bands(Bands):
    values_per_code = 2

    def __init__(
        self,
        stored: Stored,
        scales: torch.Tensor,
        rounding: Rounding,
        reload: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.name = stored.name
        self.stored_scale: torch.Tensor | None = scales
        self.scale: torch.Tensor | None = scales.clone()
        self.shape = stored.params
        self.rounding = rounding
        self._lock = threading.Lock()
        # after `finish`: the stored scales read again (`reload`), and the ones encoding changed
        self._reload = reload
        self._changed: tuple[tuple[torch.Tensor, ...], torch.Tensor] | None = None

    def _factors(self, row0: int, rows: int, dtype: torch.dtype, scale: torch.Tensor) -> torch.Tensor:
        """2^(s − 127) for rows [row0, row0 + rows), one per 32-value block: (rows, cols/32, 1)."""
        import torch

        exponent = scale[row0 : row0 + rows].to(torch.int32) - BIAS
        return torch.ldexp(torch.ones(exponent.shape, dtype=dtype, device=scale.device), exponent).unsqueeze(
            -1
        )

    def decode(self, stored: torch.Tensor, out: torch.Tensor, row0: int, encoded: bool = False) -> None:
        """e2m1 × 2^(s − 127), exact (`_values`) and rounded once into `out`."""
        import torch

        rows = stored.shape[0]
        scale = self.scale if encoded else self.stored_scale
        values = _values(
            stored.view(rows, -1, BLOCK // 2), scale[row0 : row0 + rows], out.dtype == torch.float64
        )
        _into(values, out)

    def encode(self, values: torch.Tensor, out: torch.Tensor, row0: int) -> None:
        import torch

        rows = values.shape[0]
        blocked = values.view(rows, -1, BLOCK)
        scaled = blocked / self._factors(row0, rows, values.dtype, self.stored_scale)
        over = (scaled.abs() > OVERFLOW).any(dim=-1)
        if bool(over.any()):
            self._rescale(blocked, scaled, over, row0)
        magnitude = scaled.abs().clamp_(max=MAX)
        if self.rounding.mode == "nearest":
            code = _nearest(magnitude)
        else:
            low = _below(magnitude)
            high = (low + 1).clamp(max=len(MAGNITUDES) - 1)
            lut = _lut(magnitude.dtype, magnitude.device)
            lower, upper = lut[low.long()], lut[high.long()]
            fraction = torch.where(upper > lower, (magnitude - lower) / (upper - lower), 0.0)
            code = torch.where(self._uniform(row0, magnitude) < fraction, high, low)
        code |= torch.signbit(scaled).to(torch.uint8) * SIGN
        pairs = code.view(rows, -1, 2)
        out.view(torch.uint8).view(rows, -1).copy_(pairs[..., 0] | (pairs[..., 1] << 4))

    def _uniform(self, row0: int, like: torch.Tensor) -> torch.Tensor:
        """Uniform [0, 1) numbers drawn BAND rows at a time from generators seeded by the band."""
        import torch

        out = torch.empty_like(like)
        for begin in range(0, like.shape[0], BAND):
            generator = torch.Generator(device=like.device)
            generator.manual_seed(self.rounding.generator_seed(self.name, (row0 + begin) // BAND))
            rows = out[begin : begin + BAND]
            rows.copy_(torch.rand(rows.shape, generator=generator, device=like.device, dtype=like.dtype))
        return out

    def _rescale(self, blocked: torch.Tensor, scaled: torch.Tensor, over: torch.Tensor, row0: int) -> None:
        """The smallest power-of-two scale holding each overflowing block's largest value."""
        import torch

        for row, group in torch.nonzero(over).tolist():
            amax = float(blocked[row, group].abs().max().double())
            exponent = math.ceil(math.log2(amax / MAX))
            while math.ldexp(MAX, exponent - 1) >= amax:
                exponent -= 1
            while math.ldexp(MAX, exponent) < amax:
                exponent += 1
            if exponent + BIAS > MAX_SCALE:
                raise MergeError(f"{self.name}: a merged block's largest value {amax} exceeds MXFP4's range.")
            scaled[row, group] = blocked[row, group] / math.ldexp(1.0, exponent)
            with self._lock:
                self.scale[row0 + row, group] = exponent + BIAS
                self.encoded.rescaled.append(self._where(row0 + row, group))

    def _where(self, row: int, group: int) -> tuple[int, int, int]:
        """(expert, row, block) of a stored block."""
        return (*divmod(row, self.shape[1]), group)

    def finish(self) -> None:
        """Keep only the scales encoding changed (a 32nd of the values is too much to keep for
        every weight of a file until its scales are written); `derived` reads the rest again."""
        import torch

        if self._reload is None or self.scale is None or self.stored_scale is None:
            return
        where = torch.nonzero(self.scale != self.stored_scale, as_tuple=True)
        self._changed = (tuple(w.cpu() for w in where), self.scale[where].cpu())
        self.scale = self.stored_scale = None

    def derived(self) -> dict[str, torch.Tensor]:
        scale = self.scale
        if scale is None:
            assert self._reload is not None and self._changed is not None
            scale = self._reload().cpu().reshape(self.shape[0] * self.shape[1], -1).clone()
            where, values = self._changed
            scale[where] = values
        return {"scales": scale.cpu().view(self.shape[:-1])}

    def may_differ(self, merged: torch.Tensor, restored: torch.Tensor, row0: int) -> int:
        """How many values an unmerge may not have brought back (`_UNSURE`), and every value of
        a block that got a new scale here."""
        import torch

        rows = merged.shape[0]
        pairs = merged.view(rows, -1, BLOCK // 2).to(torch.int32) * 256 + restored.view(rows, -1, BLOCK // 2)
        unsure = _unsure(merged.device)[pairs].sum(dim=-1, dtype=torch.int32)
        rescaled = self.scale[row0 : row0 + rows] != self.stored_scale[row0 : row0 + rows]
        return int(torch.where(rescaled, BLOCK, unsure).sum())

    def step_size(self, values: torch.Tensor, row0: int) -> torch.Tensor:
        """The code step above the code just below each value, times its (encoded) scale."""
        import torch

        rows = values.shape[0]
        factor = self._factors(row0, rows, values.dtype, self.scale)
        low = _below((values.view(rows, -1, BLOCK) / factor).abs().clamp(max=MAX)).long()
        steps = torch.tensor(
            [0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 2.0, 2.0], dtype=values.dtype, device=values.device
        )
        return (steps[low] * factor).view(values.shape)


MXFP4 = Mxfp4()
