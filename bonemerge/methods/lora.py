"""LoRA, rsLoRA and DoRA (PEFT `LORA`): low-rank updates `ΔW = s · B @ A`.

Storage decides which way the rows run. A Linear weight is `out x in` and row o of ΔW is
`s · B[o] @ A`; GPT-2's Conv1D (`fan_in_fan_out`) stores `in x out` and an Embedding
`num_embeddings x dim`, so their row i is `s · A[:, i]ᵀ @ Bᵀ`. Either way a chunk of rows
needs only A and B, which keeps LoRA streaming in bounded memory.

Precision follows PEFT's default `merge_and_unload()` (safe_merge=False): the product in
fp32 (fp64 with `--precision fp64`), scaled, added to the weight and rounded once, so Linear
merges match PEFT bit for bit. PEFT rounds an Embedding's delta to the weight dtype before
adding it; bonemerge rounds once, which is never further from the exact result.

DoRA rescales each output by `m / ‖W + ΔW‖`, the norm taken over the inputs. For Linear that
is a row of the stored weight, so it streams as is; for Conv1D and Embedding it is a column,
so the engine first streams the tensor once to collect the column norms (`needs_pass`).
The norm of the original `W + ΔW` is not recoverable from the merged weight, so a DoRA merge
cannot be undone from the files: unmerge refuses it.
"""

from __future__ import annotations

import math
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from bonemerge.errors import AdapterError, shown
from bonemerge.methods.base import (
    INPUT_EMBEDDINGS,
    OUTPUT_EMBEDDINGS,
    PREFIX,
    AdapterConfig,
    Block,
    BlockOp,
    ErrorBound,
    KeyClaim,
    MagnitudeBound,
    Method,
    RowMaths,
    Target,
)
from bonemerge.methods.lora_params import (
    ParamBlock,
    ParamTarget,
    check_piece,
    expert_rows,
    parameter_module,
    place,
    targets_a_parameter,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

    from bonemerge.checkpoint import Source
    from bonemerge.sketch import Sketch

_FILE_PARTS = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_B.bias": "bias",
    "lora_embedding_A": "A",
    "lora_embedding_B": "B",
    "lora_magnitude_vector": "magnitude",
    "lora_magnitude_vector.weight": "magnitude",
}
_TRAINING = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"\.(?P<name>[^.]+)(?P<tail>\.weight|\.bias)?$"
)
_TRAINING_PARTS = {
    ("lora_A", ".weight"): "A",
    ("lora_B", ".weight"): "B",
    ("lora_B", ".bias"): "bias",
    ("lora_embedding_A", None): "A",
    ("lora_embedding_B", None): "B",
    ("lora_magnitude_vector", ".weight"): "magnitude",
}
# Initialisations that rewrite the base weights while training starts: the adapter is then a
# delta against a base that no longer exists on disk, unless PEFT converted it when saving.
_BASE_CHANGING = ("pissa", "olora", "corda", "eva", "loftq")


@dataclass(frozen=True)
class LoraSettings:
    """What a LoRA config says about the maths."""

    r: int
    alpha: float | None  # None: not known (a checkpoint without its config; see `infer_config`)
    rslora: bool
    dora: bool
    fan_in_fan_out: bool
    lora_bias: bool
    rank_pattern: tuple[tuple[str, int], ...]
    alpha_pattern: tuple[tuple[str, float], ...]
    target_parameters: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoraParams:
    """One module's LoRA: how it is stored (`kind`, `transposed`), its rank and its scale."""

    kind: str
    transposed: bool
    r: int
    scale: float
    dora: bool


