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

Other methods whose update is low-rank (Bone/MiSS, `strip --to lora`) are written as LoRA
adapters through `low_rank_tensors` and `low_rank_config`, so PEFT's LoRA keys and config
fields live here alone.

Error bounds (`bonemerge.verification.tolerance`): `W + s·B@A`, an inner product over r terms plus an
addition, error ≤ γ_(r+2)·(|W| + |s|·|B|@|A|) (the classic γₙ = n·u/(1 − n·u) bound), plus half
an ulp of the delta for Embedding, nn.Conv1d, MultiheadAttention and parameter merges, which
PEFT rounds before adding; DoRA, `m/‖v‖ ⊙ v` with `v = W + ΔW`: the error of v scaled by the
factor, plus the relative error of the norm (its own summation and the error of v) times the
result.
"""

from __future__ import annotations

import math
import re
import sys
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from bonemerge.errors import AdapterError, shown
from bonemerge.methods import layouts
from bonemerge.methods.base import (
    INPUT_EMBEDDINGS,
    OUTPUT_EMBEDDINGS,
    PREFIX,
    About,
    AdapterConfig,
    Block,
    BlockOp,
    BlockSettings,
    ErrorBound,
    KeyClaim,
    LowRankUpdate,
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
    piece_product,
    place,
    targets_a_parameter,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

    from bonemerge.checkpoint import Source
    from bonemerge.output.sketch import Sketch

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
class LoraParams(BlockSettings):
    """One module's LoRA: how it is stored (`kind`, `transposed`), its rank and its scale."""

    kind: str
    transposed: bool
    r: int
    scale: float
    dora: bool
    fan_in_fan_out: bool = False  # as adapter_config.json says; `transposed` is what holds

    def digest(self) -> str:
        return f"{self.kind} transposed={self.transposed} scale={self.scale!r} dora={self.dora}"


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
    if raw.get("kasa_config"):
        raise AdapterError(
            f"{path} is a KaSA adapter (kasa_config, PEFT 0.19 or later): KaSA cut the smallest singular "
            "values out of the base weights when training began and scales B @ A by its lora_diag, so "
            "bonemerge cannot merge it into the original base; use PEFT's merge_and_unload for it."
        )
    unsupported = {
        "layer_replication": "layer_replication (it changes the model's layers)",
        "use_qalora": "QA-LoRA (use_qalora)",
        "arrow_config": "Arrow routing (arrow_config)",
        "trainable_token_indices": "trainable tokens (trainable_token_indices)",
        "velora_config": "VeLoRA (velora_config, a LoRA variant of PEFT 0.19 or later)",
        "monteclora_config": "MonteCLoRA (monteclora_config, a LoRA variant of PEFT 0.19 or later)",
        "use_bdlora": "BD-LoRA (use_bdlora, block-diagonal factors, a LoRA variant of PEFT 0.19 or later)",
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
            f"Conv{len(a) - 2}d layer, which bonemerge does not merge (Linear, Conv1D, nn.Conv1d "
            "and Embedding only); use PEFT's merge_and_unload for it."
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


def _multihead(module: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """`mha_in` for LoRA on an nn.MultiheadAttention's packed in_proj_weight (PEFT saves it as
    `mha.lora_A`), `mha_out` for its out_proj (`mha.base_layer.out_proj.lora_A`), else None."""
    owner = module.split(".base_layer.")[0]
    if f"{owner}.in_proj_weight" not in shapes:
        return None
    if owner == module and f"{module}.weight" not in shapes:
        return "mha_in"
    return "mha_out" if module == f"{owner}.base_layer.out_proj" else None


def _multihead_block(block: Block, part: str, where: Path) -> Block:
    """A block of an nn.MultiheadAttention, named by the module whose weight it changes."""
    if block.params.dora or "bias" in block.parts:
        what = "DoRA" if block.params.dora else "LoRA with lora_bias"
        raise AdapterError(
            f"{block.key} in {where} is {what} on an nn.MultiheadAttention, which PEFT 0.18.1 does "
            "not merge; use PEFT's merge_and_unload for it."
        )
    module = block.module if part == "mha_in" else block.module.replace(".base_layer.out_proj", ".out_proj")
    return replace(block, module=module, params=replace(block.params, kind=part, transposed=False))


def _layer_kind(
    block: Block, module: str, shape: tuple[int, ...] | None, conv1d: Callable[[str], bool] | None
) -> bool | None:
    """Whether a Linear-or-Conv1D block's layer is a Conv1D: from the architecture when it is
    known, else from the one layout its weight fits; None when the shape cannot tell."""
    if conv1d is not None:
        return conv1d(module)
    a, b = block.parts["A"].shape, block.parts["B"].shape
    linear, transposed = shape == (b[0], a[1]), shape == (a[1], b[0])
    return transposed if linear != transposed else None


def _ambiguous(
    block: Block,
    module: str,
    shapes: Mapping[str, tuple[int, ...]],
    blocks: Sequence[tuple[Block, str]],
    decided: Mapping[int, bool | None],
    where: Path,
) -> str:
    """Why a square layer's layout cannot be told, with a layer of each kind as evidence."""
    names = {layout: blocks[i][1] for i, layout in decided.items() if layout is not None}
    return (
        f"{block.key} in {where} is for {module}, whose square weight {list(shapes[module + '.weight'])} "
        "fits both an nn.Linear (out x in) and a transformers Conv1D (in x out), and this adapter "
        f"holds both kinds ({names[False]} is a Linear, {names[True]} a Conv1D) while the base's "
        "config.json names no model_type bonemerge knows the layers of; set model_type in the "
        "base's config.json, or merge with PEFT's merge_and_unload."
    )


def _factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B and A as the matrices of ΔW = s · B @ A: an nn.Conv1d's [out, r, 1] and [r, in, k]
    become [out, r] and [r, in·k], whose product is its weight's rows flattened (PEFT's
    `conv1d(Aᵀ, B)ᵀ`, the same sums)."""
    return b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)


class DeltaRows(RowMaths):
    """Plain LoRA: add (or subtract) `s · left[rows] @ right` to each chunk of rows; with
    `columns`, the stored rows are columns of `left @ right` (Conv1D, Embedding), and a chunk
    gets `(left @ right[:, rows])ᵀ`: PEFT's `transpose(B @ A)`, in the same GEMM shape (the
    very call when the tensor fits one chunk), rather than `Aᵀ @ Bᵀ`."""

    def __init__(
        self,
        left: torch.Tensor,
        right: torch.Tensor,
        scale: float,
        dtype: torch.dtype,
        columns: bool = False,
        scratch: threading.local | None = None,
    ) -> None:
        self.left = left.to(dtype).contiguous()
        self.right = right.to(dtype).contiguous()
        self.columns = columns
        self.width = self.left.shape[0] if columns else self.right.shape[1]
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

        size = rows * self.width
        buffer = getattr(self._scratch, "buffer", None)
        if buffer is None or buffer.numel() < size:
            buffer = self._scratch.buffer = torch.empty(
                size, dtype=self.right.dtype, device=self.right.device
            )
        if self.columns:
            out = buffer[:size].view(self.width, rows)
            return torch.mm(self.left, self.right[:, row0 : row0 + rows], out=out).t()
        out = buffer[:size].view(rows, self.width)
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

    @property
    def column_tiles(self) -> bool:
        # Each element of `left[rows] @ right[:, cols]` is the same r-term sum as in the whole
        # product (BLAS splits neither k nor the sum by the output's width), so a tile's
        # product has the bits of the whole one; subclasses that do more than add it do not tile.
        return not self.columns and type(self) is DeltaRows

    def columns_update(
        self, row0: int, rows: int, col0: int, cols: int, sign: int
    ) -> tuple[torch.Tensor, float]:
        import torch

        buffer = getattr(self._scratch, "buffer", None)
        if buffer is None or buffer.numel() < rows * cols:
            buffer = self._scratch.buffer = torch.empty(
                rows * cols, dtype=self.right.dtype, device=self.right.device
            )
        product = buffer[: rows * cols].view(rows, cols)
        torch.mm(self.left[row0 : row0 + rows], self.right[:, col0 : col0 + cols], out=product)
        if self._exact_scale:
            return product, sign * self.scale
        return product.mul_(self.scale), sign

    def low_rank_update(self, sign: int) -> LowRankUpdate | None:
        if not self.column_tiles:
            return None
        if self._exact_scale:
            return LowRankUpdate(self.left, self.right, 1.0, sign * self.scale)
        return LowRankUpdate(self.left, self.right, self.scale, sign)


class TwiceRows(DeltaRows):
    """An nn.MultiheadAttention's out_proj: PEFT 0.18.1 adds its update twice (in the
    MultiheadAttention merge, then in the wrapped out_proj's own), in merge_and_unload as in its
    forward, so the trained adapter means `W + ΔW + ΔW`; each addition rounds in the product's
    dtype as PEFT's does."""

    def _twice(self, work: torch.Tensor, row0: int, sign: int) -> None:
        v = work.to(self.right.dtype)
        delta = self.delta(work.shape[0], row0)
        v.add_(delta, alpha=sign).add_(delta, alpha=sign)
        if v is not work:
            work.copy_(v)

    def merge(self, work: torch.Tensor, row0: int) -> None:
        self._twice(work, row0, 1)

    def unmerge(self, work: torch.Tensor, row0: int) -> None:
        self._twice(work, row0, -1)


