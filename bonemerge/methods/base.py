"""The interface every adapter method implements, and the typed pieces it hands around.

A method (Bone/MiSS, LoRA, ...) is one object that knows everything specific to its PEFT
format and maths; the rest of bonemerge is written against this interface only. Adding a
method is one module with a `Method` subclass and one line in the registry.

The split of work: the loader finds a method by `peft_type`, lets it read the config and
claim tensor keys; the planner asks it which base tensors a block changes and whether the
shapes fit; the engine asks it for `RowMaths` on row chunks; strip, inspect and verify ask it
for file names, descriptions and error bounds. Methods never do I/O: tensors reach them as
`Source`s (where the bytes are) or, in the engine, as loaded tensors.

`Method` is an abstract base class: a method that lacks a required hook cannot be
instantiated, so it fails when the registry is imported, not on the one path that needs the
hook. Its hooks come in four groups: the file format (config, keys, blocks, the reduced
config strip writes), the maths (targets, shape checks, row maths, error bounds), naming
(`name`, `variants`, `kind_names`, `about`) and conversion (`strip --to`).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from bonemerge.errors import AdapterError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from bonemerge.checkpoint import Source
    from bonemerge.output.sketch import Sketch

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
        return self.method.about(self).tag

    def describe(self) -> str:
        """`MiSS mini (r=16, mini_r=4)`, `LoRA (r=16, alpha=32)`: how reports name the adapter."""
        return self.method.about(self).text

    def summary(self) -> dict[str, object]:
        """The settings that decide the maths, by their PEFT names: what `inspect --json` shows
        and what adapter fingerprints hash (not how the config spells them)."""
        return self.method.about(self).settings


@dataclass(frozen=True)
class About:
    """How an adapter is named: `text` in reports (`MiSS mini (r=16, mini_r=4)`), `tag` on the
    Hub (`miss`), and the `settings` that decide its maths (inspect, fingerprints)."""

    text: str
    tag: str
    settings: dict[str, object]


class BlockSettings:
    """A block's own settings (variant and sizes for Bone, rank, scale and layout for LoRA):
    each method's is a frozen dataclass deriving from this. `digest` says what, beside the
    tensors, decides the block's result, for resume fingerprints."""

    def digest(self) -> str:
        return repr(self)


@dataclass(frozen=True, eq=False)
class Block:
    """One module's trained tensors (`parts`, by the method's names) and its per-module
    settings (`params`). Tensors stored once for the whole adapter (VeRA's projections) are
    among `parts` too, so that the maths loads them like any other, and named in `shared`, so
    that counts, fingerprints and written files take them once."""

    module: str
    method: Method
    parts: Mapping[str, Source]
    keys: Mapping[str, str]
    params: BlockSettings
    shared: frozenset[str] = frozenset()

    @property
    def key(self) -> str:
        """The key of the block's main tensor in its file, for messages."""
        return next(key for part, key in self.keys.items() if part not in self.shared)

    @property
    def own(self) -> dict[str, Source]:
        """The tensors of this block alone (without the adapter-wide ones)."""
        return {part: source for part, source in self.parts.items() if part not in self.shared}

    @property
    def parameters(self) -> int:
        return sum(math.prod(source.shape) for source in self.own.values())


def shared_tensors(blocks: Sequence[Block]) -> dict[str, Source]:
    """The adapter-wide tensors of `blocks`, once each, by part."""
    found: dict[str, Source] = {}
    for block in blocks:
        for part in sorted(block.shared):
            found.setdefault(part, block.parts[part])
    return found


@dataclass(frozen=True)
class Target:
    """A base tensor a block changes: `suffix` names it beside the module (`weight`, `bias`).
    An `optional` target is changed where the base has it and skipped where it does not
    (IA³ scales a layer's bias only when the layer has one)."""

    suffix: str
    part: str = "weight"
    optional: bool = field(default=False, kw_only=True)  # keyword-only: subclasses add fields


@dataclass(frozen=True, eq=False)
class BlockOp:
    """Merge (or with `inverse`, unmerge) one block into one tensor being built."""

    block: Block
    target: Target
    adapter: str
    inverse: bool = False


@dataclass(frozen=True)
class LowRankUpdate:
    """A tile's update as its factors, for a codec that computes it in the pass that decodes
    and encodes the tile (the product never goes through memory): `round(round(left[rows] @
    right[:, cols]) × multiplier) × alpha`, each rounding to the factors' dtype, which is what
    `columns_update` returns as (product, alpha)."""

    left: torch.Tensor
    right: torch.Tensor
    multiplier: float
    alpha: float


