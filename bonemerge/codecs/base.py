"""The interface every storage codec implements: how a weight sits on disk.

A merged weight is `decode(stored) -> method maths -> encode(stored)`. The method (Bone,
LoRA, ...) says what the update is; the codec says how the weight is stored: a dense dtype,
block-scaled FP8 (codes beside `weight_scale_inv`), MXFP4 (`_blocks` + `_scales`), later
per-channel FP8, NF4... Nothing outside `bonemerge.codecs` names a format.

A codec, asked by the planner, finds its weights in a checkpoint (`find`): each becomes a
`Stored`, the weight's main tensor plus its companion tensors by role (`scale_inv`). The
engine then asks it for `Bands` on one weight: decoding stored rows into fp32/fp64 values and
encoding computed rows back on the stored scales. Rows are the stored tensor's first
dimension (or the codec's `grid`: MXFP4's [E, rows, cols/32, 16] bytes stream as E·rows
rows of two codes a byte, `values_per_code` 2); `row_band` rows share their scales (128 for
block FP8, 1 for dense), so the engine hands a codec whole bands only: every chunk starts on
a band boundary. Scales may also be blocked along the last dimension (block FP8's 128
columns, MXFP4's 32): a band's decode and encode see whole rows, so column blocks are the
codec's own business.

Encoding keeps the stored scales; a block whose merged values no longer fit the format gets
a new scale (only that block), which the codec records so that its companion tensor can be
written after the weight (`derived`) and the run can say which blocks changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from bonemerge.checkpoint import Checkpoint, ComputedTensor, TensorRef
    from bonemerge.checkpoint.folder import RowMaker
    from bonemerge.methods import LowRankUpdate
    from bonemerge.plan.build import Step

ROUNDINGS = ("nearest", "stochastic")


@dataclass(frozen=True)
class Rounding:
    """How encoding rounds to the format's codes: `nearest` (to nearest, ties to even) or
    `stochastic` (up with probability equal to the fraction, so the expected code is the exact
    value), seeded by `seed`, the weight's name and the band: reproducible whatever the threads."""

    mode: str = "nearest"
    seed: int = 0

    def generator_seed(self, name: str, band: int) -> int:
        text = f"{self.seed}:{name}:{band}".encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True, eq=False)
class Stored:
    """One weight stored by a codec: its main tensor (`name`, codes), its companion tensors by
    role (for block FP8, `scale_inv`) with their names in the checkpoint (`names`: a PEFT
    training checkpoint's files call them otherwise), and the codec's per-weight settings."""

    codec: Codec
    name: str
    weight: TensorRef
    companions: Mapping[str, TensorRef]
    names: Mapping[str, str]
    params: Any = None

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]

    @property
    def values_shape(self) -> tuple[int, int]:
        """The weight's values as the engine streams them: (rows, columns)."""
        rows, cols = self.codec.grid(self)
        return rows, cols * self.codec.values_per_code

    def describe(self) -> list:
        """What decides the decoded values, for resume fingerprints."""
        return [self.codec.name, repr(self.params), sorted(self.companions)]

    def decoded(self) -> ComputedTensor:
        """The whole weight as float32 values, decoded when it is asked for: for the few
        readers that need a base weight whole (Bat's conversion to LoRA)."""
        import torch

        from bonemerge.checkpoint import ComputedTensor
        from bonemerge.checkpoint.tensors import load_whole

        def decode() -> torch.Tensor:
            bands = self.codec.prepare(self, load_whole, Rounding(), "cpu")
            values = torch.empty(self.values_shape, dtype=torch.float32)
            bands.decode(load_whole(self.weight).view(self.codec.grid(self)), values, 0)
            return values

        return ComputedTensor(self.name, "F32", self.values_shape, decode)


def dequantized_source(
    name: str,
    shape: tuple[int, ...],
    compute: Callable[[], torch.Tensor],
    stored: Stored,
    rows: Callable[[], RowMaker] | None = None,
) -> ComputedTensor:
    """A bfloat16 weight a codec writes dense under a name of its own (MXFP4's `X` for
    `X_blocks`), made when the engine reaches it (by rows, where `rows` is given). `stored` (the
    codes it is decoded from) and `recipe` say where it comes from: for resume fingerprints and
    the file it is written in."""
    from bonemerge.checkpoint import ComputedTensor

    source = ComputedTensor(name, "BF16", shape, compute, rows)
    source.stored = stored.weight
    source.recipe = [f"{stored.codec.name} dequantized", *stored.describe()]
    return source


class Derived:
    """A companion tensor (a scale) of a weight that is re-encoded: its stored values, except
    where encoding gave a block a new scale. It stands in where a `TensorRef` would; the engine
    gets its values from the encoded weight (`weight`, a plan step), so it is planned after it."""

    def __init__(self, weight: Any, role: str, stored: TensorRef, name: str) -> None:
        self.weight = weight
        self.role = role
        self.stored = stored
        self.name = name
        self.dtype = stored.dtype
        self.shape = stored.shape
        self.nbytes = stored.nbytes


