"""bitsandbytes 4-bit weights (NF4 and FP4, the `*-bnb-4bit` repos; REFERENCE.md §9).

transformers' `save_pretrained` of a 4-bit model stores each quantized `X.weight` as uint8
[out·in/2, 1], two 4-bit codes a byte (high nibble first, in row-major order of the [out, in]
weight), beside `X.weight.absmax` (one scale per `blocksize` values), `X.weight.quant_map`
(the 16 code values) and `X.weight.quant_state.bitsandbytes__nf4` (uint8 bytes of a JSON
object: quant type, block size, shape, dtype). With double quantization ("nested") the
absmax are themselves uint8 codes into `nested_quant_map`, scaled per `nested_blocksize` by
`nested_absmax`, plus `nested_offset`.

bonemerge reads these and writes a dense model: value = table[code] × absmax in float32,
rounded to the dtype the weight was quantized from, which is what bitsandbytes'
`dequantize_4bit` returns, bit for bit. It does not write bitsandbytes: a merged model is
quantized again, if wanted, by loading it with `load_in_4bit`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bonemerge.codecs.base import Bands, Codec, Rounding, Stored, ceil_div
from bonemerge.errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from bonemerge.checkpoint import Checkpoint, TensorRef

QUANT_STATE = re.compile(r"^(?P<weight>.+)\.quant_state\.bitsandbytes__(?P<kind>nf4|fp4)$")
# bitsandbytes' code tables (its `backends/utils.py`): what its dequantization uses, whatever
# a file's `quant_map` says, so a file whose `quant_map` differs is refused.
# fmt: off
TABLES = {
    "nf4": (
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ),
    "fp4": (
        0.0, 0.0052083334885537624, 0.6666666865348816, 1.0,
        0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
        0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
        -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
    ),
}
# fmt: on
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass(frozen=True)
class Bnb4Params:
    """What a weight's quant state says: code table, block size, the dense dtype and shape it
    was quantized from, and for double quantization the nested block size and offset."""

    kind: str
    blocksize: int
    dtype: str
    shape: tuple[int, int]
    nested_blocksize: int | None = None
    nested_offset: float = 0.0

    @property
    def blocks(self) -> int:
        return ceil_div(math.prod(self.shape), self.blocksize)


class Bnb4(Codec):
    name = "bnb_4bit"
    values_per_code = 2
    encodes = False

    def find(self, checkpoint: Checkpoint, config: Mapping) -> dict[str, Stored]:
        found = {}
        for state_name, state in checkpoint.tensors.items():
            match = QUANT_STATE.match(state_name)
            if match is None:
                continue
            name = match.group("weight")
            weight = checkpoint.tensors.get(name)
            if weight is None:
                raise CheckpointError(
                    f"{checkpoint.root} holds {state_name} but not the 4-bit weight {name} it describes; "
                    "the checkpoint is incomplete."
                )
            params = _params(state_name, state, match.group("kind"))
            names = {"quant_state": state_name} | {
                role: f"{name}.{role}"
                for role in ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
                if f"{name}.{role}" in checkpoint.tensors
            }
            companions = {role: checkpoint.tensors[key] for role, key in names.items()}
            _check(name, weight, companions, params)
            found[name] = Stored(self, name, weight, companions, names, params)
        return found

    def row_band(self, stored: Stored | None) -> int:
        """Rows that hold whole blocks: a band never splits a block between two chunks."""
        assert stored is not None
        columns = stored.params.shape[1]
        return stored.params.blocksize // math.gcd(columns, stored.params.blocksize)

    def grid(self, stored: Stored) -> tuple[int, int]:
        rows, columns = stored.params.shape
        return rows, columns // 2

    def dense_dtype(self, stored: Stored) -> str:
        return stored.params.dtype

    def describe(self, stored: Stored) -> str:
        kind = stored.params.kind.upper()
        double = ", double-quantized scales" if stored.params.nested_blocksize else ""
        return f"bitsandbytes {kind} ({stored.params.blocksize}-value blocks{double})"

    def prepare(
        self,
        stored: Stored | None,
        load: Callable[[TensorRef], torch.Tensor],
        rounding: Rounding,
        device: torch.device | str,
    ) -> Bands:
        import torch

        assert stored is not None
        params: Bnb4Params = stored.params
        table = torch.tensor(TABLES[params.kind], dtype=torch.float32)
        stored_map = load(stored.companions["quant_map"]).float()
        if not torch.equal(stored_map.view(torch.int32), table.view(torch.int32)):
            raise CheckpointError(
                f"{stored.names['quant_map']} is not bitsandbytes' {params.kind} code table, which its "
                "dequantization uses; the file was not written by bitsandbytes or is damaged."
            )
        absmax = load(stored.companions["absmax"])
        if params.nested_blocksize:
            absmax = _nested(
                absmax,
                load(stored.companions["nested_absmax"]),
                load(stored.companions["nested_quant_map"]),
                params,
            )
        return Bnb4Bands(table.to(device), absmax.float().to(device), params)


def _params(state_name: str, state: TensorRef, kind: str) -> Bnb4Params:
    from bonemerge.checkpoint.tensors import load_whole

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(
            f"{state_name} in {state.path} {why}; it is not a bitsandbytes 4-bit quant state bonemerge "
            "can read (re-save the model with a current bitsandbytes, or merge into the unquantized model)."
        )

    if state.dtype != "U8" or state.nbytes > 1 << 16:
        raise refuse(f"is {state.dtype} {list(state.shape)}, not a short uint8 JSON text")
    try:
        fields = json.loads(bytes(load_whole(state).view(-1).tolist()))
    except (UnicodeDecodeError, ValueError):
        raise refuse("does not hold JSON") from None
    if not isinstance(fields, dict):
        raise refuse("does not hold a JSON object")
    shape = fields.get("shape")
    blocksize = fields.get("blocksize")
    nested = fields.get("nested_blocksize")
    checks = [
        (fields.get("quant_type") == kind, f"says quant_type {fields.get('quant_type')!r}, not {kind!r}"),
        (blocksize in BLOCK_SIZES, f"has blocksize {blocksize!r}"),
        (fields.get("dtype") in DTYPES, f"has dtype {fields.get('dtype')!r}"),
        (
            isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape),
            f"has shape {shape!r}, not that of a Linear weight",
        ),
        (nested is None or nested in BLOCK_SIZES, f"has nested_blocksize {nested!r}"),
        (
            nested is None or isinstance(fields.get("nested_offset"), int | float),
            "has no numeric nested_offset",
        ),
    ]
    for ok, why in checks:
        if not ok:
            raise refuse(why)
    if shape[1] % 2:
        raise refuse(f"has shape {shape}, with an odd number of columns two codes a byte cannot pack by row")
    offset = float(fields.get("nested_offset", 0.0))
    return Bnb4Params(kind, blocksize, DTYPES[fields["dtype"]], (shape[0], shape[1]), nested, offset)


def _check(name: str, weight: TensorRef, companions: Mapping[str, TensorRef], params: Bnb4Params) -> None:
    """Every tensor of one 4-bit weight has the dtype and size its quant state implies."""
    nested = params.nested_blocksize
    expected = {
        "absmax": ("U8" if nested else "F32", params.blocks),
        "quant_map": ("F32", 16),
    }
    if nested:
        expected["nested_absmax"] = ("F32", ceil_div(params.blocks, nested))
        expected["nested_quant_map"] = ("F32", 256)
    packed = math.prod(params.shape) // 2
    problems = []
    if weight.dtype != "U8" or weight.nbytes != packed:
        problems.append(f"{name} is {weight.dtype} {list(weight.shape)}, not uint8 holding {packed} bytes")
    for role, (dtype, count) in expected.items():
        ref = companions.get(role)
        if ref is None:
            problems.append(f"{name}.{role} is missing")
        elif ref.dtype != dtype or math.prod(ref.shape) != count:
            problems.append(f"{name}.{role} is {ref.dtype} {list(ref.shape)}, not {dtype} [{count}]")
    if problems:
        raise CheckpointError(
            f"{weight.path}: {problems[0]} (for a {params.kind} weight of shape {list(params.shape)} "
            f"in {params.blocksize}-value blocks); the checkpoint is incomplete or damaged."
        )


def _nested(
    codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, params: Bnb4Params
) -> torch.Tensor:
    """Double-quantized absmax as bitsandbytes restores them: table[code] × the nested block's
    scale in float32, then + offset."""
    import torch

    values = table.float()[codes.view(-1).long()]
    nested = params.nested_blocksize
    assert nested is not None
    index = torch.arange(values.numel()) // nested
    values *= scales.float().view(-1)[index]
    values += torch.tensor(params.nested_offset, dtype=torch.float32)
    return values


class Bnb4Bands(Bands):
    values_per_code = 2

    def __init__(self, table: torch.Tensor, absmax: torch.Tensor, params: Bnb4Params) -> None:
        super().__init__()
        self.table = table
        self.absmax = absmax
        self.params = params

    def decode(self, stored: torch.Tensor, out: torch.Tensor, row0: int, encoded: bool = False) -> None:
        """table[code] × absmax in float32, rounded to the weight's own dtype (as bitsandbytes
        dequantizes), then into `out`: exact when `out` is as wide or wider."""
        import torch

        from bonemerge.checkpoint import dtypes

        rows = stored.shape[0]
        columns = self.params.shape[1]
        codes = torch.stack([stored >> 4, stored & 0x0F], dim=-1).view(rows, columns)
        values = self.table[codes.long()].view(-1)
        size = self.params.blocksize
        first = row0 * columns
        if first % size == 0 and values.numel() % size == 0:
            scales = self.absmax[first // size : (first + values.numel()) // size]
            values.view(-1, size).mul_(scales.view(-1, 1))
        else:
            index = torch.arange(first, first + values.numel(), device=values.device) // size
            values.mul_(self.absmax[index])
        values = values.view(rows, columns)
        own = dtypes.to_torch(self.params.dtype)
        out.copy_(values if out.dtype == own else values.to(own))

    def encode(self, values: torch.Tensor, out: torch.Tensor, row0: int) -> None:
        raise AssertionError("bitsandbytes 4-bit weights are written dequantized, never encoded")


BNB_4BIT = Bnb4()