class RowMaths(abc.ABC):
    """A block prepared for one weight, applied in place to row chunks in the compute dtype.

    Rows are the weight's first dimension; `row0` is the index of the chunk's first row.
    A method whose maths needs a statistic over the whole tensor first (DoRA's column norms)
    sets `needs_pass`; the engine then streams the rows once through `observe` before merging.
    """

    needs_pass = False
    #: whether `columns_update` gives the update of a tile of whole rows' columns, with the bits
    #: `merge` gives those elements (the engine then keeps a quantized weight's tiles in cache
    #: from decoding to encoding)
    column_tiles = False

    def observe(self, work: torch.Tensor, row0: int) -> None:
        """The first pass over the rows, for maths that sets `needs_pass`."""
        raise TypeError(f"{type(self).__name__} sets needs_pass without observing the rows")

    def finish(self) -> None:
        """Called once the first pass has observed every row."""
        return None

    @abc.abstractmethod
    def merge(self, work: torch.Tensor, row0: int) -> None:
        """Apply the block to the rows `work` (from row `row0`), in place."""

    @abc.abstractmethod
    def unmerge(self, work: torch.Tensor, row0: int) -> None:
        """Undo `merge` on the rows `work`, in place."""

    def columns_update(
        self, row0: int, rows: int, col0: int, cols: int, sign: int
    ) -> tuple[torch.Tensor, float]:
        """The update (`sign` −1: its undoing) of the tile of `rows` rows from `row0` and `cols`
        columns from `col0`, as (product, alpha): `merge` adds `product × alpha` to the tile with
        one rounding, so that a codec can add it in the same pass as decoding (only where
        `column_tiles`)."""
        raise NotImplementedError

    def low_rank_update(self, sign: int) -> LowRankUpdate | None:
        """`columns_update` as factors, where it is a low-rank product; else None."""
        return None


class ErrorBound(abc.ABC):
    """How far another implementation's merge of one op may lie from the exact value, element
    by element (see `bonemerge.verification.tolerance`). `bound` takes the exact input rows (float64), the
    error bound they carry, and whether the op's tensors were rounded to the weight's dtype
    first (PEFT loads later adapters that way). A bound that needs a whole-tensor statistic
    sets `needs_pass` and sees every row through `observe` first."""

    needs_pass = False

    def observe(self, rows: torch.Tensor, carried: torch.Tensor, row0: int) -> None:
        """The first pass over the rows, for bounds that set `needs_pass`."""
        raise TypeError(f"{type(self).__name__} sets needs_pass without observing the rows")

    @abc.abstractmethod
    def bound(self, rows: torch.Tensor, row0: int, carried: torch.Tensor, rounded: bool) -> torch.Tensor:
        """The error bound of each element of `rows` once the op has been applied."""


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
        from bonemerge.verification import tolerance

        self._magnitudes = prepare(lambda part: load(part).double().abs())
        self._prepare = prepare
        self._load = load
        self._gamma = tolerance.gamma(terms + 2 if terms else 1, dtype)
        self._rounds_delta = rounds_delta
        self._dtype = dtype
        self._moved: RowMaths | None = None

    def bound(self, rows: torch.Tensor, row0: int, carried: torch.Tensor, rounded: bool) -> torch.Tensor:
        import torch

        from bonemerge.verification import tolerance

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
    """A tensor key a method recognises: the module it belongs to and which part it is.
    A `shared` tensor belongs to the whole adapter (its module is empty)."""

    module: str
    part: str
    adapter_name: str | None = None
    peft_type: str | None = None
    shared: bool = False


@dataclass(frozen=True)
class Reduction:
    """What `strip` keeps of an adapter: the modules kept (all of them when nothing was
    filtered), the layers asked for, every block of the adapter (`whole`), and the shapes of
    the base weights its blocks change (by module, when the method asked for the base:
    `needs_base`)."""

    kept: tuple[str, ...]
    filtered: bool
    layers: frozenset[int] | None = None
    whole: tuple[Block, ...] = ()
    weights: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