def _number(value: object) -> bool:
    """A JSON number that is finite as a float (an integer such as 10**400 is not)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) <= _LARGEST
    return math.isfinite(value)


_LARGEST = sys.float_info.max


def _pattern_key(patterns: tuple[tuple[str, object], ...], module: str) -> str | None:
    """The pattern PEFT applies to `module`: the first key matching a dotted suffix of it."""
    from bonemerge.adapters.patterns import pattern_key

    return pattern_key((key for key, _ in patterns), module)


def _flag(raw: dict, key: str, path: Path) -> bool:
    value = raw.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise AdapterError(f"{path} has {key}={shown(value)}; it must be true or false.")
    return value


def _pattern(raw: dict, key: str, path: Path, check: Callable[[object], bool]) -> tuple:
    """A `rank_pattern`/`alpha_pattern` as (key, value) pairs, every key checked to be a
    regular expression that PEFT compiles and bonemerge can match in linear time."""
    from bonemerge.adapters.patterns import check_pattern, key_expression

    value = raw.get(key) or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and check(v) for k, v in value.items()):
        raise AdapterError(
            f"{path} has a malformed {key}; it must map module names to finite numbers (at most ~1.8e308)."
        )
    for name in value:
        check_pattern(name, f"a {key} key", path, key_expression(name))
    return tuple(value.items())


def _names(raw: dict, key: str, path: Path) -> tuple[str, ...]:
    value = raw.get(key) or ()
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise AdapterError(f"{path} has a malformed {key}; it must be a list of parameter names.")
    return tuple(value)


def _refuse_unmergeable(raw: dict, path: Path) -> None:
    """One sentence for every LoRA variant whose maths is not `W + s·B@A` on the saved base."""
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING):
        raise AdapterError(
            f"{path} was trained with init_lora_weights {shown(init)}, which changed the base weights "
            "when training began, so it cannot be merged into the original base; re-save it with "
            "PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) to get a plain "
            "LoRA adapter."
        )
    if raw.get("alora_invocation_tokens"):
        raise AdapterError(
            f"{path} is an aLoRA adapter (alora_invocation_tokens), which acts only after its "
            "invocation tokens and has no merged form; serve it with the adapter instead."
        )
    if raw.get("target_parameters"):
        # PEFT's ParamWrapper refuses these, so no adapter trained by PEFT has them.
        for key, what in (
            ("use_dora", "DoRA"),
            ("lora_bias", "lora_bias"),
            ("fan_in_fan_out", "fan_in_fan_out"),
        ):
            if raw.get(key):
                raise AdapterError(
                    f"{path} sets {key} together with target_parameters, which PEFT refuses "
                    f"(lora.ParamWrapper does not work with {what}); this is not an adapter PEFT can load."
                )
    unsupported = {
        "layer_replication": "layer_replication (it changes the model's layers)",
        "use_qalora": "QA-LoRA (use_qalora)",
        "arrow_config": "Arrow routing (arrow_config)",
        "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    }
    for key, what in unsupported.items():
        if raw.get(key):
            raise AdapterError(
                f"{path} uses {what}, which bonemerge does not merge; use PEFT's merge_and_unload for it."
            )


def _check_factors(a: tuple[int, ...], b: tuple[int, ...], keys: dict[str, str], where: Path) -> None:
    """lora_A and lora_B must be matrices; equal extra dimensions are a convolution's LoRA."""
    if len(a) == len(b) == 2:
        return
    if len(a) == len(b) and len(a) in (3, 4, 5):
        raise AdapterError(
            f"{keys['A']} and {keys['B']} in {where} have {len(a)} dimensions: a LoRA on a "
            f"Conv{len(a) - 2}d layer, which bonemerge does not merge (Linear, Conv1D and Embedding "
            "only); use PEFT's merge_and_unload for it."
        )
    part, shape = ("A", a) if len(a) != 2 else ("B", b)
    other, partner = ("B", b) if part == "A" else ("A", a)
    layout = "r x in" if part == "A" else "out x r"
    raise AdapterError(
        f"{keys[part]} in {where} has {len(shape)} dimension{'s' * (len(shape) != 1)} {list(shape)}, "
        f"but a LoRA factor is a matrix ({layout}) and {keys[other]} is {list(partner)}; "
        "the adapter is damaged."
    )


def _check_bias(bias: tuple[int, ...], out: int, kind: str, keys: dict[str, str], where: Path) -> None:
    """`lora_bias` trains lora_B's bias: one value per output of lora_B, on Linear layers only."""
    if kind == "embedding":
        raise AdapterError(
            f"{where} holds {keys['bias']} for an Embedding LoRA ({keys['A']}), but PEFT's lora_bias "
            "exists for Linear layers only; the config and weights disagree."
        )
    if bias != (out,):
        raise AdapterError(
            f"{keys['bias']} in {where} has shape {list(bias)}, but {keys['B']} has {out} outputs, "
            f"so its bias must be [{out}]; the adapter is damaged."
        )


