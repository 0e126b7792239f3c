"""The interface every adapter method implements, and the typed pieces it hands around.

A method (Bone/MiSS, LoRA, ...) is one object that knows everything specific to its PEFT
format and maths; the rest of bonemerge is written against this interface only. Adding a
method is one module with a `Method` subclass and one line in the registry.

The split of work: the loader finds a method by `peft_type`, lets it read the config and
claim tensor keys; the planner asks it which base tensors a block changes and whether the
shapes fit; the engine asks it for `RowMaths` on row chunks; strip, inspect and verify ask it
for file names, descriptions and error bounds. Methods never do I/O: tensors reach them as
`Source`s (where the bytes are) or, in the engine, as loaded tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from bonemerge.checkpoint import Source
    from bonemerge.sketch import Sketch

PREFIX = "base_model.model."
# Module names (last segment) of the output and input embeddings across architectures: the
# vocabulary lives in their rows, and an input embedding is an nn.Embedding, never a Linear.
OUTPUT_EMBEDDINGS = ("lm_head", "embed_out")
INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "shared")


@dataclass(frozen=True)
class AdapterConfig:
    """An adapter's config: its method, the method's parsed settings, and the raw JSON."""

    method: Method
    peft_type: str
    settings: Any
    raw: dict

    @property
    def base_model(self) -> str | None:
        value = self.raw.get("base_model_name_or_path")
        return value if isinstance(value, str) and value else None

    @property
    def modules_to_save(self) -> tuple[str, ...]:
        value = self.raw.get("modules_to_save") or ()
        return tuple(value) if isinstance(value, list | tuple) else ()

    @property
    def tag(self) -> str:
        """The Hub tag for this kind of adapter (`bone`, `bat`, `miss`, `lora`, `dora`...)."""
        return self.method.tag(self)

    def describe(self) -> str:
        """`MiSS mini (r=16, mini_r=4)`, `LoRA (r=16, alpha=32)`: how reports name the adapter."""
        return self.method.describe(self)

    def summary(self) -> dict[str, object]:
        """The settings `inspect --json` shows, by their PEFT names."""
        return self.method.summary(self)


@dataclass(frozen=True, eq=False)
class Block:
    """One module's trained tensors (`parts`, by the method's names) and its per-module
    settings (`params`: variant and sizes for Bone, rank and scale for LoRA)."""

    module: str
    method: Method
    parts: Mapping[str, Source]
    keys: Mapping[str, str]
    params: Any

    @property
    def key(self) -> str:
        """The key of the block's main tensor in its file, for messages."""
        return next(iter(self.keys.values()))

    @property
    def parameters(self) -> int:
        import math

        return sum(math.prod(source.shape) for source in self.parts.values())


@dataclass(frozen=True)
class Target:
    """A base tensor a block changes: `suffix` names it beside the module (`weight`, `bias`)."""

    suffix: str
    part: str = "weight"


@dataclass(frozen=True, eq=False)
class BlockOp:
    """Merge (or with `inverse`, unmerge) one block into one tensor being built."""

    block: Block
    target: Target
    adapter: str
    inverse: bool = False


