"""IA³ (PEFT `IA3`): a learned vector that scales a layer's outputs, or its inputs.

PEFT keeps one vector `ia3_l` per layer: `[out, 1]` for an ordinary layer, whose merge scales
each output (the weight's output dimension, and the layer's bias where it has one), and
`[1, in]` for a layer listed in `feedforward_modules`, whose merge scales each input column of
the weight and leaves the bias alone. A Linear stores `out x in` and GPT-2's Conv1D `in x out`,
so the vector runs along the stored rows or the stored columns; either way a chunk of rows
needs only the vector, and the weight streams in bounded memory.

PEFT 0.18.1's `merge_and_unload()` multiplies the weight by the vector in the promoted dtype
(fp32 for 16-bit and fp32 weights) and rounds once, which is what bonemerge does, so merges
equal PEFT's bit for bit. Unmerging divides by the vector (PEFT divides by `l + 1e-8`, which
is not the inverse of its merge); a zero in the vector wiped out what it scaled, so such an
adapter cannot be taken out and unmerge refuses it.

Error bound (`bonemerge.verification.tolerance`): one product per element, error ≤ γ₁·|W|·|l|, and an
input error ε is carried as ε·|l|.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from bonemerge.errors import AdapterError, MergeError, shown
from bonemerge.methods import layouts
from bonemerge.methods.base import (
    PREFIX,
    About,
    AdapterConfig,
    Block,
    BlockOp,
    BlockSettings,
    KeyClaim,
    Method,
    Reduction,
    RowMaths,
    Target,
)

if TYPE_CHECKING:
    import torch

    from bonemerge.checkpoint import Source

_SUFFIX = "ia3_l"
_TRAINING = re.compile(r"^(?P<module>.+)\.ia3_l\.(?P<name>[^.]+)$")


@dataclass(frozen=True)
class IA3Settings:
    """What an IA³ config says about the maths: which layers scale their inputs (PEFT's
    `feedforward_modules`, a regex or a list of names) and the saved `fan_in_fan_out`."""

    feedforward: str | tuple[str, ...]
    fan_in_fan_out: bool


@dataclass(frozen=True)
class IA3Params(BlockSettings):
    """One layer's IA³: whether it scales inputs (`feedforward`) and whether its weight is
    stored in x out (`transposed`, a Conv1D; decided from the base in `fit`)."""

    feedforward: bool
    transposed: bool

    @property
    def along_rows(self) -> bool:
        """Whether the vector runs along the stored rows (outputs of a Linear, inputs of a Conv1D)."""
        return self.feedforward == self.transposed


def is_feedforward(feedforward: str | tuple[str, ...], module: str) -> bool:
    """PEFT's `_check_target_module_feedforward`: a regex matched in full, or a list of names
    matched as plain suffixes of the module's path."""
    if isinstance(feedforward, str):
        from bonemerge.adapters.patterns import compiled

        program = compiled(feedforward)
        return program is not None and program.fullmatch(module) is not None
    return any(module.endswith(name) for name in feedforward)


class Scale(RowMaths):
    """Multiply each row (`along_rows`) or each column of the chunk by the vector."""

    def __init__(self, vector: torch.Tensor, along_rows: bool) -> None:
        self.vector = vector.reshape(-1)
        self.along_rows = along_rows

    def _factor(self, work: torch.Tensor, row0: int) -> torch.Tensor:
        if self.along_rows:
            return self.vector[row0 : row0 + work.shape[0]].unsqueeze(1)
        return self.vector

    def merge(self, work: torch.Tensor, row0: int) -> None:
        work.mul_(self._factor(work, row0))

    def unmerge(self, work: torch.Tensor, row0: int) -> None:
        work.div_(self._factor(work, row0))


def _read_feedforward(raw: dict, path: Path) -> str | tuple[str, ...]:
    value = raw.get("feedforward_modules")
    if value is None:
        return ()
    if isinstance(value, str):
        from bonemerge.adapters.patterns import check_pattern

        check_pattern(value, "feedforward_modules", path)
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise AdapterError(
        f"{path} has feedforward_modules={shown(value)}; it must be a regular expression or a list of "
        "module names."
    )