@dataclass
class Encoded:
    """What encoding one weight did: how much of its update survived (the sums of
    ⟨deq(W') − deq(W), ΔW⟩ and ‖ΔW‖²) and which blocks got a new scale."""

    kept: float = 0.0
    update: float = 0.0
    rescaled: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def survival(self) -> float | None:
        """ρ = ⟨deq(W′) − deq(W), ΔW⟩ / ‖ΔW‖²: 1 when all of the update is in the codes."""
        return self.kept / self.update if self.update > 0 else None


class Bands:
    """A stored weight made ready for one run: rows in, rows out, in whole bands.

    `decode(stored, out, row0)` writes the values of stored rows `row0...` into `out`, of any
    float dtype, rounded once (a weight dequantized to bf16 is written straight from its codes),
    with the scales as stored, or with `encoded` as encoding left them;
    `encode(values, out, row0)` writes their codes into `out` (the stored dtype),
    rounding as asked and giving a block a new scale only when its values do not fit;
    `encode_measured` does the same and says how much of the update the codes kept.
    `derived()` is every companion tensor after encoding (`finish()` first, where the weight
    was encoded whole), `encoded` what encoding did.
    """

    #: values per stored element (2 for MXFP4's two codes a byte)
    values_per_code = 1
    #: whether encoding must see every merged value first (`observe`, then `observed`): a scale
    #: that the whole weight shares is chosen before its first row is encoded
    needs_pass = False

    def __init__(self) -> None:
        self.encoded = Encoded()

    def observe(self, values: torch.Tensor, row0: int) -> None:
        """The first pass over the merged values of rows `row0...`, for codecs that set `needs_pass`."""
        raise TypeError(f"{type(self).__name__} sets needs_pass without observing the rows")

    def observed(self) -> Bands:
        """Called once the first pass has seen every row: the bands to encode with, these or
        others (on a new scale) while these still decode the stored rows."""
        return self

    def decode(self, stored: torch.Tensor, out: torch.Tensor, row0: int, encoded: bool = False) -> None:
        raise NotImplementedError

    def encode(self, values: torch.Tensor, out: torch.Tensor, row0: int) -> None:
        raise NotImplementedError

    def encode_measured(
        self, values: torch.Tensor, before: torch.Tensor, out: torch.Tensor, row0: int
    ) -> tuple[float, float]:
        """`encode`, and what of the update survived it: ⟨deq(W′) − deq(W), ΔW⟩ and ‖ΔW‖², from
        deq(W) (`before`), the merged `values` and their codes. Dot products in the compute dtype
        (BLAS, blocked sums: relative error ~1e-5 in fp32, far below the 3 decimals ρ is shown
        with) cost a sixth of float64 sums of products. A codec may do this in one pass with
        its encoding (block FP8)."""
        import torch

        self.encode(values, out, row0)
        delta = (values - before).reshape(-1)
        kept = torch.empty_like(values)
        self.decode(out, kept, row0, encoded=True)
        kept -= before
        kept = kept.reshape(-1)
        return float(torch.dot(kept, delta)), float(torch.dot(delta, delta))

    def tiles(self, rows: int) -> list[tuple[int, int, int, int]] | None:
        """(first row, end row, first column, end column) of cache-sized tiles of `rows` rows
        (from a band boundary) that the `*_tile` methods take, each holding whole scale
        blocks; None where the codec has no such path (then rows go whole). Those methods
        take a tile's stored codes as its whole rows (`stored_rows`, `out_rows`) and its first
        column `col`, its values as tile-shaped fp32 tensors, and `row`, its first row."""
        return None

    def decode_tile(self, stored_rows: torch.Tensor, out: torch.Tensor, row: int, col: int) -> None:
        """`decode` of a tile from `tiles` into fp32 `out`."""
        raise NotImplementedError

    def encode_tile(
        self, values: torch.Tensor, before: torch.Tensor, out_rows: torch.Tensor, row: int, col: int
    ) -> tuple[float, float]:
        """`encode_measured` of an fp32 tile from `tiles`."""
        raise NotImplementedError

    def merge_tile(
        self,
        stored_rows: torch.Tensor,
        product: torch.Tensor,
        alpha: float,
        out_rows: torch.Tensor,
        row: int,
        col: int,
    ) -> tuple[float, float, bool]:
        """`decode_tile`, `product × alpha` added (one fp32 rounding, as `add_(alpha=)`) and
        `encode_tile` in one pass over the tile; also whether every merged value was finite."""
        raise NotImplementedError

    def takes_low_rank(self, update: LowRankUpdate, tiles: list[tuple[int, int, int, int]]) -> bool:
        """Whether `merge_low_rank` can merge every tile of `tiles` with the bits of torch's
        product of `update`'s factors; where not, the caller multiplies with torch and calls
        `merge_tile`."""
        return False

    def merge_low_rank(
        self,
        stored_rows: torch.Tensor,
        update: LowRankUpdate,
        out_rows: torch.Tensor,
        row: int,
        tiles: list[tuple[int, int, int, int]],
    ) -> tuple[float, float, bool]:
        """`merge_tile` of every tile of `tiles` (from `tiles`, which `takes_low_rank`), each
        product computed from `update`'s factors in the same pass: (kept, update, finite) of
        them all."""
        raise NotImplementedError

    def derived(self) -> dict[str, torch.Tensor]:
        return {}

    def finish(self) -> None:
        """Encoding is done: keep only what `derived()` and `encoded` still need. Companions
        are written at the end of their file, so what every encoder keeps until then adds up."""

    def step_size(self, values: torch.Tensor, row0: int) -> torch.Tensor:
        """One code step at each of `values` (rows `row0...`), with the scales as encoding
        left them: how far another correct re-encoding may lie (verify's tolerance)."""
        raise NotImplementedError

    def may_differ(self, merged: torch.Tensor, restored: torch.Tensor, row0: int) -> int | None:
        """For an unmerge, how many values of stored rows `row0...` (`merged`, encoded into
        `restored`) may not be the original's; None where the stored dtype is a float one whose
        bits tell it (`compute.may_differ`)."""
        return None