class RowMaths:
    """A block prepared for one weight, applied in place to row chunks in the compute dtype.

    Rows are the weight's first dimension; `row0` is the index of the chunk's first row.
    A method whose maths needs a statistic over the whole tensor first (DoRA's column norms)
    sets `needs_pass`; the engine then streams the rows once through `observe` before merging.
    """

    needs_pass = False
    #: whether `merge_columns`/`unmerge_columns` apply the block to a tile of whole rows' columns,
    #: giving the bits `merge` gives those elements (the engine then keeps a quantized weight's
    #: tiles in cache from decoding to encoding)
    column_tiles = False

    def observe(self, work: torch.Tensor, row0: int) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Called once the first pass has observed every row."""

    def merge(self, work: torch.Tensor, row0: int) -> None:
        raise NotImplementedError

    def unmerge(self, work: torch.Tensor, row0: int) -> None:
        raise NotImplementedError

    def merge_columns(self, work: torch.Tensor, row0: int, col0: int) -> None:
        """`merge` on columns `col0...` of rows `row0...` (only where `column_tiles`)."""
        raise NotImplementedError

    def unmerge_columns(self, work: torch.Tensor, row0: int, col0: int) -> None:
        raise NotImplementedError


class ErrorBound:
    """How far another implementation's merge of one op may lie from the exact value, element
    by element (see `bonemerge.tolerance`). `bound` takes the exact input rows (float64), the
    error bound they carry, and whether the op's tensors were rounded to the weight's dtype
    first (PEFT loads later adapters that way). A bound that needs a whole-tensor statistic
    sets `needs_pass` and sees every row through `observe` first."""

    needs_pass = False

    def observe(self, rows: torch.Tensor, carried: torch.Tensor, row0: int) -> None:
        raise NotImplementedError

    def bound(self, rows: torch.Tensor, row0: int, carried: torch.Tensor, rounded: bool) -> torch.Tensor:
        raise NotImplementedError


class MagnitudeBound(ErrorBound):
    """The bound of a merge that adds a product of its tensors to the weight: the merge maths
    applied to magnitudes gives |W| + |ΔW|-bound and the layout of |ΔW|, and γ over the
    product's terms (plus two roundings) bounds what another order of operations can change."""

    def __init__(
        self,
        prepare: Callable[[Callable[[str], torch.Tensor]], RowMaths],
        load: Callable[[str], torch.Tensor],
        terms: int,
        rounds_delta: bool,
        dtype: str,
    ) -> None:
        from bonemerge import tolerance

        self._magnitudes = prepare(lambda part: load(part).double().abs())
        self._prepare = prepare
        self._load = load
        self._gamma = tolerance.gamma(terms + 2 if terms else 1, dtype)
        self._rounds_delta = rounds_delta
        self._dtype = dtype
        self._moved: RowMaths | None = None

    def bound(self, rows: torch.Tensor, row0: int, carried: torch.Tensor, rounded: bool) -> torch.Tensor:
        import torch

        from bonemerge import tolerance

        magnitude = rows.abs()
        total = magnitude.clone()
        self._magnitudes.merge(total, row0)
        spread = torch.zeros_like(rows)
        self._magnitudes.merge(spread, row0)
        through = carried.clone()
        self._magnitudes.merge(through, row0)
        through -= spread
        if rounded:
            # Tensors off by half an ulp change the result by at most the merge of the enlarged
            # magnitudes minus the merge of the magnitudes.
            if self._moved is None:
                self._moved = self._prepare(
                    lambda part: (lambda v: v.abs() + 0.5 * tolerance.ulp(v, self._dtype))(
                        self._load(part).double()
                    )
                )
            moved = magnitude.clone()
            self._moved.merge(moved, row0)
            through += moved - total
        bound = through + self._gamma * total
        if self._rounds_delta:
            bound += 0.5 * tolerance.ulp(total - magnitude, self._dtype)
        return bound


@dataclass(frozen=True)
class Converted:
    """A block as another method's adapter file holds it: tensors by file key, and for a
    conversion to LoRA the rank it was written at and, when it is not exact, its relative
    Frobenius error (`sqrt(discarded / total)`, both squared norms, so errors can be pooled)."""

    tensors: dict[str, Source]
    rank: int | None = None
    discarded: float = 0.0
    total: float = 0.0
    # An approximation's rank at which it is exact (min(out, in)), and its relative error at
    # the largest rank whose factors hold at most half the values of the weight: what
    # `--max-error` keeps the adapter small. Unset (0) for exact conversions.
    full_rank: int = 0
    compact_error: float = 0.0

    @property
    def error(self) -> float:
        return (self.discarded / self.total) ** 0.5 if self.total else 0.0


@dataclass(frozen=True)
class RankRequest:
    """`strip --rank K` or `--rank auto --max-error E`, for conversions that approximate."""

    rank: int | None = None
    max_error: float | None = None

    @property
    def given(self) -> bool:
        return self.rank is not None or self.max_error is not None


