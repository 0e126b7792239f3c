"""compressed-tensors FP8 (vLLM's llm-compressor: `*-FP8`, `*-FP8-Dynamic`, `*-FP8-BLOCK`).

`config.json` has `quantization_config: {quant_method: "compressed-tensors", format:
"float-quantized" (or "naive-quantized"), config_groups: {NAME: {targets, weights: {num_bits:
8, type: "float", symmetric: true, strategy}, input_activations}}, ignore: [...]}`. Each
quantized Linear weight `X.weight` is `F8_E4M3` codes beside `X.weight_scale` in the dtype the
model was quantized from (F32, BF16 or F16), value = code × scale:

- `channel`: one scale per output row, `[out, 1]`;
- `tensor`: one scale for the whole weight, `[1]` (or `[]`);
- `block`: one per `block_structure` block (128 × 128), `[⌈out/b⌉, ⌈in/b⌉]`, edge blocks
  partial: DeepSeek-style block FP8 under another scale name.

`X.input_scale` (static activation scales) means nothing to the weight: it is copied as it is
(dropped with the rest of the format under `--dtype`). Formats of compressed-tensors that are
not FP8 (int8, packed int4, NVFP4, MXFP4, 2:4 sparsity, rotations) are refused (`refusal`).

The maths is block FP8's (`fp8_block.Fp8Bands`), a channel being a block of one row and every
column: codes = round((deq(W) + ΔW) / s) on the stored scales, and only a block (a row) whose
merged values overflow gets a new scale. A new scale is written in the scale's own dtype: for
16-bit scales it is the smallest one of that dtype at or above amax / 448, so that amax fits
however the scale rounds (rounding amax / 448 to nearest could give a scale below it).

A per-tensor scale is shared by every row, but the engine streams rows in bands and never holds
a whole weight: a band that overflows cannot rescale the bands written before it. So a merged
per-tensor weight is streamed twice: a first pass (the engine's, as for DoRA's column norms)
decodes and merges every row to find max |deq(W) + ΔW|; if it overflows the stored scale, the
whole tensor is encoded on the new scale amax / 448 (else on the stored one, as the other
strategies are) in the second pass. That doubles the decoding and merging of such weights (not
the reading of the adapter, the encoding or the writing); channel and block weights need no
first pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bonemerge.codecs.base import Bands, Codec, Rounding, Stored, blocks
from bonemerge.codecs.fp8_block import OVERFLOW, Fp8Bands
from bonemerge.errors import CheckpointError, MergeError

if TYPE_CHECKING:
    import torch

    from bonemerge.checkpoint import Checkpoint, TensorRef

QUANT_METHOD = "compressed-tensors"
SCALE_SUFFIX = "_scale"
INPUT_SCALE = "input_scale"
FORMATS = ("float-quantized", "naive-quantized")
STRATEGIES = ("tensor", "channel", "block")
SCALE_DTYPES = ("F32", "BF16", "F16")
# the same as `quantization_config` names them (`scale_dtype: "torch.bfloat16"`)
SCALE_TORCH_NAMES = ("float32", "bfloat16", "float16")
# A per-tensor weight is rescaled when its first pass finds max |v / s| above 464 less this
# share: the second pass computes the same values in other row groupings, which may round a
# last bit otherwise, and must never find an overflow the first pass did not.
PASS_MARGIN = 2.0**-16


@dataclass(frozen=True)
class Layout:
    """How one weight is stored: its strategy, the rows × columns that share a scale as the
    bands see them (a channel or a whole tensor: one row of every column), and its scale dtype."""

    strategy: str
    block: tuple[int, int]
    scale_dtype: str


def _weight_args(quantization: Mapping) -> list[tuple[str, Mapping, str | None]]:
    """Each config group that quantizes weights: its name, its `weights` arguments and its format."""
    groups = quantization.get("config_groups") or {}
    found = []
    for name, group in groups.items() if isinstance(groups, Mapping) else ():
        weights = group.get("weights") if isinstance(group, Mapping) else None
        if weights:
            found.append((str(name), weights, group.get("format") or quantization.get("format")))
    return found


def refusal(quantization: Mapping) -> str | None:
    """Why a compressed-tensors `quantization_config` is not the FP8 this codec reads (what it
    is instead), or None when it is."""
    if quantization.get("sparsity_config"):
        return "compressed-tensors sparsity (sparsity_config)"
    if quantization.get("transform_config"):
        return "compressed-tensors rotations (transform_config), which change what the stored weights mean"
    for name, weights, fmt in _weight_args(quantization):
        kind = f"{weights.get('num_bits')}-bit {weights.get('type')}"
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            return f"compressed-tensors {kind} weights (config group {name}, format {fmt!r})"
        if fmt not in FORMATS:
            return f"compressed-tensors FP8 in format {fmt!r} (config group {name})"
        if weights.get("symmetric") is False:
            return f"compressed-tensors asymmetric FP8 (config group {name}, weight zero points)"
        if weights.get("strategy") not in STRATEGIES:
            return f"compressed-tensors FP8 with strategy {weights.get('strategy')!r} (config group {name})"
        scale_dtype = weights.get("scale_dtype")
        if scale_dtype is not None and str(scale_dtype).rsplit(".", 1)[-1] not in SCALE_TORCH_NAMES:
            return f"compressed-tensors FP8 with {scale_dtype} scales (config group {name})"
        if weights.get("strategy") == "block" and _block_structure(weights) is None:
            return (
                f"compressed-tensors block FP8 with block_structure {weights.get('block_structure')!r} "
                f"(config group {name})"
            )
    return None


def _block_structure(weights: Mapping) -> tuple[int, int] | None:
    block = weights.get("block_structure")
    if (
        isinstance(block, list | tuple)
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        return int(block[0]), int(block[1])
    return None


def _layout(shape: tuple[int, ...], scale: TensorRef, strategies: set[str], blocks_of: set) -> Layout | None:
    """The layout a scale of this shape gives a weight of `shape`, among the config's strategies."""
    rows, cols = shape
    scale_shape = tuple(scale.shape)
    if "tensor" in strategies and scale_shape in ((), (1,)):
        return Layout("tensor", (1, cols), scale.dtype)
    if "channel" in strategies and scale_shape == (rows, 1):
        return Layout("channel", (1, cols), scale.dtype)
    for block in sorted(blocks_of):
        if scale_shape == blocks(shape, block):
            return Layout("block", block, scale.dtype)
    return None


