"""Block-scaled FP8 (DeepSeek-V3/R1, Qwen3-*-FP8, Kimi K2; REFERENCE.md §9).

A weight `X.weight` is `F8_E4M3` codes beside `X.weight_scale_inv`, float32, one scale per
block of `weight_block_size` (128 × 128) elements, edge blocks partial: value = code × scale.
Merging keeps the stored scales: codes = round((deq(W) + ΔW) / s). Only a block whose merged
values no longer fit (|v / s| beyond 448 by more than half a code step, where rounding to
nearest would leave the format) gets a new scale, float32(amax / 448), and is recorded.

Rounding to nearest is ties-to-even, as in the float64 reference: from fp32, torch's cast to
`float8_e4m3fn` rounds once; from fp64 the cast would go through fp32 and could round twice,
so the two neighbouring codes are compared in fp64 instead. Stochastic rounding picks the
upper neighbour with probability equal to the value's fraction of the step between them.

On the CPU, decoding and rounding to nearest in fp32 (the usual compute dtype) run as compiled
loops (`e4m3_kernels.py`), a 128 × 128 block at a time; a LoRA update is merged in the same
pass, on tiles of whole blocks whose product stays in the CPU's cache. Elsewhere (fp64, CUDA,
stochastic rounding) the same arithmetic runs as torch calls on whole bands.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from bonemerge.codecs.base import Bands, Codec, Rounding, Stored, blocks, round_once
from bonemerge.errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from bonemerge.checkpoint import Checkpoint, TensorRef
    from bonemerge.methods import LowRankUpdate

SCALE_SUFFIX = "_scale_inv"
MAX = 448.0
# 448 plus half its code step (32): values up to here round to 448 (ties to even), beyond it
# rounding to nearest would need a code the format lacks.
OVERFLOW = 464.0
TOP_CODE = 0x7E
SIGN = 0x80
DEFAULT_BLOCK = (128, 128)
# Elements per tile of a fused merge: the tile's fp32 values stay in a 1–2 MiB L2 cache between
# the compiled passes over it (smaller tiles measured no faster).
TILE_ELEMENTS = 1 << 17


def _block_size(config: Mapping, where: str) -> tuple[int, int]:
    quantization = config.get("quantization_config") or {}
    fmt = quantization.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise CheckpointError(
            f"{where} stores block FP8 as {fmt!r} (quantization_config.fmt); bonemerge reads e4m3 only."
        )
    block = quantization.get("weight_block_size") or DEFAULT_BLOCK
    if (
        not isinstance(block, list | tuple)
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise CheckpointError(
            f"{where}'s quantization_config.weight_block_size is {block!r}; block FP8 needs two "
            "positive integers such as [128, 128]."
        )
    return int(block[0]), int(block[1])


class Fp8Block(Codec):
    name = "fp8_block"

    def find(self, checkpoint: Checkpoint, config: Mapping) -> dict[str, Stored]:
        quantization = config.get("quantization_config") or {}
        scales = [n for n in checkpoint.tensors if n.endswith(SCALE_SUFFIX)]
        if quantization.get("quant_method") != "fp8" and not scales:
            return {}
        where = str(checkpoint.root)
        block = _block_size(config, where)
        found = {}
        for scale_name in scales:
            name = scale_name.removesuffix(SCALE_SUFFIX)
            scale = checkpoint.tensors[scale_name]
            weight = checkpoint.tensors.get(name)
            if weight is None:
                raise CheckpointError(
                    f"{where} holds {scale_name} but not the weight {name} it scales; the checkpoint "
                    "is incomplete."
                )
            expected = blocks(weight.shape, block) if len(weight.shape) == 2 else ("⌈out/b⌉", "⌈in/b⌉")
            if weight.dtype != "F8_E4M3" or scale.dtype != "F32" or tuple(scale.shape) != expected:
                raise CheckpointError(
                    f"{scale_name} in {scale.path} is {scale.dtype} {list(scale.shape)} beside "
                    f"{name}, {weight.dtype} {list(weight.shape)}; block FP8 ({block[0]}×{block[1]}) "
                    f"needs F8_E4M3 codes with F32 scales of shape {list(expected)}."
                )
            found[name] = Stored(self, name, weight, {"scale_inv": scale}, {"scale_inv": scale_name}, block)
        return found

    def row_band(self, stored: Stored | None) -> int:
        return stored.params[0] if stored is not None else 1

    def describe(self, stored: Stored) -> str:
        return f"block FP8 (e4m3, {stored.params[0]}×{stored.params[1]} blocks)"

    def prepare(
        self,
        stored: Stored | None,
        load: Callable[[TensorRef], torch.Tensor],
        rounding: Rounding,
        device: torch.device | str,
    ) -> Bands:
        assert stored is not None
        return Fp8Bands(stored, load(stored.companions["scale_inv"]).to(device), rounding)


# each compute thread's buffers of uniform draws for stochastic rounding (by dtype), reused
# across weights
_DRAWS = threading.local()
_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _code_values(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The value of each of the 256 codes in `dtype`, made by torch's own cast: decoding by
    looking codes up here gives the cast's very bits, 4–6× faster on CPU, where torch casts
    float8 one element at a time."""
    import torch

    table = _TABLES.get((dtype, device))
    if table is None:
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
        table = _TABLES[(dtype, device)] = codes.to(dtype).to(device)
    return table


