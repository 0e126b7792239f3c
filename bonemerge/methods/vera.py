"""VeRA (PEFT `VERA`): one pair of random projections for the whole adapter, scaled per layer.

PEFT draws `vera_A` [r, in_max] and `vera_B` [out_max, r] once per adapter, sized by the
largest input and output of the layers it targets, and trains two vectors per layer,
`vera_lambda_d` [r] and `vera_lambda_b` [out]. A layer with `in` inputs and `out` outputs
uses the leading slices: `ΔW = (λ_b ⊙ B[:out]) @ (λ_d ⊙ A[:, :in])`, transposed for GPT-2's
Conv1D. So a VeRA layer is a LoRA at scale 1 with `B' = λ_b ⊙ B[:out]` and `A' = λ_d ⊙ A[:, :in]`,
and merges with LoRA's row maths, in bounded memory.

The projections are stored once (`base_model.vera_A`, `base_model.vera_B`, when the config's
`save_projection` is true, PEFT's default) and are adapter-wide tensors (`Block.shared`):
counted once by inspect, hashed once by fingerprints, written once by strip. PEFT 0.18.1 does
not read them back: on every load it draws them again from `projection_prng_key` (a CPU
`torch.Generator`, Kaiming-uniform bounds), sized by the widest input and output among the
layers the config targets (the saved keys lack the adapter name and are dropped as
unexpected). For an adapter PEFT trained they are the same numbers, which bonemerge reads from
the file; with `save_projection` false there is nothing to read, and bonemerge draws them as
PEFT does, once the base's layers give the widths (`fit`). A filtered `strip` that leaves out
the widest layer would make PEFT draw other projections for every kept layer, so it is
refused, naming what to keep (the input widths come from the base).

Precision follows PEFT 0.18.1's `merge_and_unload()`: the scaled projections and their
product in fp32 (fp64 with `--precision fp64`), added to the weight and rounded once, so
merges equal PEFT's bit for bit.

Error bound (`bonemerge.verification.tolerance`): as LoRA's with r + 2 terms (the scalings of A and B
round once each), γ_(r+4)·(|W| + |λ_b ⊙ B|@|λ_d ⊙ A|).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from bonemerge.errors import AdapterError, shown
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
    import numpy as np
    import torch

    from bonemerge.checkpoint import Source
    from bonemerge.output.sketch import Sketch

# file keys: per layer under `base_model.model.<module>.`, the projections under `base_model.`
_LAYER_PARTS = {"vera_lambda_b": "lambda_b", "vera_lambda_d": "lambda_d"}
_SHARED_PARTS = {"base_model.vera_A": "A", "base_model.vera_B": "B"}
_TRAINING = re.compile(r"^(?P<module>.+)\.(?P<part>vera_lambda_[bd])\.(?P<name>[^.]+)$")
# a PeftModel's state dict holds the projections beside the model and again in every layer
# (each layer refers to them); a trainer that drops shared storage keeps any one of the names
_TRAINING_SHARED = re.compile(r"^(?:.+\.)?vera_(?P<part>[AB])\.(?P<name>[^.]+)$")


@dataclass(frozen=True)
class VeraSettings:
    """What a VeRA config says about the maths: the rank and the saved `fan_in_fan_out`."""

    r: int
    fan_in_fan_out: bool
    save_projection: bool
    prng_key: int


@dataclass(frozen=True)
class VeraParams(BlockSettings):
    """One layer's VeRA: whether its weight is stored in x out (a Conv1D; decided in `fit`),
    and, for an adapter saved without its projections, the rank and key to draw them from."""

    transposed: bool
    drawn: tuple[int, int] | None = None  # (r, projection_prng_key)


def draw_projections(r: int, key: int, in_max: int, out_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT 0.18.1's `_init_vera_A_vera_B`: vera_A [r, in_max] then vera_B [out_max, r] from one
    CPU generator seeded with `key`, each uniform in ±√3·√2/√fan_in (`_kaiming_init`), with the
    same float operations, so the numbers are PEFT's to the bit."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(key)

    def kaiming(shape: tuple[int, int]) -> torch.Tensor:
        bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)

    a = kaiming((r, in_max))
    return a, kaiming((out_max, r))


def _flag(raw: dict, key: str, default: bool, path: Path) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise AdapterError(f"{path} has {key}={shown(value)}; it must be true or false.")
    return value


def _sliced(block: Block, load: Callable[[str], torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype):
    """`λ_b ⊙ B[:out]` and `λ_d ⊙ A[:, :in]` in `dtype`, as PEFT forms them."""
    transposed = block.params.transposed
    out_features, in_features = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
    a = load("A").to(dtype)[:, :in_features]
    b = load("B").to(dtype)[:out_features, :]
    left = load("lambda_b").to(dtype).unsqueeze(-1) * b
    right = load("lambda_d").to(dtype).unsqueeze(-1) * a
    return left, right


class VeraMethod(Method):
    name = "VeRA"
    kind_names: ClassVar[dict[str, str]] = {"VERA": "VeRA"}
    variants = ("VeRA",)

    # -- naming ---------------------------------------------------------------------------
    def about(self, config: AdapterConfig) -> About:
        settings: VeraSettings = config.settings
        return About(
            f"VeRA (r={settings.r})", "vera", {"r": settings.r, "fan_in_fan_out": settings.fan_in_fan_out}
        )

    # -- file format ----------------------------------------------------------------------
    def read_config(self, peft_type: str, raw: dict, path: Path) -> VeraSettings:
        r = raw.get("r", 256)
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise AdapterError(f"{path} has r={shown(r)}; r must be a positive integer.")
        key = raw.get("projection_prng_key", 0)
        if not isinstance(key, int) or isinstance(key, bool):
            raise AdapterError(f"{path} has projection_prng_key={shown(key)}; it must be an integer.")
        return VeraSettings(
            r, _flag(raw, "fan_in_fan_out", False, path), _flag(raw, "save_projection", True, path), key
        )

    def claim(self, name: str, config: AdapterConfig) -> KeyClaim | None:
        # `name` has `base_model.model.` removed; the projections sit under `base_model.` only
        if name in _SHARED_PARTS:
            return KeyClaim("", _SHARED_PARTS[name], shared=True)
        for suffix, part in _LAYER_PARTS.items():
            if name.endswith("." + suffix):
                return KeyClaim(name[: -len(suffix) - 1], part)
        return None

    def claim_training(self, name: str) -> KeyClaim | None:
        if found := _TRAINING_SHARED.match(name):
            return KeyClaim("", found["part"], found["name"], "VERA", shared=True)
        if found := _TRAINING.match(name):
            return KeyClaim(found["module"], _LAYER_PARTS[found["part"]], found["name"], "VERA")
        return None

    def check_shared(self, shared: Mapping[str, Source], config: AdapterConfig, where: Path) -> None:
        settings: VeraSettings = config.settings
        if not settings.save_projection:
            if shared:
                raise AdapterError(
                    f"{where} holds vera_A and vera_B but adapter_config.json says save_projection: false, "
                    "so PEFT would ignore them and draw its own; the config and weights disagree."
                )
            return
        missing = [f"base_model.vera_{part}" for part in ("A", "B") if part not in shared]
        if missing:
            raise AdapterError(
                f"{where} holds no {missing[0]}, which a VeRA adapter saved with save_projection: true "
                "must have; the adapter was not saved completely."
            )
        a, b, r = tuple(shared["A"].shape), tuple(shared["B"].shape), settings.r
        if len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r:
            raise AdapterError(
                f"{where} holds vera_A {list(a)} and vera_B {list(b)}, but r={r} in adapter_config.json "
                f"calls for [{r}, in] and [out, {r}]; the config and weights disagree."
            )

    def make_block(
        self, module: str, parts: dict[str, Source], keys: dict[str, str], config: AdapterConfig, where: Path
    ) -> Block:
        settings: VeraSettings = config.settings
        missing = [part for part in ("lambda_b", "lambda_d") if part not in parts]
        if missing:
            raise AdapterError(
                f"{where} holds no vera_{missing[0]} for {module}; the adapter was not saved completely."
            )
        d, b = tuple(parts["lambda_d"].shape), tuple(parts["lambda_b"].shape)
        if d != (settings.r,) or len(b) != 1:
            raise AdapterError(
                f"{keys['lambda_d']} and {keys['lambda_b']} in {where} have shapes {list(d)} and {list(b)}, "
                f"but VeRA's are [r] = [{settings.r}] and [out]; the config and weights disagree."
            )
        if "B" in parts and b[0] > parts["B"].shape[0]:
            raise AdapterError(
                f"{keys['lambda_b']} in {where} scales {b[0]} outputs, but vera_B has only "
                f"{parts['B'].shape[0]} rows; the adapter is damaged."
            )
        drawn = None if settings.save_projection else (settings.r, settings.prng_key)
        return Block(module, self, parts, keys, VeraParams(settings.fan_in_fan_out, drawn))

    def infer_config(
        self,
        peft_type: str,
        blocks: list[tuple[str, dict[str, Source]]],
        base_shapes: dict,
        saved: list[str],
        where: Path,
    ) -> AdapterConfig:
        """The rank is the length of every λ_d; the projections were saved (they are in the file)."""
        ranks = {tuple(parts["lambda_d"].shape) for _, parts in blocks if "lambda_d" in parts}
        if len(ranks) != 1 or len(next(iter(ranks))) != 1:
            raise AdapterError(
                f"the vera_lambda_d vectors in {where} do not share one rank; put the adapter's "
                "adapter_config.json next to the checkpoint."
            )
        r = next(iter(ranks))[0]
        raw = {
            "peft_type": peft_type,
            "r": r,
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m, _ in blocks}),
            "save_projection": True,
            "fan_in_fan_out": False,
            "modules_to_save": sorted({m.rsplit(".", 1)[0] for m in saved}) or None,
            "bias": "none",
            "inference_mode": True,
            "base_model_name_or_path": None,
            "task_type": None,
        }
        return AdapterConfig(self, peft_type, VeraSettings(r, False, True, 0), raw)

    def file_keys(self, block: Block, peft_type: str) -> dict[str, str]:
        stem = f"{PREFIX}{block.module}"
        keys = {"lambda_b": f"{stem}.vera_lambda_b", "lambda_d": f"{stem}.vera_lambda_d"}
        return keys | {part: key for key, part in _SHARED_PARTS.items()}

    def needs_base(self, config: AdapterConfig, peft_type: str, filtered: bool) -> bool:
        # the projections are cut to the kept layers' widths, which only the base knows
        return filtered

    def reduced_shared(
        self, blocks: Sequence[Block], peft_type: str, reduction: Reduction
    ) -> dict[str, Source]:
        """The projections as they are, once the kept layers are known to span the widest
        output (the longest λ_b) and the widest input (from the base) of the whole adapter:
        PEFT sizes the projections it draws on load by them (see the module docstring)."""
        if reduction.filtered:
            kept = _widths(blocks, reduction.weights)
            whole = _widths(reduction.whole, reduction.weights)
            if kept != whole:
                raise AdapterError(
                    f"the layers kept span {kept[0]} inputs and {kept[1]} outputs, but the whole adapter "
                    f"spans {whole[0]} and {whole[1]}: PEFT draws VeRA's projections again on every "
                    "load, sized by the layers the config targets, so the reduced adapter would compute "
                    "other updates; keep a layer as wide as the widest (or merge the adapter instead)."
                )
        return super().reduced_shared(blocks, peft_type, reduction)

    # -- maths ----------------------------------------------------------------------------
    def fit(
        self,
        blocks: Sequence[tuple[Block, str]],
        shapes: Mapping[str, tuple[int, ...]],
        dtypes: Mapping[str, str],
        model: Mapping,
        where: Path,
    ) -> tuple[list[Block], list[str]]:
        """Each layer's layout, as PEFT decides it: by the layer it wraps (see `layouts`); for
        an adapter saved without its projections, the projections PEFT draws for these layers."""
        rule = layouts.conv1d_rule(model)
        fitted, widths, stored = [], {}, set()
        for block, module in blocks:
            shape = shapes.get(module + ".weight") or ()
            out = block.parts["lambda_b"].shape[0]
            width = block.parts["A"].shape[1] if "A" in block.parts else math.inf
            fits_linear = len(shape) == 2 and shape[0] == out and shape[1] <= width
            fits_conv1d = len(shape) == 2 and shape[1] == out and shape[0] <= width
            transposed = layouts.stored_transposed(
                module, rule, fits_linear, fits_conv1d, block.params.transposed
            )
            if len(shape) == 2:
                widths[module] = shape[0] if transposed else shape[1]
                stored.add(dtypes[module + ".weight"])
            fitted.append(replace(block, params=replace(block.params, transposed=transposed)))
        drawn = fitted[0].params.drawn if fitted else None
        if drawn is None or not widths:
            return fitted, []
        out_max = max(block.parts["lambda_b"].shape[0] for block in fitted)
        a, b = draw_projections(*drawn, max(widths.values()), out_max)
        # PEFT casts them to the layers' dtype, then back to fp32 (`cast_adapter_dtype`)
        if len(stored) == 1 and (half := next(iter(stored))) in ("BF16", "F16"):
            from bonemerge.checkpoint import dtypes as dtype_names

            a, b = (t.to(dtype_names.to_torch(half)).float() for t in (a, b))
        return [_with_projections(block, a, b) for block in fitted], []

    def check_target(
        self, block: Block, target: Target, name: str, shape: tuple[int, ...], where: str, inverse: bool
    ) -> None:
        if len(shape) != 2:
            raise AdapterError(
                f"{where} targets {name} of shape {list(shape)}, which is not a Linear or Conv1D weight."
            )
        transposed = block.params.transposed
        out, inputs = (shape[1], shape[0]) if transposed else shape
        length, width = block.parts["lambda_b"].shape[0], block.parts["A"].shape[1]
        layout = "a Conv1D weight stored in x out" if transposed else "a Linear weight out x in"
        if out != length or inputs > width:
            raise AdapterError(
                f"{where} has {length} outputs and projections {width} inputs wide, but {name} of shape "
                f"{list(shape)}, as {layout}, has {out} outputs and {inputs} inputs; is this adapter for "
                "this base model?"
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
        import torch

        from bonemerge.methods.lora import DeltaRows

        # PEFT forms the scaled projections and their product in fp32
        product = torch.float64 if precision == "fp64" else torch.float32
        left, right = _sliced(op.block, lambda part: load(part).to(device), shape, product)
        return DeltaRows(left, right, 1.0, product, op.block.params.transposed)

    def product_terms(self, op: BlockOp) -> int:
        return op.block.parts["lambda_d"].shape[0] + 2

    def sketch(
        self, op: BlockOp, load: Callable[[str], np.ndarray], shape: tuple[int, ...]
    ) -> tuple[Sketch, ...] | None:
        """ΔW·X as `left (right X)`, never building ΔW: the same numbers as any LoRA with the
        same update."""
        from bonemerge.output.sketch import of_matrix, parts

        transposed = op.block.params.transposed
        out_features, in_features = (shape[1], shape[0]) if transposed else shape
        left = load("lambda_b")[:, None] * load("B")[:out_features]
        right = load("lambda_d")[:, None] * load("A")[:, :in_features]
        if transposed:
            left, right = right.T, left.T
        return parts(of_matrix("delta", lambda x: left @ (right @ x), (shape[0], math.prod(shape[1:]))))


def _widths(blocks: Sequence[Block], weights: Mapping[str, tuple[int, ...]]) -> tuple[int, int]:
    """The widest input and output among `blocks`, whose base weights have shapes `weights`:
    a layer's outputs are λ_b's length, its inputs the other dimension of its weight."""
    inputs, outputs = 0, 0
    for block in blocks:
        out, weight = block.parts["lambda_b"].shape[0], weights[block.module]
        inputs = max(inputs, weight[1] if weight[0] == out else weight[0])
        outputs = max(outputs, out)
    return inputs, outputs


def _with_projections(block: Block, a: torch.Tensor, b: torch.Tensor) -> Block:
    """`block` with the drawn projections as its adapter-wide parts."""
    from bonemerge.checkpoint import MemoryTensor

    keys = {part: key for key, part in _SHARED_PARTS.items()}
    drawn = {"A": MemoryTensor(keys["A"], a), "B": MemoryTensor(keys["B"], b)}
    return replace(
        block,
        parts={**block.parts, **drawn},
        keys={**block.keys, **keys},
        shared=frozenset(drawn),
    )


VERA = VeraMethod()