class CompressedFp8(Codec):
    name = "compressed_fp8"

    def find(self, checkpoint: Checkpoint, config: Mapping) -> dict[str, Stored]:
        quantization = config.get("quantization_config") or {}
        if quantization.get("quant_method") != QUANT_METHOD:
            return {}
        where = str(checkpoint.root)
        args = [weights for _, weights, _ in _weight_args(quantization)]
        strategies = {str(w.get("strategy")) for w in args}
        blocks_of = {_block_structure(w) for w in args if w.get("strategy") == "block"}
        found = {}
        for scale_name, scale in checkpoint.tensors.items():
            if not scale_name.endswith(".weight" + SCALE_SUFFIX):
                continue
            name = scale_name.removesuffix(SCALE_SUFFIX)
            weight = checkpoint.tensors.get(name)
            if weight is None:
                raise CheckpointError(
                    f"{where} holds {scale_name} but not the weight {name} it scales; the checkpoint "
                    "is incomplete."
                )
            layout = None
            if weight.dtype == "F8_E4M3" and len(weight.shape) == 2 and scale.dtype in SCALE_DTYPES:
                layout = _layout(tuple(weight.shape), scale, strategies, blocks_of)
            if layout is None:
                rows = weight.shape[0] if weight.shape else "out"
                expected = [[1]] * ("tensor" in strategies) + [[rows, 1]] * ("channel" in strategies)
                expected += [
                    list(blocks(tuple(weight.shape), b)) for b in sorted(blocks_of) if len(weight.shape) == 2
                ]
                raise CheckpointError(
                    f"{scale_name} in {scale.path} is {scale.dtype} {list(scale.shape)} beside {name}, "
                    f"{weight.dtype} {list(weight.shape)}; compressed-tensors FP8 as its config describes "
                    f"({', '.join(sorted(strategies)) or 'no weight strategy'}) needs 2-D F8_E4M3 codes "
                    f"with F32, BF16 or F16 scales of shape {' or '.join(map(str, expected)) or '(none)'}."
                )
            companions = {"scale": scale}
            names = {"scale": scale_name}
            input_scale = name.removesuffix("weight") + INPUT_SCALE
            if input_scale in checkpoint.tensors:
                companions[INPUT_SCALE] = checkpoint.tensors[input_scale]
                names[INPUT_SCALE] = input_scale
            found[name] = Stored(self, name, weight, companions, names, layout)
        return found

    def row_band(self, stored: Stored | None) -> int:
        return stored.params.block[0] if stored is not None else 1

    def describe(self, stored: Stored) -> str:
        layout: Layout = stored.params
        if layout.strategy == "block":
            shared = f"{layout.block[0]}×{layout.block[1]} blocks"
        else:
            shared = "per-channel scales" if layout.strategy == "channel" else "per-tensor scale"
        return f"compressed-tensors FP8 (e4m3, {shared}, {layout.scale_dtype})"

    def prepare(
        self,
        stored: Stored | None,
        load: Callable[[TensorRef], torch.Tensor],
        rounding: Rounding,
        device: torch.device | str,
    ) -> Bands:
        import torch

        assert stored is not None
        layout: Layout = stored.params
        scale = load(stored.companions["scale"]).to(device=device, dtype=torch.float32)
        extra = {role: load(ref) for role, ref in stored.companions.items() if role != "scale"}
        if layout.strategy == "tensor":
            rows = stored.weight.shape[0]
            return TensorBands(stored, scale.reshape(1, 1).expand(rows, 1).clone(), rounding, extra)
        return CompressedBands(
            stored, scale.reshape(blocks(tuple(stored.weight.shape), layout.block)), rounding, extra
        )