def _value(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    import torch

    return bits.to(torch.uint8).view(torch.float8_e4m3fn).to(dtype)


def _neighbours(magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes (as int16 bits) of the representable values just below and above each of
    `magnitude` (≥ 0, ≤ 448); equal when the value is representable."""
    import torch

    code = magnitude.to(torch.float32).to(torch.float8_e4m3fn)
    bits = code.view(torch.uint8).to(torch.int16)
    above = code.to(magnitude.dtype) > magnitude
    low = torch.where(above, bits - 1, bits)
    exact = code.to(magnitude.dtype) == magnitude
    high = torch.where(above | exact, bits, (bits + 1).clamp(max=TOP_CODE))
    return low, high


def fitting_scale(amax: torch.Tensor, dtype: str) -> torch.Tensor:
    """The new scale (as float32) of a block whose largest magnitude is `amax` (float64), in
    the scale dtype: float32(amax / 448), which puts amax within rounding of the top code, or
    for a 16-bit scale the smallest one at or above amax / 448 (to nearest, it could fall
    below, and amax land beyond the top code). `e4m3_kernels.fitting_scale` is the same rule."""
    import torch

    from bonemerge.checkpoint.dtypes import to_torch

    exact = amax.double() / MAX
    if dtype == "F32":
        return exact.float()
    narrow = exact.to(to_torch(dtype))
    if narrow.double() < exact:
        narrow = (narrow.view(torch.int16) + 1).view(narrow.dtype)
    return narrow.float()


class Fp8Bands(Bands):
    #: the dtype scales are written in (new ones are made to fit it: `fitting_scale`)
    scale_dtype = "F32"

    def __init__(
        self, stored: Stored, scale: torch.Tensor, rounding: Rounding, block: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        #: rows and columns sharing one scale (`block`, else the weight's `weight_block_size`)
        self.block = block or stored.params
        self.name = stored.name
        self.cols = stored.weight.shape[1]
        self.stored_scale = scale
        self.scale = scale.clone()
        self.rounding = rounding
        self._lock = threading.Lock()

    def scales(self, row0: int, rows: int, dtype: torch.dtype, scale: torch.Tensor) -> torch.Tensor:
        """Each element's scale for rows [row0, row0 + rows), as a (rows, cols) tensor."""
        import torch

        index = torch.arange(row0, row0 + rows, device=scale.device) // self.block[0]
        return scale.index_select(0, index).to(dtype).repeat_interleave(self.block[1], dim=1)[:, : self.cols]

    def _blocks(
        self, rows: torch.Tensor, row0: int, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`rows` seen as (row blocks, 128, column blocks, 128) beside their scales shaped to
        broadcast over it, where the rows are whole blocks (all but a partial last band): the
        same element-wise products and quotients as with `scales`, without writing a scale for
        every element."""
        b0, b1 = self.block
        count, cols = rows.shape
        if count % b0 or cols % b1 or not rows.is_contiguous():
            full = self.scales(row0, count, rows.dtype, scale)
            return rows, full
        first = row0 // b0
        blocks = scale[first : first + count // b0].to(rows.dtype)
        return rows.view(count // b0, b0, cols // b1, b1), blocks[:, None, :, None]

    def _tiles(self, rows: int) -> list[tuple[int, int, int, int]]:
        """(first row, end row, first column, end column) of tiles of whole blocks covering
        `rows` rows from a band boundary: several bands of whole rows when rows are narrow,
        else one band's rows cut in column ranges of whole blocks."""
        b0, b1 = self.block
        cols = self.cols
        step = max(1, TILE_ELEMENTS // (cols * b0)) * b0
        # a partial last band joins the tile before it: a product of one or two rows goes
        # through BLAS's matrix-vector path, whose sums may be ordered unlike the rows' GEMM
        starts = list(range(0, rows - rows % b0 if rows > b0 else 1, step)) or [0]
        bands = [(r, min(rows, r + step)) for r in starts]
        bands[-1] = (bands[-1][0], rows)
        if cols * b0 <= TILE_ELEMENTS:
            return [(r0, r1, 0, cols) for r0, r1 in bands]
        width = max(1, TILE_ELEMENTS // (b0 * b1)) * b1
        return [(r0, r1, c, min(cols, c + width)) for r0, r1 in bands for c in range(0, cols, width)]

    def decode(self, stored: torch.Tensor, out: torch.Tensor, row0: int, encoded: bool = False) -> None:
        """code × scale: in fp32 or fp64 one rounding of the exact product (4 + 24 significant
        bits); into a 16-bit dtype the exact fp64 product, rounded once (`round_once`)."""
        import torch

        scale = self.scale if encoded else self.stored_scale
        if out.dtype in (torch.float32, torch.float64) and out.device.type == "cpu":
            self._decode_compiled(stored, out, row0, 0, scale)
        elif out.dtype in (torch.float32, torch.float64):
            table = _code_values(out.dtype, out.device)
            index = stored.view(torch.uint8).to(torch.int32).reshape(-1)
            if out.is_contiguous():
                torch.index_select(table, 0, index, out=out.view(-1))
            else:
                out.copy_(table.index_select(0, index).view(out.shape))
            blocked, factors = self._blocks(out, row0, scale)
            blocked.mul_(factors)
        else:
            exact = stored.to(torch.float64) * self.scales(row0, out.shape[0], torch.float64, scale)
            round_once(exact, out)

    def encode(self, values: torch.Tensor, out: torch.Tensor, row0: int) -> None:
        import torch

        assert row0 % self.block[0] == 0, "bands must start on a scale row"
        if self._compiled(values):
            self._encode_compiled(values, None, out, row0, 0)
            return
        blocked, factors = self._blocks(values, row0, self.stored_scale)
        scaled = (blocked / factors).view(values.shape)
        smallest, largest = torch.aminmax(scaled)  # one pass, no temporaries: overflow is rare
        if float(smallest) < -OVERFLOW or float(largest) > OVERFLOW:
            self._rescale(values, scaled, scaled.abs() > OVERFLOW, row0)
        scaled.clamp_(-MAX, MAX)
        if self.rounding.mode == "nearest" and scaled.dtype == torch.float32:
            out.copy_(scaled)
            return
        magnitude = scaled.abs()
        low, high = _neighbours(magnitude)
        lower, upper = _value(low, scaled.dtype), _value(high, scaled.dtype)
        if self.rounding.mode == "nearest":
            below, beyond = magnitude - lower, upper - magnitude
            up = (beyond < below) | ((beyond == below) & (high > low) & (high % 2 == 0))
        else:
            fraction = (magnitude - lower) / (upper - lower)
            up = self._uniform(row0, scaled) < fraction
        bits = torch.where(up, high, low) | (torch.signbit(scaled).to(torch.int16) * SIGN)
        out.view(torch.uint8).copy_(bits)

    def encode_measured(
        self, values: torch.Tensor, before: torch.Tensor, out: torch.Tensor, row0: int
    ) -> tuple[float, float]:
        if self._compiled(values) and before.dtype == values.dtype:
            assert row0 % self.block[0] == 0, "bands must start on a scale row"
            return self._encode_compiled(values, before, out, row0, 0)
        return super().encode_measured(values, before, out, row0)

    @staticmethod
    def _compiled(values: torch.Tensor) -> bool:
        """Whether `e4m3_kernels` encodes these values: fp32 on the CPU."""
        import torch

        return values.dtype == torch.float32 and values.device.type == "cpu"

    def tiles(self, rows: int) -> list[tuple[int, int, int, int]] | None:
        return self._tiles(rows) if self.rounding.mode == "nearest" else None

    def decode_tile(self, stored_rows: torch.Tensor, out: torch.Tensor, row: int, col: int) -> None:
        self._decode_compiled(stored_rows, out, row, col, self.stored_scale)

    def encode_tile(
        self, values: torch.Tensor, before: torch.Tensor | None, out_rows: torch.Tensor, row: int, col: int
    ) -> tuple[float, float]:
        return self._encode_compiled(values, before, out_rows, row, col)

    def merge_tile(
        self,
        stored_rows: torch.Tensor,
        product: torch.Tensor,
        alpha: float,
        out_rows: torch.Tensor,
        row: int,
        col: int,
    ) -> tuple[float, float, bool]:
        import numpy as np
        import torch

        from bonemerge.codecs import e4m3_kernels

        none = np.empty((0, 0), dtype=np.float32)
        cols = product.shape[1]
        codes = stored_rows.view(torch.uint8).numpy()
        arrays = (codes, product.numpy(), none, none, 1.0, alpha, cols)
        status, kept, update = self._run_kernel(
            e4m3_kernels.merge, arrays, row, col, out_rows, (stored_rows.shape[0], cols)
        )
        return kept, update, not status & e4m3_kernels.NON_FINITE

    def takes_low_rank(self, update: LowRankUpdate, tiles: list[tuple[int, int, int, int]]) -> bool:
        rank = update.left.shape[1]
        return all(_sums_like_torch(rank, r1 - r0, c1 - c0, update.multiplier) for r0, r1, c0, c1 in tiles)

    def merge_low_rank(
        self,
        stored_rows: torch.Tensor,
        update: LowRankUpdate,
        out_rows: torch.Tensor,
        row: int,
        tiles: list[tuple[int, int, int, int]],
    ) -> tuple[float, float, bool]:
        import numpy as np
        import torch

        from bonemerge.codecs import e4m3_kernels

        codes = stored_rows.view(torch.uint8).numpy()
        left = update.left[row : row + stored_rows.shape[0]].numpy()
        spans = np.array(tiles, dtype=np.int64).reshape(-1, 4)
        arrays = (codes, left, update.right.numpy(), update.multiplier, update.alpha, spans)
        status, kept, total = self._run_kernel(
            e4m3_kernels.merge_tiles, arrays, row, 0, out_rows, tuple(stored_rows.shape)
        )
        return kept, total, not status & e4m3_kernels.NON_FINITE

    def _decode_compiled(
        self, stored_rows: torch.Tensor, out: torch.Tensor, row: int, col: int, scale: torch.Tensor
    ) -> None:
        import torch

        from bonemerge.codecs import e4m3_kernels

        codes = stored_rows.view(torch.uint8).numpy()
        e4m3_kernels.decode(codes, scale.numpy(), row, col, *self.block, out.numpy())

    def _encode_compiled(
        self, values: torch.Tensor, before: torch.Tensor | None, out_rows: torch.Tensor, row: int, col: int
    ) -> tuple[float, float]:
        """fp32 values of a tile (rows from `row`, columns from `col` of `out_rows`, block
        boundaries) to codes, rounding as asked on the stored scales, new ones for blocks that
        overflow; with `before` (deq(W)), also ⟨deq(W′) − deq(W), ΔW⟩ and ‖ΔW‖²."""
        import numpy as np

        from bonemerge.codecs import e4m3_kernels

        empty = np.empty((0, 0), dtype=np.float32)
        uniform = self._uniform(row, values).numpy() if self.rounding.mode == "stochastic" else empty
        arrays = (values.numpy(), before.numpy() if before is not None else empty, uniform)
        kept, update = self._run_kernel(e4m3_kernels.encode, arrays, row, col, out_rows, values.shape)
        return kept, update

    def _run_kernel(
        self, kernel: Callable, arrays: tuple, row: int, col: int, out_rows: torch.Tensor, shape: tuple
    ) -> list:
        """Run `e4m3_kernels.merge`, `merge_tiles` or `encode` on a tile of `shape` (or on the
        rows holding the tiles) from (row, col): `arrays` are its own first arguments, the
        scales, the codes' rows and the record of new scales follow; returns its results but
        the count of new scales, which are noted."""
        import numpy as np
        import torch

        from bonemerge.codecs import e4m3_kernels

        rows, cols = shape
        rescaled = np.empty((-(-rows // self.block[0]) * -(-cols // self.block[1]), 2), dtype=np.int64)
        *results, count = kernel(
            *arrays,
            self.stored_scale.numpy(),
            self.scale.numpy(),
            row,
            col,
            *self.block,
            out_rows.view(torch.uint8).numpy(),
            rescaled,
            e4m3_kernels.SCALE_DTYPES.index(self.scale_dtype),
        )
        self._record(rescaled[:count])
        return results

    def _record(self, blocks) -> None:
        """Note the blocks (row block, column block) that a kernel gave a new scale."""
        if len(blocks):
            with self._lock:
                self.encoded.rescaled.extend((int(i), int(j)) for i, j in blocks)

    def _uniform(self, row0: int, like: torch.Tensor) -> torch.Tensor:
        """Uniform [0, 1) numbers drawn band by band from generators seeded by the band, into
        this thread's reused buffer on the CPU (a fresh band-sized tensor per call would leave
        each thread's allocator holding several)."""
        import torch

        if like.device.type == "cpu":
            buffers = getattr(_DRAWS, "buffers", None)
            if buffers is None:
                buffers = _DRAWS.buffers = {}
            found = buffers.get(like.dtype)
            if found is None or found.numel() < like.numel():
                found = buffers[like.dtype] = torch.empty(like.numel(), dtype=like.dtype)
            out = found[: like.numel()].view(like.shape)
        else:
            out = torch.empty_like(like)
        band = self.block[0]
        for begin in range(0, like.shape[0], band):
            generator = torch.Generator(device=like.device)
            generator.manual_seed(self.rounding.generator_seed(self.name, (row0 + begin) // band))
            rows = out[begin : begin + band]
            torch.rand(rows.shape, generator=generator, dtype=like.dtype, out=rows)
        return out

    def _rescale(
        self, values: torch.Tensor, scaled: torch.Tensor, over: torch.Tensor, row0: int, col0: int = 0
    ) -> None:
        """New scales for the blocks holding `over` elements, and their values re-divided
        (`values` are rows from `row0` and columns from `col0`, both block boundaries)."""
        import torch

        b0, b1 = self.block
        hit = torch.nonzero(over)
        found = torch.unique(torch.stack([(hit[:, 0] + row0) // b0, (hit[:, 1] + col0) // b1], dim=1), dim=0)
        for i, j in found.tolist():
            rows = slice(i * b0 - row0, (i + 1) * b0 - row0)
            cols = slice(j * b1 - col0, (j + 1) * b1 - col0)
            new = self.new_scale(values[rows, cols].abs().max().double())
            scaled[rows, cols] = values[rows, cols] / new.to(values.dtype)
            with self._lock:
                self.scale[i, j] = new
                self.encoded.rescaled.append((i, j))

    def new_scale(self, amax: torch.Tensor) -> torch.Tensor:
        """The scale of a block that overflowed, from its largest magnitude (float64)."""
        return fitting_scale(amax, self.scale_dtype)

    def derived(self) -> dict[str, torch.Tensor]:
        return {"scale_inv": self.scale.cpu()}

    def step_size(self, values: torch.Tensor, row0: int) -> torch.Tensor:
        """The code step above the code just below each value, times its (encoded) scale."""
        import torch

        scale = self.scales(row0, values.shape[0], values.dtype, self.scale)
        low, _ = _neighbours((values / scale).abs().clamp(max=MAX))
        gap = _value((low + 1).clamp(max=TOP_CODE), values.dtype) - _value(low, values.dtype)
        return torch.where(gap > 0, gap, 32.0) * scale


FP8_BLOCK = Fp8Block()


@functools.cache
def _sums_like_torch(rank: int, rows: int, cols: int, multiplier: float) -> bool:
    """Whether `e4m3_kernels.product` gives the bits of torch's product times `multiplier` for
    a tile of this shape on this machine. BLAS's GEMM kernels sum a small rank's terms in
    order, one fused multiply-add each, and so does the kernel; but a large rank is summed in
    blocks, a product of one or two rows goes through matrix-vector code, and other CPUs and
    libraries may order sums otherwise. Any other order shows in most elements of random
    factors, so one try per shape tells."""
    import numpy as np
    import torch

    from bonemerge.codecs import e4m3_kernels

    generator = torch.Generator().manual_seed(rank * 1_000_003 + rows * 1009 + cols)
    left = torch.randn(rows, rank, generator=generator)
    right = torch.randn(rank, cols + 1, generator=generator)  # a tile is a strided view of its factor
    expected = torch.mm(left, right[:, 1:])
    if multiplier != 1.0:
        expected.mul_(multiplier)
    got = np.empty((rows, cols), dtype=np.float32)
    e4m3_kernels.product(left.numpy(), right.numpy(), 1, multiplier, got)
    return bool(np.array_equal(got.view(np.uint32), expected.numpy().view(np.uint32)))