def _looks_like_embedding(leaf: str) -> bool:
    return leaf in INPUT_EMBEDDINGS or "emb" in leaf.lower() or leaf in ("wte", "wpe")


def _check_layer_kind(block: Block, name: str, shape: tuple[int, ...], where: str) -> None:
    """PEFT keeps an Embedding's LoRA in `lora_embedding_A/B` and a Linear's in `lora_A/B`, and
    ignores the other pair on each kind of layer; read the wrong way, the factors merge
    transposed. The file names are trusted where the layer agrees or the shapes decide (a
    non-square weight fits one orientation only); refused where the layer is known to be of
    the other kind (an input embedding, an output projection) or a square weight with no
    embedding's name leaves the kind open."""
    leaf = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    if _linear(block).kind == "linear" and leaf in INPUT_EMBEDDINGS:
        raise AdapterError(
            f"{where} holds lora_A/lora_B (a Linear's LoRA) for {name}, an Embedding, where PEFT "
            "reads lora_embedding_A/B and would ignore these; the adapter was edited by hand or is "
            "for another model."
        )
    if _linear(block).kind == "embedding" and (
        leaf in OUTPUT_EMBEDDINGS or (shape[0] == shape[1] and not _looks_like_embedding(leaf))
    ):
        which = "a Linear output projection" if leaf in OUTPUT_EMBEDDINGS else "not named like an Embedding"
        raise AdapterError(
            f"{where} holds lora_embedding_A/B (an Embedding's LoRA) for {name}, which is {which}; "
            "PEFT reads lora_A/lora_B on a Linear and would ignore these; the adapter was edited by "
            "hand or is for another model."
        )


class DeltaRows(RowMaths):
    """Plain LoRA: add (or subtract) `s · left[rows] @ right` to each chunk of rows."""

    def __init__(
        self,
        left: torch.Tensor,
        right: torch.Tensor,
        scale: float,
        dtype: torch.dtype,
        scratch: threading.local | None = None,
    ) -> None:
        self.left = left.to(dtype).contiguous()
        self.right = right.to(dtype).contiguous()
        self.scale = scale
        # PEFT rounds the scaled product before adding it. A scale of 2^k (k >= 0, e.g. the
        # common lora_alpha = r or 2r) scales exactly, so the scaling can ride on the addition
        # (`add_(alpha=)`, one pass over the chunk instead of two) with the same bits.
        mantissa, exponent = math.frexp(scale)
        self._exact_scale = mantissa == 0.5 and exponent >= 1
        # each thread's product buffer; the experts of one tensor share theirs (`scratch`)
        self._scratch = scratch if scratch is not None else threading.local()

    def product(self, rows: int, row0: int) -> torch.Tensor:
        """`left[row0:row0+rows] @ right`, unscaled, in this thread's reused buffer."""
        import torch

        size = rows * self.right.shape[1]
        buffer = getattr(self._scratch, "buffer", None)
        if buffer is None or buffer.numel() < size:
            buffer = self._scratch.buffer = torch.empty(
                size, dtype=self.right.dtype, device=self.right.device
            )
        out = buffer[:size].view(rows, self.right.shape[1])
        return torch.mm(self.left[row0 : row0 + rows], self.right, out=out)

    def delta(self, rows: int, row0: int) -> torch.Tensor:
        """`s · left[row0:row0+rows] @ right`: the product rounded, then scaled and rounded."""
        return self.product(rows, row0).mul_(self.scale)

    def _apply(self, work: torch.Tensor, row0: int, sign: int) -> None:
        if self._exact_scale:
            work.add_(self.product(work.shape[0], row0), alpha=sign * self.scale)
        else:
            work.add_(self.delta(work.shape[0], row0), alpha=sign)

    def merge(self, work: torch.Tensor, row0: int) -> None:
        self._apply(work, row0, 1)

    def unmerge(self, work: torch.Tensor, row0: int) -> None:
        self._apply(work, row0, -1)