class IA3Method(Method):
    name = "IA³"
    kind_names: ClassVar[dict[str, str]] = {"IA3": "IA³"}
    variants = ("IA³",)

    # -- naming ---------------------------------------------------------------------------
    def about(self, config: AdapterConfig) -> About:
        settings: IA3Settings = config.settings
        feedforward = settings.feedforward
        shown_ff = feedforward if isinstance(feedforward, str) else ", ".join(sorted(feedforward))
        text = f"IA³ (feedforward: {shown_ff})" if feedforward else "IA³"
        identity = {
            "feedforward_modules": feedforward if isinstance(feedforward, str) else sorted(feedforward),
            "fan_in_fan_out": settings.fan_in_fan_out,
        }
        return About(text, "ia3", identity)

    # -- file format ----------------------------------------------------------------------
    def read_config(self, peft_type: str, raw: dict, path: Path) -> IA3Settings:
        flag = raw.get("fan_in_fan_out", False)
        if not isinstance(flag, bool):
            raise AdapterError(f"{path} has fan_in_fan_out={shown(flag)}; it must be true or false.")
        return IA3Settings(_read_feedforward(raw, path), flag)

    def claim(self, name: str, config: AdapterConfig) -> KeyClaim | None:
        if name.endswith("." + _SUFFIX):
            return KeyClaim(name[: -len(_SUFFIX) - 1], "l")
        return None

    def claim_training(self, name: str) -> KeyClaim | None:
        found = _TRAINING.match(name)
        return KeyClaim(found["module"], "l", found["name"], "IA3") if found else None

    def make_block(
        self, module: str, parts: dict[str, Source], keys: dict[str, str], config: AdapterConfig, where: Path
    ) -> Block:
        settings: IA3Settings = config.settings
        shape = tuple(parts["l"].shape)
        feedforward = is_feedforward(settings.feedforward, module)
        if len(shape) != 2:
            raise AdapterError(
                f"{keys['l']} in {where} has shape {list(shape)}: IA³ on a convolution, which bonemerge "
                "does not merge (Linear and Conv1D only); use PEFT's merge_and_unload for it."
            )
        if (shape[0] != 1) if feedforward else (shape[1] != 1):
            expected = "[1, in] (feedforward_modules lists it)" if feedforward else "[out, 1]"
            raise AdapterError(
                f"{keys['l']} in {where} has shape {list(shape)}, but adapter_config.json calls for "
                f"{expected}; the config and weights disagree."
            )
        return Block(module, self, parts, keys, IA3Params(feedforward, settings.fan_in_fan_out))

    def infer_config(
        self,
        peft_type: str,
        blocks: list[tuple[str, dict[str, Source]]],
        base_shapes: dict,
        saved: list[str],
        where: Path,
    ) -> AdapterConfig:
        """The feedforward layers are the ones whose vector spans the inputs ([1, in])."""
        feedforward = sorted(
            m for m, parts in blocks if parts["l"].shape[0] == 1 and parts["l"].shape[-1] != 1
        )
        raw = {
            "peft_type": peft_type,
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m, _ in blocks}),
            "feedforward_modules": feedforward,
            "fan_in_fan_out": False,
            "modules_to_save": sorted({m.rsplit(".", 1)[0] for m in saved}) or None,
            "inference_mode": True,
            "base_model_name_or_path": None,
            "task_type": None,
        }
        return AdapterConfig(self, peft_type, IA3Settings(tuple(feedforward), False), raw)

    def file_keys(self, block: Block, peft_type: str) -> dict[str, str]:
        return {"l": f"{PREFIX}{block.module}.{_SUFFIX}"}

    def reduced_config(self, raw: dict, reduction: Reduction) -> dict:
        """PEFT requires `feedforward_modules` to be a subset of a listed `target_modules`: once
        the kept modules are listed by path, so are the feedforward ones among them."""
        config = super().reduced_config(raw, reduction)
        if reduction.filtered:
            feedforward = _read_feedforward(raw, Path("adapter_config.json"))
            config["feedforward_modules"] = sorted(
                m for m in reduction.kept if is_feedforward(feedforward, m)
            )
        return config

    # -- maths ----------------------------------------------------------------------------
    def fit(
        self,
        blocks: Sequence[tuple[Block, str]],
        shapes: Mapping[str, tuple[int, ...]],
        dtypes: Mapping[str, str],
        model: Mapping,
        where: Path,
    ) -> tuple[list[Block], list[str]]:
        """Each layer's layout, as PEFT decides it: by the layer it wraps (see `layouts`)."""
        rule = layouts.conv1d_rule(model)
        fitted = []
        for block, module in blocks:
            params: IA3Params = block.params
            shape = shapes.get(module + ".weight") or ()
            length = math.prod(block.parts["l"].shape)
            spans = 1 if params.feedforward else 0  # the dimension of a Linear weight it scales
            fits_linear = len(shape) == 2 and shape[spans] == length
            fits_conv1d = len(shape) == 2 and shape[1 - spans] == length
            transposed = layouts.stored_transposed(module, rule, fits_linear, fits_conv1d, params.transposed)
            fitted.append(replace(block, params=replace(params, transposed=transposed)))
        return fitted, []

    def targets(self, block: Block) -> tuple[Target, ...]:
        if block.params.feedforward:
            return (Target("weight"),)
        return (Target("weight"), Target("bias", "bias", optional=True))

    def check_target(
        self, block: Block, target: Target, name: str, shape: tuple[int, ...], where: str, inverse: bool
    ) -> None:
        params: IA3Params = block.params
        length = math.prod(block.parts["l"].shape)
        if target.part == "bias":
            if tuple(shape) != (length,):
                raise AdapterError(
                    f"{where} scales {length} outputs, but the bias {name} has shape {list(shape)}; "
                    "is this adapter for this base model?"
                )
            return
        if len(shape) != 2:
            raise AdapterError(
                f"{where} targets {name} of shape {list(shape)}, which is not a Linear or Conv1D weight."
            )
        dimension = 0 if params.along_rows else 1
        if shape[dimension] != length:
            what = "inputs" if params.feedforward else "outputs"
            layout = "a Conv1D weight stored in x out" if params.transposed else "a Linear weight out x in"
            raise AdapterError(
                f"{where} scales {length} {what}, but {name} is {list(shape)}, which as {layout} has "
                f"{shape[dimension]}; is this adapter for this base model?"
            )

    def prepare(
        self,
        op: BlockOp,
        load: Callable[[str], torch.Tensor],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | str,
        precision: str,
    ) -> RowMaths:
        # the compute dtype is PEFT's promoted one (fp32 for 16-bit and fp32 weights)
        vector = load("l").to(device=device, dtype=dtype)
        along_rows = op.target.part == "bias" or op.block.params.along_rows
        return Scale(vector, along_rows)

    def check_inverse(self, block: Block, load: Callable[[str], torch.Tensor]) -> None:
        zeros = int((load("l") == 0).sum())
        if zeros:
            raise MergeError(
                f"its vector holds {zeros} zero{'s' * (zeros != 1)}, which erased what they scaled, so "
                "the merge cannot be undone"
            )


IA3 = IA3Method()