class CompressedBands(Fp8Bands):
    """Block FP8's bands on a compressed-tensors weight: its scales in their own dtype, and the
    companions that encoding leaves as they are (`input_scale`)."""

    def __init__(self, stored: Stored, scale: torch.Tensor, rounding: Rounding, extra: dict) -> None:
        self.layout: Layout = stored.params
        super().__init__(stored, scale, rounding, self.layout.block)
        self.scale_dtype = self.layout.scale_dtype
        self.stored = stored
        self.extra = extra

    def derived(self) -> dict[str, torch.Tensor]:
        from bonemerge.checkpoint.dtypes import to_torch

        ref = self.stored.companions["scale"]
        scale = self._written_scale().cpu().to(to_torch(ref.dtype))
        return {"scale": scale.reshape(tuple(ref.shape)), **self.extra}

    def _written_scale(self) -> torch.Tensor:
        return self.scale


class TensorBands(CompressedBands):
    """A weight with one scale (`scale` holds it once per row, as a channel weight's would). A
    first pass finds the largest merged magnitude; where it overflows the stored scale, the
    weight is encoded by other bands, on the new scale, while these still decode its stored
    rows on the old one."""

    needs_pass = True

    def __init__(
        self, stored: Stored, scale: torch.Tensor, rounding: Rounding, extra: dict, rescaled: bool = False
    ) -> None:
        super().__init__(stored, scale, rounding, extra)
        self._amax: torch.Tensor | None = None
        #: whether these bands encode on a new scale (the tensor's one rescaled block)
        self._rescaled = rescaled
        if rescaled:
            self.encoded.rescaled.append((0, 0))

    def observe(self, values: torch.Tensor, row0: int) -> None:
        import torch

        amax = values.abs().max() if values.numel() else values.new_zeros(())
        self._amax = amax if self._amax is None else torch.maximum(self._amax, amax)

    def observed(self) -> Bands:
        if self._amax is None:
            return self
        stored = self.stored_scale[0, 0].to(self._amax.dtype)
        if not float(self._amax / stored) > OVERFLOW * (1 - PASS_MARGIN):
            return self
        new = self.new_scale(self._amax.double())
        rows = self.stored_scale.shape[0]
        return TensorBands(
            self.stored, new.reshape(1, 1).expand(rows, 1).clone(), self.rounding, self.extra, True
        )

    def _written_scale(self) -> torch.Tensor:
        """The one scale the weight was encoded on, as a [1] tensor; a row that got a scale of
        its own while encoding would break the format, which the first pass rules out."""
        rows = self.encoded.rescaled[1:] if self._rescaled else self.encoded.rescaled
        if rows:
            raise MergeError(
                f"encoding {self.name} found rows {rows[:3]} beyond its one scale after its first pass "
                "said the tensor fits; this is a bug in bonemerge, please report it."
            )
        return self.scale[:1, 0]


COMPRESSED_FP8 = CompressedFp8()