class DoraRows(DeltaRows):
    """DoRA with the norm along the stored rows (Linear, nn.Conv1d): each row becomes
    m · v / ‖v‖, with v, its norm and the factor in the product's dtype (fp32), as PEFT
    computes them, even where the weight is fp32 and the rest of the merge runs in fp64."""

    def __init__(self, left, right, scale, dtype, magnitude: torch.Tensor) -> None:
        super().__init__(left, right, scale, dtype)
        self.magnitude = magnitude.reshape(-1)

    def merge(self, work: torch.Tensor, row0: int) -> None:
        import torch

        v = work.to(self.right.dtype)
        v.add_(self.delta(work.shape[0], row0))
        norm = torch.linalg.norm(v, dim=1)
        factor = self.magnitude[row0 : row0 + work.shape[0]].to(v.dtype) / norm
        v.mul_(factor.unsqueeze(1))
        if v is not work:
            work.copy_(v)


class DoraColumns(DeltaRows):
    """DoRA with the norm along the stored columns (Conv1D, Embedding): a first pass over the
    whole tensor sums the squares of `W + ΔW` per column; the merge then scales every row."""

    needs_pass = True

    def __init__(self, left, right, scale, dtype, magnitude: torch.Tensor) -> None:
        import torch

        super().__init__(left, right, scale, dtype, columns=True)
        self.magnitude = magnitude
        self._squares = torch.zeros(self.left.shape[0], dtype=torch.float64, device=right.device)
        self._factor = magnitude

    def _v(self, work: torch.Tensor, row0: int) -> torch.Tensor:
        """W + ΔW in the product's dtype, as PEFT forms it."""
        return work.to(self.right.dtype).add_(self.delta(work.shape[0], row0))

    def observe(self, work: torch.Tensor, row0: int) -> None:
        self._squares += self._v(work, row0).double().square().sum(dim=0)

    def finish(self) -> None:
        dtype = self.right.dtype
        self._factor = self.magnitude.to(dtype) / self._squares.sqrt().to(dtype)

    def merge(self, work: torch.Tensor, row0: int) -> None:
        v = self._v(work, row0)
        v.mul_(self._factor)
        if v is not work:
            work.copy_(v)


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

        from bonemerge.verification import tolerance

        self._exact, self._inner, self._magnitude = exact, inner, magnitude
        self._columns = params.transposed
        self.needs_pass = self._columns
        inputs = shape[0] if self._columns else math.prod(shape[1:])
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