@dataclass
class KeyClaim:
    """A tensor key a method recognises: the module it belongs to and which part it is."""

    module: str
    part: str
    adapter_name: str | None = None
    peft_type: str | None = None


class Method:
    """One adapter family. Subclasses override what their format and maths need."""

    #: how messages and docs name the family
    name: str = ""
    #: the `peft_type` values it reads
    peft_types: tuple[str, ...] = ()
    #: the names users know its variants by, for the help texts (`Bone`, `Bat`, `MiSS`)
    variants: tuple[str, ...] = ()

    # -- configs and files ---------------------------------------------------------------
    def read_config(self, peft_type: str, raw: dict, path: Path) -> Any:
        """Parse the settings the maths depends on; one clear sentence for anything unusable."""
        raise NotImplementedError

    def claim(self, name: str, config: AdapterConfig) -> KeyClaim | None:
        """The module and part of an adapter-file key (`base_model.model.` removed), if it is
        one of this method's tensors."""
        raise NotImplementedError

    def claim_training(self, name: str) -> KeyClaim | None:
        """Same for a full PeftModel state dict key, which carries the adapter name."""
        raise NotImplementedError

    def make_block(
        self, module: str, parts: dict[str, Source], keys: dict[str, str], config: AdapterConfig, where: Path
    ) -> Block:
        """A block from its tensors, checked against the config (shapes, ranks)."""
        raise NotImplementedError

    def infer_config(
        self,
        peft_type: str,
        blocks: list[tuple[str, dict[str, Source]]],
        base_shapes: dict,
        saved: list[str],
        where: Path,
    ) -> AdapterConfig:
        """The config of a full PEFT checkpoint saved without its adapter_config.json."""
        raise NotImplementedError

    # -- planning -------------------------------------------------------------------------
    def fit(
        self,
        blocks: Sequence[tuple[Block, str]],
        shapes: Mapping[str, tuple[int, ...]],
        model: Mapping,
        where: Path,
    ) -> tuple[list[Block], list[str]]:
        """The blocks as they apply to one base, and notes for the user. `blocks` pairs each
        block with its module's name in the base, `shapes` holds the base's tensor shapes and
        `model` its config.json: what the adapter file cannot say (LoRA's per-layer layout,
        the parameter an nn.MultiheadAttention's LoRA changes) is decided here, from the base,
        before any shape is checked; a block may come back with the name of the module whose
        tensors it changes."""
        return [block for block, _ in blocks], []

    def targets(self, block: Block) -> tuple[Target, ...]:
        return (Target("weight"),)

    def place(
        self, block: Block, module: str, shape_of: Callable[[str], tuple[int, ...] | None], where: str
    ) -> list[tuple[str, Target]]:
        """The base tensors `block` changes, by name, once its module is named as the base names
        it (`module`): `<module>.<suffix>` for each target, unless the block is a parameter that
        the checkpoint stores in other pieces (fused MoE experts, one tensor per expert).
        `shape_of` gives a base tensor's current shape, or None if there is none."""
        return [(f"{module}.{target.suffix}", target) for target in self.targets(block)]

    def check_target(
        self, block: Block, target: Target, name: str, shape: tuple[int, ...], where: str, inverse: bool
    ) -> None:
        """The block must fit the tensor `name` it changes; refuse what cannot be done."""
        raise NotImplementedError

    def module_scoped(self, block: Block) -> bool:
        """Whether PEFT's module scope (target_modules, exclude_modules, layers_to_transform)
        decides if it loads this block; not for blocks on parameters, which PEFT matches
        against target_parameters alone."""
        return True

    def row_multiple(self, op: BlockOp) -> int:
        """Rows that must stay together in one chunk."""
        return 1

    def settings_digest(self, block: Block) -> str:
        """What, beside the tensors, decides the block's result (for resume fingerprints)."""
        return repr(block.params)

    # -- maths ----------------------------------------------------------------------------
    def prepare(
        self,
        op: BlockOp,
        load: Callable[[str], torch.Tensor],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | str,
        precision: str,
    ) -> RowMaths:
        """Ready `op` for a tensor of `shape`, loading the parts it needs with `load`."""
        raise NotImplementedError

    def check_inverse(self, block: Block, load: Callable[[str], torch.Tensor]) -> None:
        """Refuse, before anything is written, a block whose merge cannot be undone reliably."""

    def product_terms(self, op: BlockOp) -> int:
        """Terms of the fp32 inner products in the merge, which bound its rounding error."""
        return 0

    def rounds_delta(self, op: BlockOp) -> bool:
        """Whether PEFT rounds the update to the weight's dtype before adding it."""
        return False

    def error_bound(
        self, op: BlockOp, load: Callable[[str], torch.Tensor], shape: tuple[int, ...], dtype: str
    ) -> ErrorBound:
        """The per-element error bound of merging `op` into a `dtype` weight of `shape`."""
        import torch

        def prepare(loader: Callable[[str], torch.Tensor]) -> RowMaths:
            return self.prepare(op, loader, shape, torch.float64, "cpu", "fp64")

        return MagnitudeBound(prepare, load, self.product_terms(op), self.rounds_delta(op), dtype)

    def sketch(
        self, op: BlockOp, load: Callable[[str], np.ndarray], shape: tuple[int, ...]
    ) -> tuple[Sketch, ...] | None:
        """A few numbers identifying the update `op` makes to a tensor of `shape`, whatever
        files hold it (see `bonemerge.sketch`): one sketch per tensor that defines the update.
        `load` gives a part as a float32 (float64) numpy array, since the history guards run
        while torch is still loading. None (the default) leaves the history to the byte
        fingerprint alone."""
        return None

    # -- describing and converting --------------------------------------------------------
    def describe(self, config: AdapterConfig) -> str:
        raise NotImplementedError

    def kind_name(self, peft_type: str) -> str:
        """How messages name adapters of `peft_type`."""
        return self.name

    def summary(self, config: AdapterConfig) -> dict[str, object]:
        raise NotImplementedError

    def tag(self, config: AdapterConfig) -> str:
        raise NotImplementedError

    def identity(self, config: AdapterConfig) -> dict[str, object]:
        """The settings that decide the maths, for adapter fingerprints (not how they are spelt)."""
        return self.summary(config)

    def file_keys(self, block: Block, peft_type: str) -> dict[str, str]:
        """Each part's key in an adapter file PEFT writes for `peft_type` (no adapter name)."""
        raise NotImplementedError

    def conversions(self, config: AdapterConfig) -> dict[str, str]:
        """`strip --to` names this adapter can become, with the `peft_type` each gives."""
        return {}

    def conversion_needs_base(self, config: AdapterConfig, peft_type: str) -> bool:
        """Whether converting needs the base model (its shapes, or its values)."""
        return False

    def convert(
        self,
        block: Block,
        peft_type: str,
        *,
        base: Source | None,
        load: Callable[[Source], torch.Tensor],
        rank: RankRequest,
    ) -> Converted:
        """`block` as a `peft_type` file holds it; `base` is the weight it merges into."""
        return Converted({self.file_keys(block, peft_type)[part]: src for part, src in block.parts.items()})

    def converted_config(self, raw: dict, peft_type: str, converted: Mapping[str, Converted]) -> dict:
        """The adapter_config.json of a converted adapter (`converted` by module)."""
        return dict(raw, peft_type=peft_type)

    def conversion_names(self) -> tuple[str, ...]:
        """Every `--to` name this method can offer, for the CLI's choices."""
        return ()

    def refuse_conversion(self, config: AdapterConfig, name: str, where: Path) -> str:
        """Why `strip --to name` cannot convert this adapter, in one sentence."""
        return f"{where} is a {self.describe(config)} adapter, which cannot be converted to {name}."