class Codec:
    """One storage format. Subclasses override what their format needs."""

    #: how reports and `--json` name the format
    name: str = ""
    #: values per stored element (2 for MXFP4's two codes a byte)
    values_per_code: int = 1
    #: False for a format bonemerge reads but does not write (bitsandbytes 4-bit): its weights
    #: are always written dequantized, to `dense_dtype` unless `--dtype` says otherwise
    encodes: bool = True

    def find(self, checkpoint: Checkpoint, config: Mapping) -> dict[str, Stored]:
        """Every weight of `checkpoint` this codec stores, by name; refuses (one sentence) a
        weight that claims the format but is inconsistent (a scale of the wrong shape)."""
        return {}

    def row_band(self, stored: Stored | None) -> int:
        """Rows that share scales and must stay together in one chunk."""
        return 1

    def grid(self, stored: Stored) -> tuple[int, int]:
        """The stored tensor as the engine streams it: (rows, stored elements per row)."""
        from bonemerge.checkpoint.dtypes import rows_cols

        return rows_cols(stored.weight.shape)

    def dequantized(self, step: Step, stored: Stored, dtype: str) -> Step:
        """The step that writes `stored` dequantized to `dtype` (`--dtype`): by default the
        same tensor, decoded row by row."""
        from dataclasses import replace

        return replace(step, dtype=dtype, decode=stored)

    def prepare(
        self,
        stored: Stored | None,
        load: Callable[[TensorRef], torch.Tensor],
        rounding: Rounding,
        device: torch.device | str,
    ) -> Bands:
        """`stored` ready to decode and encode rows; `load` reads a (small) companion tensor."""
        raise NotImplementedError

    def describe(self, stored: Stored) -> str:
        """How summaries name the format of `stored` (`FP8 e4m3, 128×128 blocks`)."""
        return self.name

    def dense_dtype(self, stored: Stored) -> str:
        """The dtype a weight of a format that is not written (`encodes` False) is dequantized
        to without `--dtype`: the one it was quantized from."""
        return "BF16"


def round_once(values: torch.Tensor, out: torch.Tensor) -> None:
    """Write float64 `values` into `out` (any float dtype) rounded once, to nearest even.

    torch narrows float64 to bfloat16 or float16 through float32, which rounds twice and can
    land one step off (1 + 2⁻⁸ + 2⁻³⁰ becomes 1, not 1 + 2⁻⁷). Rounding to float32 toward zero
    with the last bit set when inexact ("round to odd") keeps the information the second
    rounding needs, so the two roundings give the correctly rounded result."""
    import torch

    if out.dtype in (torch.float64, torch.float32):
        out.copy_(values)
        return
    narrow = values.to(torch.float32)
    back = narrow.to(torch.float64)
    inexact = back != values
    bits = narrow.view(torch.int32)
    bits = torch.where(inexact & (back.abs() > values.abs()), bits - 1, bits)
    bits = torch.where(inexact, bits | 1, bits)
    out.copy_(bits.view(torch.float32))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def blocks(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the scale grid of a `shape` weight in `block`-sized blocks (edges partial)."""
    return tuple(ceil_div(size, b) for size, b in zip(shape, block, strict=True))