class ChannelRows(RowMaths):
    """An nn.Conv1d weight [out, in, k] streams as out·in rows of k (`dtypes.rows_cols`, the
    view that keeps a fused MoE tensor's experts apart), in chunks of whole output channels
    (`row_multiple`); its LoRA maths runs on the rows PEFT's merge sees, out rows of in·k.
    This views each chunk so, in place."""

    def __init__(self, inner: RowMaths, group: int) -> None:
        self.inner, self.group = inner, group
        self.needs_pass = inner.needs_pass

    def _view(self, work: torch.Tensor) -> torch.Tensor:
        return work.view(-1, self.group * work.shape[1])

    def observe(self, work: torch.Tensor, row0: int) -> None:
        self.inner.observe(self._view(work), row0 // self.group)

    def finish(self) -> None:
        self.inner.finish()

    def merge(self, work: torch.Tensor, row0: int) -> None:
        self.inner.merge(self._view(work), row0 // self.group)

    def unmerge(self, work: torch.Tensor, row0: int) -> None:
        self.inner.unmerge(self._view(work), row0 // self.group)


class ChannelBound(ErrorBound):
    """`ChannelRows` for an error bound: rows of k in, rows of k out, out rows of in·k inside."""

    def __init__(self, inner: ErrorBound, group: int) -> None:
        self.inner, self.group = inner, group
        self.needs_pass = inner.needs_pass

    def _view(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.reshape(-1, self.group * rows.shape[1])

    def observe(self, rows: torch.Tensor, carried: torch.Tensor, row0: int) -> None:
        self.inner.observe(self._view(rows), self._view(carried), row0 // self.group)

    def bound(self, rows: torch.Tensor, row0: int, carried: torch.Tensor, rounded: bool) -> torch.Tensor:
        found = self.inner.bound(self._view(rows), row0 // self.group, self._view(carried), rounded)
        return found.reshape(rows.shape)


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


def _module_reading(block: Block, module: str, shapes: Mapping[str, tuple[int, ...]]) -> LoraParams | None:
    """The module LoRA `block` applies as on a base with tensors `shapes` (`module` named as
    the base names it), or None for a block on a parameter: as `LoraMethod.place` decides."""
    params = block.params
    if not isinstance(params, ParamBlock):
        return params
    if params.linear is None or targets_a_parameter(block, module, shapes.get):
        return None
    return params.linear


def _with_reading(block: Block, params: LoraParams) -> Block:
    """`block` with `params` as its module LoRA (the same block when nothing changes)."""
    if params == _linear(block):
        return block
    if isinstance(block.params, ParamBlock):
        return replace(block, params=replace(block.params, linear=params))
    return replace(block, params=params)


class LoraMethod(Method):
    name = "LoRA"
    kind_names: ClassVar[dict[str, str]] = {"LORA": "LoRA"}
    variants = ("LoRA", "rsLoRA", "DoRA")

    def about(self, config: AdapterConfig) -> About:
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
        settings = {
            "r": s.r,
            "lora_alpha": s.alpha,
            "use_rslora": s.rslora,
            "use_dora": s.dora,
            "fan_in_fan_out": s.fan_in_fan_out,
            "lora_bias": s.lora_bias,
            "rank_pattern": dict(s.rank_pattern),
            "alpha_pattern": dict(s.alpha_pattern),
        } | ({"target_parameters": list(s.target_parameters)} if s.target_parameters else {})
        return About(f"{name} ({', '.join(details)})", "dora" if s.dora else "lora", settings)

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
        if kind == "linear" and len(a) == 3 and len(b) == 3 and b[2] == 1:
            kind = "conv1d"  # nn.Conv1d: lora_A is a Conv1d [r, in, k], lora_B a 1-wide [out, r, 1]
        else:
            _check_factors(a, b, keys, where)
        r_key = _pattern_key(settings.rank_pattern, module)
        alpha_key = _pattern_key(settings.alpha_pattern, module)
        r = dict(settings.rank_pattern)[r_key] if r_key is not None else settings.r
        alpha = dict(settings.alpha_pattern)[alpha_key] if alpha_key is not None else settings.alpha
        if kind == "conv1d" and a[0] == r and b[1] != r and b[1] and r % b[1] == 0:
            raise AdapterError(
                f"{keys['B']} in {where} has shape {list(b)}: LoRA on an nn.Conv1d with groups="
                f"{r // b[1]}, which PEFT cannot merge either (merging needs groups=1); serve it unmerged."
            )
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
        # the flag is only a first guess for Linear/Conv1D layers: `fit` decides from the base
        transposed = kind == "embedding" or (kind == "linear" and settings.fan_in_fan_out)
        return Block(
            module,
            self,
            parts,
            keys,
            LoraParams(kind, transposed, r, scale, settings.dora, settings.fan_in_fan_out),
        )

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

    def fit(
        self,
        blocks: Sequence[tuple[Block, str]],
        shapes: Mapping[str, tuple[int, ...]],
        dtypes: Mapping[str, str],
        model: Mapping,
        where: Path,
    ) -> tuple[list[Block], list[str]]:
        """Each Linear/Conv1D block's layout, decided as PEFT decides it: by the layer it wraps.
        PEFT forces `fan_in_fan_out` on for a transformers `Conv1D` and off for an nn.Linear, so
        the saved flag only tells which kind it wrapped last. The layer kind comes from the
        architecture (config.json's `model_type`, see `layouts`), else from the shapes; a
        square layer of an unknown architecture follows the flag unless the adapter's other
        layers show both kinds, which is refused. Blocks on parameters (`target_parameters`)
        keep their layout, which PEFT's ParamWrapper fixes."""
        conv1d = layouts.conv1d_rule(model)
        readings = {
            i: params
            for i, (block, module) in enumerate(blocks)
            if (params := _module_reading(block, module, shapes)) is not None
        }
        flag = any(params.fan_in_fan_out for params in readings.values())
        linear = [i for i, params in readings.items() if params.kind == "linear"]
        multihead = {
            i: part
            for i in linear
            if not isinstance(blocks[i][0].params, ParamBlock) and (part := _multihead(blocks[i][1], shapes))
        }
        kinds = {
            i: _layer_kind(blocks[i][0], blocks[i][1], shapes.get(blocks[i][1] + ".weight"), conv1d)
            for i in linear
            if i not in multihead
        }
        seen = {kind for kind in kinds.values() if kind is not None}
        result, differ = [], []
        for index, (block, module) in enumerate(blocks):
            if index in multihead:
                result.append(_multihead_block(block, multihead[index], where))
                continue
            if index not in kinds:
                result.append(block)
                continue
            layout = kinds[index]
            if layout is None and module + ".weight" not in shapes:
                layout = False  # a tied output embedding the plan unties: an nn.Linear in PEFT
            elif layout is None:
                if seen - {flag}:
                    raise AdapterError(_ambiguous(block, module, shapes, blocks, kinds, where))
                layout = flag  # square, and nothing in the adapter contradicts the flag
            elif layout != flag:
                differ.append(module)
            result.append(_with_reading(block, replace(readings[index], transposed=layout)))
        notes = [
            f"{blocks[i][1]} is LoRA on an nn.MultiheadAttention; merged as PEFT 0.18.1 merges it "
            "(and computes it in its forward): ΔW into in_proj_weight, the out_proj update added twice"
            for i, part in multihead.items()
            if part == "mha_in"
        ]
        if differ:
            shown = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
            kind = "an nn.Linear layer" if flag else "a transformers Conv1D layer (stored in x out)"
            notes.append(
                f"adapter_config.json says fan_in_fan_out: {str(flag).lower()}, but {shown} "
                f"{'is' if len(differ) == 1 else 'are each'} {kind}; merged as PEFT does, "
                "with the layout of the layer"
            )
        return result, notes

    def targets(self, block: Block) -> tuple[Target, ...]:
        if getattr(block.params, "kind", None) == "mha_in":
            return (Target("in_proj_weight"),)
        if "bias" in block.parts:
            return (Target("weight"), Target("bias", "bias"))
        return (Target("weight"),)

    def _dims(self, block: Block) -> tuple[int, ...]:
        """The shape the stored weight must have."""
        a, b = block.parts["A"].shape, block.parts["B"].shape
        params = _linear(block)
        if params.kind == "conv1d":
            return (b[0], *a[1:])
        return (a[1], b[0]) if params.transposed else (b[0], a[1])

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
        if len(shape) != 2 and params.kind != "conv1d":
            raise AdapterError(
                f"{where} holds 2-D LoRA factors for {name}, which has shape {list(shape)}; they fit "
                "only a Linear, Conv1D or Embedding weight, so is this adapter for this base model?"
            )
        _check_layer_kind(block, name, shape, where)
        if tuple(shape) != self._dims(block):
            layout = {
                "conv1d": "an nn.Conv1d weight out x in x kernel",
                "embedding": "an Embedding (lora_embedding_A is r x vocab, lora_embedding_B dim x r)",
            }.get(
                params.kind,
                "a Conv1D weight stored in x out (fan_in_fan_out)"
                if params.transposed
                else "a Linear weight out x in",
            )
            raise AdapterError(
                f"{where} has lora_A {list(block.parts['A'].shape)} and lora_B "
                f"{list(block.parts['B'].shape)}, which as {layout} need {name} to be "
                f"{list(self._dims(block))}, but it is {list(shape)}; is this adapter for this base model?"
            )
        if params.dora:
            outputs = shape[1] if params.transposed else shape[0]
            need = (1, outputs, 1) if params.kind == "conv1d" else (outputs,)
            magnitude = tuple(block.parts["magnitude"].shape)
            if magnitude != need:
                raise AdapterError(
                    f"{where} has a DoRA magnitude of shape {list(magnitude)}, but {name} needs "
                    f"{list(need)}; the adapter is damaged."
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
        maths = self._maths(op, load, shape, dtype, device, precision)
        group = self.row_multiple(op)
        return ChannelRows(maths, group) if group > 1 else maths

    def row_multiple(self, op: BlockOp) -> int:
        # an nn.Conv1d weight streams as out·in rows of k (`dtypes.rows_cols`): whole output
        # channels stay together, since its LoRA (and DoRA's norm) runs on them
        if getattr(op.block.params, "kind", None) == "conv1d" and op.target.part == "weight":
            return op.block.parts["A"].shape[1]
        return 1

    def _maths(
        self,
        op: BlockOp,
        load: Callable[[str], torch.Tensor],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | str,
        precision: str,
    ) -> RowMaths:
        """The row maths of `op` on the weight's rows as PEFT sees them (an nn.Conv1d's: out
        rows of in·k; an expert parameter's rows as its tensor `shape` lays them)."""
        import torch

        params = _linear(op.block)
        # PEFT's product runs in fp32; fp64 only when asked for, so that default merges match it.
        product = torch.float64 if precision == "fp64" else torch.float32
        if op.target.part == "bias":
            return BiasRows(load("bias").to(device), params.scale, dtype)
        if isinstance(op.target, ParamTarget):
            return expert_rows(op.target, load("A"), load("B"), op.target.scale, product, device, shape)
        a, b = (load(p).to(device=device, dtype=product) for p in ("A", "B"))
        left, right = _factors(a, b)
        if params.kind == "mha_out":
            return TwiceRows(left, right, params.scale, product)
        if not params.dora:
            return DeltaRows(left, right, params.scale, product, params.transposed)
        magnitude = load("magnitude").to(device=device, dtype=dtype)
        kind = DoraColumns if params.transposed else DoraRows
        return kind(left, right, params.scale, product, magnitude)

    def product_terms(self, op: BlockOp) -> int:
        if isinstance(op.target, ParamTarget):
            return op.target.r
        return _linear(op.block).r if op.target.part == "weight" else 0

    def rounds_delta(self, op: BlockOp) -> bool:
        # PEFT's Embedding, nn.Conv1d, MultiheadAttention and ParamWrapper merges add
        # `delta.to(weight dtype)`; Linear and Conv1D add in fp32.
        if isinstance(op.target, ParamTarget):
            return True
        rounded = ("embedding", "conv1d", "mha_in", "mha_out")
        return _linear(op.block).kind in rounded and op.target.part == "weight"

    def error_bound(
        self, op: BlockOp, load: Callable[[str], torch.Tensor], shape: tuple[int, ...], dtype: str
    ) -> ErrorBound:
        import torch

        params = _linear(op.block)
        target = op.target
        scale = abs(target.scale if isinstance(target, ParamTarget) else params.scale)

        def prepare(loader: Callable[[str], torch.Tensor]) -> RowMaths:
            if isinstance(target, ParamTarget):
                return expert_rows(target, loader("A"), loader("B"), scale, torch.float64, "cpu", shape)
            if op.target.part == "bias":
                return BiasRows(loader("bias"), scale, torch.float64)
            left, right = _factors(loader("A"), loader("B"))
            times = 2 if params.kind == "mha_out" else 1  # added twice, as PEFT does
            return DeltaRows(left, right, times * scale, torch.float64, params.transposed)

        found = MagnitudeBound(prepare, load, self.product_terms(op), self.rounds_delta(op), dtype)
        if not isinstance(target, ParamTarget) and params.dora and op.target.part == "weight":
            exact = self._maths(op, load, shape, torch.float64, "cpu", "fp64")
            found = DoraBound(exact, found, load("magnitude").double().reshape(-1), shape, params, dtype)
        group = self.row_multiple(op)
        return ChannelBound(found, group) if group > 1 else found

    def sketch(
        self, op: BlockOp, load: Callable[[str], np.ndarray], shape: tuple[int, ...]
    ) -> tuple[Sketch, ...] | None:
        """ΔW·X as `s · left (right X)`, never building ΔW. DoRA's merge also depends on W (its
        norm), so a DoRA update is identified by the tensors that define it, ΔW and the
        magnitude m, in a space of its own: it matches only DoRA with the same ΔW and m."""
        from bonemerge.output.sketch import of_matrix, of_vector, parts

        if isinstance(op.target, ParamTarget):
            a = load("A")
            packed = len(shape) == 4  # MXFP4 blocks [E, out, in/32, 16]: each expert transposed
            grid = (shape[0] * shape[1], a.shape[1]) if packed else (math.prod(shape[:-1]), shape[-1])
            product = piece_product(op.target, a, load("B"), packed)
            return parts(of_matrix("delta", product, grid))
        params = _linear(op.block)
        if op.target.part == "bias":
            return parts(of_vector("delta", load("bias") * params.scale))
        left, right = _factors(load("A"), load("B"))  # an nn.Conv1d's rows flattened
        if params.transposed:
            left, right = right.T, left.T
        scale = params.scale * (2 if params.kind == "mha_out" else 1)  # added twice, as PEFT does
        space = "dora" if params.dora else "delta"
        delta = of_matrix(space, lambda x: left @ (right @ x) * scale, (shape[0], math.prod(shape[1:])))
        if not params.dora:
            return parts(delta)
        return parts(delta, of_vector("dora-magnitude", load("magnitude")))

    def file_keys(self, block: Block, peft_type: str) -> dict[str, str]:
        stem = PREFIX + block.module
        names = (
            {"A": "lora_embedding_A", "B": "lora_embedding_B"}
            if getattr(block.params, "kind", None) == "embedding"
            else {"A": "lora_A.weight", "B": "lora_B.weight", "bias": "lora_B.bias"}
        )
        names["magnitude"] = "lora_magnitude_vector"
        return {part: f"{stem}.{names[part]}" for part in block.parts}

    def low_rank_tensors(
        self,
        block: Block,
        dtype: str,
        rank: int,
        shape: tuple[int, ...],
        a: Callable[[], torch.Tensor],
        b: Callable[[], torch.Tensor],
    ) -> dict[str, Source]:
        """lora_A (rank x in) and lora_B (out x rank) under PEFT's keys, computed when written."""
        from bonemerge.checkpoint import ComputedTensor

        out_features, in_features = shape
        stem = f"{PREFIX}{block.module}"
        return {
            f"{stem}.lora_A.weight": ComputedTensor(f"{stem}.lora_A.weight", dtype, (rank, in_features), a),
            f"{stem}.lora_B.weight": ComputedTensor(f"{stem}.lora_B.weight", dtype, (out_features, rank), b),
        }

    def low_rank_config(self, raw: dict, ranks: Mapping[str, int]) -> dict:
        """A PEFT LoRA config whose every module has scale 1 (`lora_alpha == r`), so that the
        written factors are the update itself; modules of another rank go to `rank_pattern`
        (and `alpha_pattern`, to keep their scale 1), keyed by their escaped full path."""
        common = Counter(ranks.values()).most_common(1)[0][0]
        pattern = {re.escape(module): k for module, k in sorted(ranks.items()) if k != common}
        config = {
            "peft_type": "LORA",
            "r": common,
            "lora_alpha": common,
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),
            "use_rslora": False,
            "use_dora": False,
            "fan_in_fan_out": False,
            "lora_bias": False,
            "lora_dropout": 0.0,
            "init_lora_weights": True,
            "inference_mode": True,
        }
        config |= {key: raw.get(key) for key in _PLACEMENT}
        config["bias"] = config["bias"] or "none"
        return config


# Keys of a LoRA config that describe where the adapter sits rather than its maths: an
# adapter converted to LoRA sits where the original did.
_PLACEMENT = (
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "bias",
    "base_model_name_or_path",
    "revision",
    "task_type",
)


LORA = LoraMethod()