class DoraRows(DeltaRows):
    """DoRA with the norm along the stored rows (Linear): each row becomes m · v / ‖v‖."""

    def __init__(self, left, right, scale, dtype, magnitude: torch.Tensor) -> None:
        super().__init__(left, right, scale, dtype)
        self.magnitude = magnitude

    def merge(self, work: torch.Tensor, row0: int) -> None:
        import torch

        work.add_(self.delta(work.shape[0], row0))
        norm = torch.linalg.norm(work, dim=1)
        factor = self.magnitude[row0 : row0 + work.shape[0]].to(work.dtype) / norm
        work.mul_(factor.unsqueeze(1))


class DoraColumns(DeltaRows):
    """DoRA with the norm along the stored columns (Conv1D, Embedding): a first pass over the
    whole tensor sums the squares of `W + ΔW` per column; the merge then scales every row."""

    needs_pass = True

    def __init__(self, left, right, scale, dtype, magnitude: torch.Tensor) -> None:
        import torch

        super().__init__(left, right, scale, dtype)
        self.magnitude = magnitude
        self._squares = torch.zeros(right.shape[1], dtype=torch.float64, device=right.device)
        self._factor = magnitude

    def observe(self, work: torch.Tensor, row0: int) -> None:
        summed = work + self.delta(work.shape[0], row0)
        self._squares += summed.double().square().sum(dim=0)

    def finish(self) -> None:
        dtype = self.magnitude.dtype
        self._factor = self.magnitude / self._squares.sqrt().to(dtype)

    def merge(self, work: torch.Tensor, row0: int) -> None:
        work.add_(self.delta(work.shape[0], row0))
        work.mul_(self._factor)


class DoraBound(ErrorBound):
    """DoRA's `m/‖v‖ ⊙ v`: the bound of v (a LoRA merge) scaled by the factor, plus the
    result times the relative error of the norm, which is its own summation error over the
    inputs plus ‖error of v‖ / ‖v‖ (to first order). The norms run along the stored rows for
    Linear and along the stored columns otherwise, which then needs a first pass."""

    def __init__(
        self,
        exact: DeltaRows,
        inner: ErrorBound,
        magnitude: torch.Tensor,
        shape: tuple[int, ...],
        params: LoraParams,
        dtype: str,
    ) -> None:
        import torch

        from bonemerge import tolerance

        self._exact, self._inner, self._magnitude = exact, inner, magnitude
        self._columns = params.transposed
        self.needs_pass = self._columns
        inputs = shape[0] if self._columns else shape[1]
        self._gamma = tolerance.gamma(inputs + 4, dtype)
        self._squares = torch.zeros(shape[1], dtype=torch.float64)
        self._errors = torch.zeros(shape[1], dtype=torch.float64)

    def _v(self, rows: torch.Tensor, row0: int) -> torch.Tensor:
        return rows + self._exact.delta(rows.shape[0], row0)

    def observe(self, rows: torch.Tensor, carried: torch.Tensor, row0: int) -> None:
        self._squares += self._v(rows, row0).square().sum(dim=0)
        self._errors += self._inner.bound(rows, row0, carried, False).square().sum(dim=0)

    def bound(self, rows: torch.Tensor, row0: int, carried: torch.Tensor, rounded: bool) -> torch.Tensor:
        v = self._v(rows, row0)
        error = self._inner.bound(rows, row0, carried, rounded)
        if self._columns:
            norm, norm_error = self._squares.sqrt(), self._errors.sqrt()
            magnitude = self._magnitude
        else:
            norm, norm_error = v.norm(dim=1, keepdim=True), error.norm(dim=1, keepdim=True)
            magnitude = self._magnitude[row0 : row0 + rows.shape[0]].unsqueeze(1)
        factor = magnitude.abs() / norm
        relative = norm_error / norm + self._gamma
        return factor * error + (factor * v).abs() * (2 * relative)