class Method(abc.ABC):
    """One adapter family. Subclasses implement the abstract hooks and override the others
    where their format or maths needs it."""

    # -- naming ---------------------------------------------------------------------------
    #: how messages and docs name the family
    name: str = ""
    #: the `peft_type` values it reads, and how messages name each (`{"BONE": "Bone", ...}`)
    kind_names: ClassVar[Mapping[str, str]] = {}
    #: the names users know its variants by, for the help texts (`Bone`, `Bat`, `MiSS`)
    variants: tuple[str, ...] = ()
    #: what `strip --to` can make of its adapters, for the help text (empty: nothing)
    conversion_help: str = ""

    @property
    def peft_types(self) -> tuple[str, ...]:
        return tuple(self.kind_names)

    @abc.abstractmethod
    def about(self, config: AdapterConfig) -> About:
        """How reports, the Hub and fingerprints name and identify an adapter of this method."""

    # -- file format ----------------------------------------------------------------------
    @abc.abstractmethod
    def read_config(self, peft_type: str, raw: dict, path: Path) -> Any:
        """Parse the settings the maths depends on; one clear sentence for anything unusable."""

    @abc.abstractmethod
    def claim(self, name: str, config: AdapterConfig) -> KeyClaim | None:
        """The module and part of an adapter-file key (`base_model.model.` removed), if it is
        one of this method's tensors."""

    @abc.abstractmethod
    def claim_training(self, name: str) -> KeyClaim | None:
        """Same for a full PeftModel state dict key, which carries the adapter name
        (`base_model.model.` removed where the key has it)."""

    @abc.abstractmethod
    def make_block(
        self, module: str, parts: dict[str, Source], keys: dict[str, str], config: AdapterConfig, where: Path
    ) -> Block:
        """A block from its tensors (the adapter-wide ones among them), checked against the
        config (shapes, ranks)."""

    @abc.abstractmethod
    def infer_config(
        self,
        peft_type: str,
        blocks: list[tuple[str, dict[str, Source]]],
        base_shapes: dict,
        saved: list[str],
        where: Path,
    ) -> AdapterConfig:
        """The config of a full PEFT checkpoint saved without its adapter_config.json."""

    @abc.abstractmethod
    def file_keys(self, block: Block, peft_type: str) -> dict[str, str]:
        """Each part's key in an adapter file PEFT writes for `peft_type` (no adapter name)."""

    def record_name(self, module: str, part: str) -> str:
        """How an adapter fingerprint names a block tensor (`bonemerge.output.history`)."""
        return f"{module}:{part}"

    def check_shared(self, shared: Mapping[str, Source], config: AdapterConfig, where: Path) -> None:
        """Refuse adapter-wide tensors (claimed `shared`) that are missing or do not fit the
        config; a method that claims none has nothing to check."""
        return None

    def reduced_config(self, raw: dict, reduction: Reduction) -> dict:
        """The adapter_config.json of the adapter `strip` writes from one whose config is `raw`:
        when modules were filtered out, `target_modules` lists the kept module paths (PEFT
        matches a listed full path exactly), nothing is excluded, and `layers_to_transform`
        holds the kept layers, so that PEFT neither builds empty blocks for modules that are
        gone nor warns about missing keys. A method with fields that depend on these extends it."""
        from bonemerge.adapters.matching import layer_of

        config = dict(raw)
        if reduction.filtered:
            config["target_modules"] = sorted(reduction.kept)
            config["exclude_modules"] = None
            if reduction.layers is not None:
                found = [layer_of(m) for m in reduction.kept]
                config["layers_to_transform"] = sorted({f[1] for f in found if f})
                patterns = sorted({f[0] for f in found if f})
                config["layers_pattern"] = patterns[0] if len(patterns) == 1 else patterns
        return config

    def reduced_shared(
        self, blocks: Sequence[Block], peft_type: str, reduction: Reduction
    ) -> dict[str, Source]:
        """The adapter-wide tensors, by their key in a `peft_type` adapter file, of the adapter
        `strip` writes with `blocks`."""
        if not blocks:
            return {}
        keys = self.file_keys(blocks[0], peft_type)
        return {keys[part]: source for part, source in shared_tensors(blocks).items()}

    def needs_base(self, config: AdapterConfig, peft_type: str, filtered: bool) -> bool:
        """Whether `strip` (to `peft_type`, with modules `filtered` out or not) needs the base
        model: its shapes, or its values."""
        return False

    # -- maths ----------------------------------------------------------------------------
    def fit(
        self,
        blocks: Sequence[tuple[Block, str]],
        shapes: Mapping[str, tuple[int, ...]],
        dtypes: Mapping[str, str],
        model: Mapping,
        where: Path,
    ) -> tuple[list[Block], list[str]]:
        """The blocks as they apply to one base, and notes for the user. `blocks` pairs each
        block with its module's name in the base, `shapes` and `dtypes` hold the base's tensor
        shapes and dtypes, and `model` its config.json: what the adapter file cannot say
        (LoRA's per-layer layout, the parameter an nn.MultiheadAttention's LoRA changes, the
        projections VeRA draws) is decided here, from the base, before any shape is checked;
        a block may come back with the name of the module whose tensors it changes."""
        return [block for block, _ in blocks], []

    def targets(self, block: Block) -> tuple[Target, ...]:
        """The base tensors the block changes, beside its module."""
        return (Target("weight"),)

    def place(
        self, block: Block, module: str, shape_of: Callable[[str], tuple[int, ...] | None], where: str
    ) -> list[tuple[str, Target]]:
        """The base tensors `block` changes, by name, once its module is named as the base names
        it (`module`): `<module>.<suffix>` for each target, unless the block is a parameter that
        the checkpoint stores in other pieces (fused MoE experts, one tensor per expert).
        `shape_of` gives a base tensor's current shape, or None if there is none."""
        return [(f"{module}.{target.suffix}", target) for target in self.targets(block)]

    @abc.abstractmethod
    def check_target(
        self, block: Block, target: Target, name: str, shape: tuple[int, ...], where: str, inverse: bool
    ) -> None:
        """The block must fit the tensor `name` it changes; refuse what cannot be done."""

    def module_scoped(self, block: Block) -> bool:
        """Whether PEFT's module scope (target_modules, exclude_modules, layers_to_transform)
        decides if it loads this block; not for blocks on parameters, which PEFT matches
        against target_parameters alone."""
        return True

    def row_multiple(self, op: BlockOp) -> int:
        """Rows that must stay together in one chunk."""
        return 1

    @abc.abstractmethod
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

    def check_inverse(self, block: Block, load: Callable[[str], torch.Tensor]) -> None:
        """Refuse, before anything is written, a block whose merge cannot be undone reliably."""
        return None

    def product_terms(self, op: BlockOp) -> int:
        """Terms of the fp32 inner products in the merge, which bound its rounding error."""
        return 0

    def rounds_delta(self, op: BlockOp) -> bool:
        """Whether PEFT rounds the update to the weight's dtype before adding it."""
        return False

    def error_bound(
        self, op: BlockOp, load: Callable[[str], torch.Tensor], shape: tuple[int, ...], dtype: str
    ) -> ErrorBound:
        """The per-element error bound of merging `op` into a `dtype` weight of `shape`
        (`bonemerge.verification.tolerance`): by default the merge maths applied to magnitudes, with γ over
        `product_terms` (see `MagnitudeBound`). Each method's docstring states its bound."""
        import torch

        def prepare(loader: Callable[[str], torch.Tensor]) -> RowMaths:
            return self.prepare(op, loader, shape, torch.float64, "cpu", "fp64")

        return MagnitudeBound(prepare, load, self.product_terms(op), self.rounds_delta(op), dtype)

    def sketch(
        self, op: BlockOp, load: Callable[[str], np.ndarray], shape: tuple[int, ...]
    ) -> tuple[Sketch, ...] | None:
        """A few numbers identifying the update `op` makes to a tensor of `shape`, whatever
        files hold it (see `bonemerge.output.sketch`): one sketch per tensor that defines the update.
        `load` gives a part as a float32 (float64) numpy array, since the history guards run
        while torch is still loading. None (the default) leaves the history to the byte
        fingerprint alone."""
        return None

    # -- conversion -----------------------------------------------------------------------
    def conversions(self, config: AdapterConfig) -> dict[str, str]:
        """`strip --to` names this adapter can become, with the `peft_type` each gives."""
        return {}

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
        keys = self.file_keys(block, peft_type)
        return Converted({keys[part]: source for part, source in block.own.items()})

    def converted_config(self, raw: dict, peft_type: str, converted: Mapping[str, Converted]) -> dict:
        """The adapter_config.json of a converted adapter (`converted` by module)."""
        return dict(raw, peft_type=peft_type)

    def conversion_names(self) -> tuple[str, ...]:
        """Every `--to` name this method can offer, for the CLI's choices."""
        return ()

    def refuse_conversion(self, config: AdapterConfig, name: str, where: Path) -> str:
        """Why `strip --to name` cannot convert this adapter, in one sentence."""
        return f"{where} is a {config.describe()} adapter, which cannot be converted to {name}."

    def low_rank_tensors(
        self,
        block: Block,
        dtype: str,
        rank: int,
        shape: tuple[int, ...],
        a: Callable[[], torch.Tensor],
        b: Callable[[], torch.Tensor],
    ) -> dict[str, Source]:
        """For a method other methods convert to: the file tensors of `block`'s update written
        as `B @ A` at scale 1 (`a`, `b` compute the factors when the engine writes them)."""
        raise AdapterError(f"{self.name} adapters cannot be written from low-rank factors.")

    def low_rank_config(self, raw: dict, ranks: Mapping[str, int]) -> dict:
        """The config of an adapter written with `low_rank_tensors` at `ranks` (by module),
        placed where the adapter with config `raw` was."""
        raise AdapterError(f"{self.name} adapters cannot be written from low-rank factors.")