class BiasRows(RowMaths):
    """`lora_bias`: the layer's bias gains `s · lora_B.bias` (its rows are its elements)."""

    def __init__(self, bias: torch.Tensor, scale: float, dtype: torch.dtype) -> None:
        self.delta = (bias.float() * scale).to(dtype).unsqueeze(1)

    def merge(self, work: torch.Tensor, row0: int) -> None:
        work.add_(self.delta[row0 : row0 + work.shape[0]])

    def unmerge(self, work: torch.Tensor, row0: int) -> None:
        work.sub_(self.delta[row0 : row0 + work.shape[0]])


def _linear(block: Block) -> LoraParams:
    """The module LoRA settings of a block (for a parameter block, its Linear reading)."""
    return block.params.linear if isinstance(block.params, ParamBlock) else block.params


class LoraMethod(Method):
    name = "LoRA"
    peft_types = ("LORA",)
    variants = ("LoRA", "rsLoRA", "DoRA")

    def read_config(self, peft_type: str, raw: dict, path: Path) -> LoraSettings:
        _refuse_unmergeable(raw, path)
        r = raw.get("r", 8)
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise AdapterError(f"{path} has r={shown(r)}; r must be a positive integer.")
        alpha = raw.get("lora_alpha", 8)
        if not _number(alpha):
            raise AdapterError(
                f"{path} has lora_alpha={shown(alpha)}; it must be a finite number (at most ~1.8e308)."
            )
        return LoraSettings(
            r=r,
            alpha=alpha,
            rslora=_flag(raw, "use_rslora", path),
            dora=_flag(raw, "use_dora", path),
            fan_in_fan_out=_flag(raw, "fan_in_fan_out", path),
            lora_bias=_flag(raw, "lora_bias", path),
            rank_pattern=_pattern(
                raw, "rank_pattern", path, lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0
            ),
            alpha_pattern=_pattern(raw, "alpha_pattern", path, _number),
            target_parameters=_names(raw, "target_parameters", path),
        )

    def claim(self, name: str, config: AdapterConfig) -> KeyClaim | None:
        for suffix, part in _FILE_PARTS.items():
            if name.endswith("." + suffix):
                return KeyClaim(name[: -len(suffix) - 1], part)
        return None

    def claim_training(self, name: str) -> KeyClaim | None:
        found = _TRAINING.match(name)
        if not found:
            return None
        part = _TRAINING_PARTS.get((found["part"], found["tail"]))
        if part is None:
            return None
        return KeyClaim(found["module"], part, found["name"], "LORA")

    def make_block(
        self, module: str, parts: dict[str, Source], keys: dict[str, str], config: AdapterConfig, where: Path
    ) -> Block:
        settings: LoraSettings = config.settings
        if settings.alpha is None:
            raise AdapterError(
                f"{where} holds LoRA tensors but no adapter_config.json beside it; lora_alpha is not in "
                "the weights, so put the adapter's adapter_config.json next to the checkpoint."
            )
        missing = [p for p in ("A", "B") if p not in parts]
        if missing:
            raise AdapterError(
                f"{where} holds {next(iter(keys.values()))} but no lora_{missing[0]} for {module}; "
                "the adapter was not saved completely."
            )
        parameter = parameter_module(module, settings)
        if parameter is not None:
            extra = sorted(set(parts) - {"A", "B"})
            shapes = [len(parts[p].shape) for p in ("A", "B")]
            if extra or shapes != [2, 2]:
                raise AdapterError(
                    f"{keys[extra[0] if extra else 'A']} in {where} is not a lora_A/lora_B matrix of the "
                    f"target_parameters block {module}; the adapter is damaged."
                )
            linear = None
            if not module.endswith(".base_layer"):
                # a target without a module part ("gate_up_proj") names no module; whether this
                # one is a Linear LoRA or a parameter's is told by the base (see `place`)
                try:
                    linear = self._module_block(module, parts, keys, config, where).params
                except AdapterError:
                    linear = None
            return Block(module, self, parts, keys, replace(parameter, linear=linear))
        return self._module_block(module, parts, keys, config, where)

    def _module_block(
        self, module: str, parts: dict[str, Source], keys: dict[str, str], config: AdapterConfig, where: Path
    ) -> Block:
        """A LoRA block on a module (Linear, Conv1D, Embedding)."""
        settings: LoraSettings = config.settings
        kind = (
            "embedding"
            if keys["A"].endswith("lora_embedding_A") or ".lora_embedding_A." in keys["A"]
            else "linear"
        )
        a, b = tuple(parts["A"].shape), tuple(parts["B"].shape)
        _check_factors(a, b, keys, where)
        r_key = _pattern_key(settings.rank_pattern, module)
        alpha_key = _pattern_key(settings.alpha_pattern, module)
        r = dict(settings.rank_pattern)[r_key] if r_key is not None else settings.r
        alpha = dict(settings.alpha_pattern)[alpha_key] if alpha_key is not None else settings.alpha
        if a[0] != r or b[1] != r:
            raise AdapterError(
                f"{keys['A']} and {keys['B']} in {where} have shapes {list(a)} and {list(b)}, but "
                f"adapter_config.json gives {module} rank {r}; the config and weights disagree."
            )
        if settings.dora and "magnitude" not in parts:
            raise AdapterError(
                f"{where} is a DoRA adapter (use_dora) without a lora_magnitude_vector for {module}; "
                "the adapter was not saved completely."
            )
        if "magnitude" in parts and not settings.dora:
            raise AdapterError(
                f"{where} holds {keys['magnitude']} but adapter_config.json does not set use_dora; "
                "the config and weights disagree."
            )
        if "bias" in parts and not settings.lora_bias:
            raise AdapterError(
                f"{where} holds {keys['bias']} but adapter_config.json does not set lora_bias; "
                "the config and weights disagree."
            )
        if "bias" in parts:
            _check_bias(tuple(parts["bias"].shape), b[0], kind, keys, where)
        scale = alpha / math.sqrt(r) if settings.rslora else alpha / r
        transposed = kind == "embedding" or settings.fan_in_fan_out
        return Block(module, self, parts, keys, LoraParams(kind, transposed, r, scale, settings.dora))

    def infer_config(
        self,
        peft_type: str,
        blocks: list[tuple[str, dict[str, Source]]],
        base_shapes: dict,
        saved: list[str],
        where: Path,
    ) -> AdapterConfig:
        """What the tensors tell: the ranks, DoRA, the bias. lora_alpha is not in them, so it
        stays unknown and `make_block` refuses to build blocks from this config: `unload`, which
        never applies them, works without the adapter's adapter_config.json; merges do not."""
        ranks = {module: parts["A"].shape[0] for module, parts in blocks if "A" in parts and parts["A"].shape}
        r = max(sorted(set(ranks.values())), key=list(ranks.values()).count) if ranks else 8
        dora = any("magnitude" in parts for _, parts in blocks)
        bias = any("bias" in parts for _, parts in blocks)
        rank_pattern = tuple(sorted((module, rank) for module, rank in ranks.items() if rank != r))
        raw = {
            "peft_type": peft_type,
            "r": r,
            "lora_alpha": None,
            "use_dora": dora,
            "lora_bias": bias,
            "rank_pattern": dict(rank_pattern),
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m, _ in blocks}),
            "modules_to_save": sorted({m.rsplit(".", 1)[0] for m in saved}) or None,
            "base_model_name_or_path": None,
        }
        settings = LoraSettings(r, None, False, dora, False, bias, rank_pattern, ())
        return AdapterConfig(self, peft_type, settings, raw)

    def place(self, block: Block, module: str, shape_of, where: str) -> list[tuple[str, Target]]:
        parameter = isinstance(block.params, ParamBlock)
        if parameter and (block.params.linear is None or targets_a_parameter(block, module, shape_of)):
            return place(block, module, shape_of, where)
        return super().place(block, module, shape_of, where)

    def module_scoped(self, block: Block) -> bool:
        # the module names of parameter blocks match target_parameters (PEFT's
        # `_inject_parameters` applies no other field)
        return not isinstance(block.params, ParamBlock)

    def targets(self, block: Block) -> tuple[Target, ...]:
        if "bias" in block.parts:
            return (Target("weight"), Target("bias", "bias"))
        return (Target("weight"),)

    def _dims(self, block: Block) -> tuple[int, int]:
        """(rows, columns) the stored weight must have."""
        a, b = block.parts["A"].shape, block.parts["B"].shape
        return (a[1], b[0]) if _linear(block).transposed else (b[0], a[1])

    def check_target(
        self, block: Block, target: Target, name: str, shape: tuple[int, ...], where: str, inverse: bool
    ) -> None:
        if isinstance(target, ParamTarget):
            check_piece(target, name, shape, where)
            return
        params = _linear(block)
        if inverse and params.dora:
            raise AdapterError(
                f"{where} is DoRA, whose merge rescales each output by m / ‖W + ΔW‖ of the original "
                f"W; that norm is not in the merged {name}, so the merge cannot be undone from the files."
            )
        if target.part == "bias":
            out = self._dims(block)[1 if params.transposed else 0]
            if tuple(shape) != (out,):
                raise AdapterError(
                    f"{where} trains a bias of {out} values, but {name} has shape {list(shape)}; "
                    "is this adapter for this base model?"
                )
            return
        if len(shape) != 2:
            raise AdapterError(
                f"{where} holds 2-D LoRA factors for {name}, which has shape {list(shape)}; they fit "
                "only a Linear, Conv1D or Embedding weight, so is this adapter for this base model?"
            )
        _check_layer_kind(block, name, shape, where)
        if tuple(shape) != self._dims(block):
            layout = {
                "embedding": "an Embedding (lora_embedding_A is r x vocab, lora_embedding_B dim x r)",
                "linear": "a Conv1D weight stored in x out (fan_in_fan_out)"
                if params.transposed
                else "a Linear weight out x in",
            }[params.kind]
            raise AdapterError(
                f"{where} has lora_A {list(block.parts['A'].shape)} and lora_B "
                f"{list(block.parts['B'].shape)}, which as {layout} need {name} to be "
                f"{list(self._dims(block))}, but it is {list(shape)}; is this adapter for this base model?"
            )
        if params.dora:
            columns = shape[1] if params.transposed else shape[0]
            magnitude = tuple(block.parts["magnitude"].shape)
            if magnitude != (columns,):
                raise AdapterError(
                    f"{where} has a DoRA magnitude of shape {list(magnitude)}, but {name} needs "
                    f"[{columns}]; the adapter is damaged."
                )

    def settings_digest(self, block: Block) -> str:
        p: LoraParams = block.params
        if isinstance(p, ParamBlock):
            return repr(p)
        return f"{p.kind} transposed={p.transposed} scale={p.scale!r} dora={p.dora}"

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

        params = _linear(op.block)
        # PEFT's product runs in fp32; fp64 only when asked for, so that default merges match it.
        product = torch.float64 if precision == "fp64" else torch.float32
        if op.target.part == "bias":
            return BiasRows(load("bias").to(device), params.scale, dtype)
        if isinstance(op.target, ParamTarget):
            return expert_rows(op.target, load("A"), load("B"), op.target.scale, product, device)
        a, b = (load(p).to(device=device, dtype=product) for p in ("A", "B"))
        left, right = (a.t(), b.t()) if params.transposed else (b, a)
        if not params.dora:
            return DeltaRows(left, right, params.scale, product)
        magnitude = load("magnitude").to(device=device, dtype=dtype)
        kind = DoraColumns if params.transposed else DoraRows
        return kind(left, right, params.scale, product, magnitude)

    def product_terms(self, op: BlockOp) -> int:
        if isinstance(op.target, ParamTarget):
            return op.target.r
        return _linear(op.block).r if op.target.part == "weight" else 0

    def rounds_delta(self, op: BlockOp) -> bool:
        # PEFT's Embedding.merge and ParamWrapper add `delta.to(weight dtype)`; Linear and
        # Conv1D add in fp32.
        if isinstance(op.target, ParamTarget):
            return True
        return _linear(op.block).kind == "embedding" and op.target.part == "weight"

    def error_bound(
        self, op: BlockOp, load: Callable[[str], torch.Tensor], shape: tuple[int, ...], dtype: str
    ) -> ErrorBound:
        import torch

        params = _linear(op.block)
        target = op.target
        scale = abs(target.scale if isinstance(target, ParamTarget) else params.scale)

        def prepare(loader: Callable[[str], torch.Tensor]) -> RowMaths:
            if isinstance(target, ParamTarget):
                return expert_rows(target, loader("A"), loader("B"), scale, torch.float64, "cpu")
            if op.target.part == "bias":
                return BiasRows(loader("bias"), scale, torch.float64)
            a, b = loader("A"), loader("B")
            left, right = (a.t(), b.t()) if params.transposed else (b, a)
            return DeltaRows(left, right, scale, torch.float64)

        magnitudes = MagnitudeBound(prepare, load, self.product_terms(op), self.rounds_delta(op), dtype)
        if isinstance(target, ParamTarget) or not params.dora or op.target.part != "weight":
            return magnitudes
        exact = self.prepare(op, load, shape, torch.float64, "cpu", "fp64")
        return DoraBound(exact, magnitudes, load("magnitude").double(), shape, params, dtype)

    def sketch(
        self, op: BlockOp, load: Callable[[str], np.ndarray], shape: tuple[int, ...]
    ) -> tuple[Sketch, ...] | None:
        """ΔW·X as `s · left (right X)`, never building ΔW. DoRA's merge also depends on W (its
        norm), so a DoRA update is identified by the tensors that define it, ΔW and the
        magnitude m, in a space of its own: it matches only DoRA with the same ΔW and m.
        Expert parameters (`target_parameters`) have no sketch yet: their on-disk tensors are
        slices of a fused update laid out per architecture, so they are known by fingerprint."""
        from bonemerge.sketch import of_matrix, of_vector, parts

        if isinstance(op.target, ParamTarget):
            return None
        params = _linear(op.block)
        if op.target.part == "bias":
            return parts(of_vector("delta", load("bias") * params.scale))
        a, b = load("A"), load("B")
        left, right = (a.T, b.T) if params.transposed else (b, a)
        space = "dora" if params.dora else "delta"
        delta = of_matrix(space, lambda x: left @ (right @ x) * params.scale, shape)
        if not params.dora:
            return parts(delta)
        return parts(delta, of_vector("dora-magnitude", load("magnitude")))

    def describe(self, config: AdapterConfig) -> str:
        s: LoraSettings = config.settings
        name = "DoRA" if s.dora else "LoRA"
        details = [f"r={s.r}", "alpha unknown" if s.alpha is None else f"alpha={s.alpha:g}"]
        if s.rslora:
            name = "rsLoRA" if not s.dora else "DoRA, rsLoRA scaling"
        if s.rank_pattern or s.alpha_pattern:
            details.append("per-module ranks")
        if s.lora_bias:
            details.append("bias")
        if s.target_parameters:
            details.append("parameters " + ", ".join(s.target_parameters))
        return f"{name} ({', '.join(details)})"

    def summary(self, config: AdapterConfig) -> dict[str, object]:
        s: LoraSettings = config.settings
        return {
            "r": s.r,
            "lora_alpha": s.alpha,
            "use_rslora": s.rslora,
            "use_dora": s.dora,
            "fan_in_fan_out": s.fan_in_fan_out,
            "lora_bias": s.lora_bias,
            "rank_pattern": dict(s.rank_pattern),
            "alpha_pattern": dict(s.alpha_pattern),
        } | ({"target_parameters": list(s.target_parameters)} if s.target_parameters else {})

    def tag(self, config: AdapterConfig) -> str:
        return "dora" if config.settings.dora else "lora"

    def file_keys(self, block: Block, peft_type: str) -> dict[str, str]:
        stem = PREFIX + block.module
        names = (
            {"A": "lora_embedding_A", "B": "lora_embedding_B"}
            if getattr(block.params, "kind", None) == "embedding"
            else {"A": "lora_A.weight", "B": "lora_B.weight", "bias": "lora_B.bias"}
        )
        names["magnitude"] = "lora_magnitude_vector"
        return {part: f"{stem}.{names[part]}" for part in block.parts}


LORA = LoraMethod()
