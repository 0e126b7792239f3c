"""Compiling a command into a `Plan`: every output tensor's name, dtype, shape and recipe.

Planning reads headers and adapter configs only, so every check that can fail (names that do
not match, shapes that contradict, dtypes that cannot be computed on) fails here, before the
long I/O starts. The engine then executes the plan without making a single decision.

Merging applies adapters in order, each onto the result of the ones before: a tensor an
adapter saves in full (modules_to_save, a saved bias, a resized embedding) replaces the
current tensor, then the adapter's blocks merge onto it. Unmerging walks the same adapters
backwards with inverted blocks; unloading applies the saved full tensors and no blocks.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from bonemerge.adapters import Adapter, Block, PrefixRule, closest, infer_rule
from bonemerge.checkpoint import Checkpoint, Source, TensorRef, dtypes, layout
from bonemerge.checkpoint.layout import ShardPlan
from bonemerge.checkpoint.reader import file_identity
from bonemerge.checkpoint.writer import METADATA, Entry, encode_header
from bonemerge.codecs import Derived, Stored, find_stored
from bonemerge.codecs.planning import plan_storage
from bonemerge.errors import AdapterError
from bonemerge.methods import INPUT_EMBEDDINGS, OUTPUT_EMBEDDINGS, BlockOp, Target

__all__ = ["BlockOp", "Plan", "Step", "build_plan"]


@dataclass(frozen=True)
class Step:
    """How one output tensor is produced: rows read from `source` (decoded by the codec that
    stores it, `decode`, when it is not dense), ops applied, rounded to dtype (or encoded on
    its stored scales by `encode`)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: Source | Derived
    ops: tuple[BlockOp, ...] = ()
    decode: Stored | None = None
    encode: Stored | None = None

    @property
    def nbytes(self) -> int:
        return dtypes.nbytes(self.dtype, math.prod(self.shape)) or 0

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, stored elements per row) as the engine streams the step: its codec's view of
        a quantized weight (MXFP4's bytes of two codes), else `rows_cols` of its shape."""
        stored = self.encode or self.decode
        return stored.codec.grid(stored) if stored is not None else dtypes.rows_cols(self.shape)

    @property
    def written_grid(self) -> tuple[int, int]:
        """(rows, elements per row) of the tensor as written: the codes' grid when the step is
        re-encoded, else its values (twice as wide as a grid of two codes a byte)."""
        rows, cols = self.grid
        return rows, cols if self.encode is not None else cols * self.values_per_code

    @property
    def values_per_code(self) -> int:
        """Values per element of the grid (2 for MXFP4)."""
        stored = self.encode or self.decode
        return stored.codec.values_per_code if stored is not None else 1

    @property
    def is_copy(self) -> bool:
        """True when the bytes can go file-to-file untouched."""
        return (
            not self.ops
            and self.decode is None
            and self.dtype == self.source.dtype
            and isinstance(self.source, TensorRef)
        )

    def entry(self) -> Entry:
        return Entry(self.name, self.dtype, self.shape, self.nbytes)


@dataclass(frozen=True)
class Plan:
    """Everything the engine and the companion writer need, decided up front."""

    shards: tuple[ShardPlan, ...]
    steps: dict[str, Step]
    write_index: bool
    index_name: str
    config_updates: dict[str, object] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def file_bytes(self) -> int:
        """Bytes the weight files will take on disk, headers included."""
        return sum(len(encode_header(s.entries, METADATA)) + s.data_bytes for s in self.shards)

    def input_files(self) -> dict[Path, tuple[int, ...]]:
        """Every file the plan reads tensor bytes from, with its identity when it was opened
        (the one it has now, where that was not recorded)."""
        sources = (
            [s.source for s in self.steps.values()]
            + [part for s in self.steps.values() for op in s.ops for part in op.block.parts.values()]
            + [part for s in self.steps.values() if s.decode for part in s.decode.companions.values()]
        )
        files: dict[Path, tuple[int, ...]] = {}
        for source in sources:
            if isinstance(source, TensorRef) and not files.get(source.path):
                files[source.path] = source.identity or file_identity(source.path)
        return files

    def fingerprint(self, **settings: object) -> str:
        """A digest of everything that decides the output's bytes: layout, recipes, the input
        files as they were opened (`file_identity`: size, times, inode), and `settings`. Two
        plans with the same fingerprint write the same files, which is what makes resuming safe."""
        identities = self.input_files()

        def describe(source: Source | Derived) -> list:
            if isinstance(source, TensorRef):
                identity = identities.get(source.path) or source.identity or file_identity(source.path)
                return [str(source.path), source.offset, source.nbytes, *identity]
            if isinstance(source, Derived):
                return ["derived", source.weight.name, source.role, describe(source.stored)]
            recipe = getattr(source, "recipe", None)
            if recipe is not None:  # a codec's dequantized weight: what it is decoded from
                return [*recipe, describe(source.stored)]
            return [
                "memory",
                hashlib.sha256(source.tensor.contiguous().view(-1).numpy().tobytes()).hexdigest(),
            ]

        described = {
            "shards": [
                [s.filename, [[e.name, e.dtype, list(e.shape)] for e in s.entries]] for s in self.shards
            ],
            "steps": [
                [
                    s.name,
                    s.dtype,
                    describe(s.source),
                    [
                        [*stored.describe(), [describe(c) for _, c in sorted(stored.companions.items())]]
                        for stored in (s.decode, s.encode)
                        if stored is not None
                    ],
                    [
                        [
                            o.block.method.name,
                            o.block.params.digest(),
                            o.target.suffix,
                            o.inverse,
                            [[part, describe(source)] for part, source in sorted(o.block.parts.items())],
                        ]
                        for o in s.ops
                    ],
                ]
                for s in self.steps.values()
            ],
            "settings": settings,
        }
        return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()

    @property
    def main_dtype(self) -> str:
        """The float dtype holding most of the output's bytes."""
        return main_float(self.steps.values())


def _module(name: str) -> str:
    """`model.embed_tokens` for `model.embed_tokens.weight`: the last segment removed."""
    return name.rsplit(".", 1)[0]


def _leaf(name: str) -> str:
    return _module(name).rsplit(".", 1)[-1]


def _resizes_vocabulary(name: str, old: tuple[int, ...], new: tuple[int, ...]) -> bool:
    """Whether `old` -> `new` is a vocabulary resize: an input or output embedding (or the output
    bias) that keeps every dimension but its rows."""
    embedding = _leaf(name) in INPUT_EMBEDDINGS + OUTPUT_EMBEDDINGS
    return embedding and len(old) == len(new) >= 1 and old[1:] == new[1:]


def _vocabulary(steps: dict[str, Step]) -> dict[str, int]:
    """Rows of every input and output embedding weight: the vocabulary each one holds."""
    return {
        name: step.shape[0]
        for name, step in steps.items()
        if name.endswith(".weight") and _leaf(name) in INPUT_EMBEDDINGS + OUTPUT_EMBEDDINGS and step.shape
    }


def fit_blocks(
    adapter: Adapter,
    rule: PrefixRule,
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, str],
    config: dict | None,
    notes: list[str],
) -> list[tuple[Block, str]]:
    """The adapter's blocks as each method fits them to this base (`Method.fit`), with the
    name of their module in the base; the methods' notes are added to `notes`."""
    named = [(block, rule.apply(block.module)) for block in adapter.blocks]
    fitted: dict[int, Block] = {}
    for method in dict.fromkeys(block.method for block, _ in named):
        own = [(i, pair) for i, pair in enumerate(named) if pair[0].method is method]
        blocks, said = method.fit([pair for _, pair in own], shapes, dtypes, config or {}, adapter.root)
        fitted.update((i, block) for (i, _), block in zip(own, blocks, strict=True))
        notes.extend(f"{adapter.label}: {note}" for note in said)
    return [(fitted[i], rule.apply(fitted[i].module)) for i in range(len(named))]


class _Builder:
    """Applies adapters one after another to a map of output tensor -> current recipe."""

    def __init__(self, base: Checkpoint, config: dict | None) -> None:
        self.base = base
        self.config = config or {}
        self.steps: dict[str, Step] = {
            name: Step(name, ref.dtype, ref.shape, ref) for name, ref in base.tensors.items()
        }
        for name, stored in find_stored(base).items():
            if not stored.codec.encodes:  # seen as the dense weight it is always written as
                dense = stored.codec.dense_dtype(stored)
                self.steps[name] = Step(name, dense, stored.values_shape, stored.weight)
        self.notes: list[str] = []
        self.untied = False

    def _tied_embedding(self, target: str, block: Block, adapter: Adapter) -> Step:
        """The input embedding an absent, tied output embedding shares its weight with."""
        if self.config.get("tie_word_embeddings") is False:
            raise AdapterError(
                f"block {block.key} of {adapter.root} targets {target}, which {self.base.root} "
                "lacks although its config.json says tie_word_embeddings: false; the base is incomplete."
            )
        found = [
            s
            for name, s in self.steps.items()
            if _leaf(name) in INPUT_EMBEDDINGS and name.endswith(".weight")
        ]
        if len(found) != 1:
            raise AdapterError(
                f"block {block.key} of {adapter.root} targets the tied output embedding {target}, "
                f"but {'no' if not found else 'more than one'} input embedding to untie it from "
                f"was found in {self.base.root}."
            )
        self.untied = True
        self.notes.append(f"{target} was tied to {found[0].name}; it is written on its own and untied")
        return Step(target, found[0].dtype, found[0].shape, found[0].source)

    def _replace(self, target: str, source: Source, adapter: Adapter, why: str, key: str) -> None:
        current = self.steps.get(target)
        if current is None:
            self.notes.append(f"{target} is added from {adapter.label} (not in the base)")
            if _leaf(target) in OUTPUT_EMBEDDINGS:
                self.untied = True
        elif current.ops:
            self.notes.append(f"{adapter.label} {why} {target}, superseding the block operations on it")
        shape = tuple(source.shape)
        if current is not None and current.shape != shape:
            if not _resizes_vocabulary(target, current.shape, shape):
                raise AdapterError(
                    f"{key} in {adapter.weights} has shape {list(shape)}, but "
                    f"{target} has shape {list(current.shape)}; only an embedding's vocabulary (its rows) "
                    "can change size, so is this adapter for this model?"
                )
            self.notes.append(f"{target} changes shape from {list(current.shape)} to {list(shape)}")
        dtype = current.dtype if current is not None else source.dtype
        self.steps[target] = Step(target, dtype, shape, source)

    def _rule(self, adapter: Adapter) -> PrefixRule:
        rule = infer_rule([b.module for b in adapter.blocks], self.steps.keys(), f"{adapter.root}")
        if rule != PrefixRule():
            self.notes.append(f"{adapter.label}: module names matched as {rule}")
        return rule

    def _target(self, name: str, rule: PrefixRule) -> str:
        """Where a saved full tensor goes: the rule's name, else its own name if the base has it."""
        mapped = rule.apply(name)
        return mapped if mapped in self.steps or name not in self.steps else name

    def _shape_of(self, name: str) -> tuple[int, ...] | None:
        step = self.steps.get(name)
        return step.shape if step is not None else None

    def _blocks(self, adapter: Adapter, rule: PrefixRule, inverse: bool, skip: set[str]) -> None:
        shapes = {name: step.shape for name, step in self.steps.items()}
        dtypes = {name: step.dtype for name, step in self.steps.items()}
        for block, module in fit_blocks(adapter, rule, shapes, dtypes, self.config, self.notes):
            where = f"block {block.key} of {adapter.root}"
            for name, target in block.method.place(block, module, self._shape_of, where):
                self._block(adapter, block, target, name, inverse, skip)

    def _block(
        self, adapter: Adapter, block: Block, target: Target, name: str, inverse: bool, skip: set[str]
    ) -> None:
        if name in skip:
            return
        step = self.steps.get(name)
        if step is None and target.part == "weight" and _leaf(name) in OUTPUT_EMBEDDINGS and not inverse:
            step = self._tied_embedding(name, block, adapter)
        if step is None and target.optional:
            return
        if step is None:
            raise AdapterError(
                f"adapter tensor {block.keys.get(target.part, block.key)} of {adapter.root} has no matching "
                f"{target.suffix} {name} in {self.base.root} ({closest(name, self.steps)}); "
                "is this adapter for this model?"
            )
        where = f"block {block.key} of {adapter.root}"
        block.method.check_target(block, target, name, step.shape, where, inverse)
        op = BlockOp(block, target, adapter.label, inverse)
        self.steps[name] = replace(step, ops=(*step.ops, op))

    def _keep_vocabulary(self, adapter: Adapter, before: dict[str, int]) -> None:
        """Embeddings that held one vocabulary must still hold one after `adapter`'s full tensors:
        an input embedding resized without its untied `lm_head` would leave a `vocab_size` that
        one of them contradicts. PEFT saves every resized embedding layer, so one is missing."""
        after = _vocabulary(self.steps)
        for name, rows in after.items():
            old = before.get(name, rows)
            if old == rows:
                continue
            for other, other_rows in before.items():
                if other != name and other_rows == old and after.get(other) == old:
                    raise AdapterError(
                        f"{adapter.root} resizes {name} from {old} to {rows} rows but leaves {other} at "
                        f"{old}, so the model's vocabulary would disagree with itself; add the resized "
                        f"{other} to the adapter (PEFT's save_embedding_layers saves both)."
                    )

    def merge(self, adapter: Adapter, blocks: bool = True) -> None:
        """Apply `adapter`: its saved full tensors replace, then its blocks merge (unless `blocks` is off)."""
        rule = self._rule(adapter)
        before = _vocabulary(self.steps)
        for name, source in adapter.replacements.items():
            self._replace(self._target(name, rule), source, adapter, "replaces", adapter.key_of(name))
        self._keep_vocabulary(adapter, before)
        if blocks:
            self._blocks(adapter, rule, inverse=False, skip=set())

    def unmerge(self, adapter: Adapter, allow_lossy: bool) -> None:
        """Undo `adapter`: saved frozen base weights come back exactly, blocks are inverted, and
        trained copies (modules_to_save, biases) stay, which loses the originals they replaced."""
        rule = self._rule(adapter)
        restored, lossy = set(), []
        before = _vocabulary(self.steps)
        for name, source in adapter.replacements.items():
            target = self._target(name, rule)
            if name in adapter.frozen:
                self._replace(target, source, adapter, "restores", adapter.key_of(name))
                restored.add(target)
            else:
                lossy.append(target)
        self._keep_vocabulary(adapter, before)
        if lossy and not allow_lossy:
            shown = ", ".join(lossy[:3]) + (f" and {len(lossy) - 3} more" if len(lossy) > 3 else "")
            raise AdapterError(
                f"{adapter.root} replaced {shown} with trained copies (modules_to_save or biases) whose "
                "originals are not in the merged model, so they cannot be recovered; pass --allow-lossy "
                "to keep the trained copies."
            )
        if lossy:
            self.notes.append(
                f"kept the trained copies of {', '.join(lossy)} from {adapter.label} (--allow-lossy)"
            )
        self._blocks(adapter, rule, inverse=True, skip=restored)


def main_float(steps: Iterable[Step]) -> str:
    weights: Counter[str] = Counter()
    for step in steps:
        if step.dtype in dtypes.COMPUTABLE:
            weights[step.dtype] += step.nbytes
    return weights.most_common(1)[0][0] if weights else "F32"


def _finish_dtypes(steps: dict[str, Step], base: Checkpoint, dtype: str | None) -> dict[str, Step]:
    """Each output tensor's dtype: `dtype` for every float tensor, else what the base had."""
    main = main_float(steps.values())
    done = {}
    for name, step in steps.items():
        if step.decode is not None or isinstance(step.source, Derived):
            done[name] = step  # decided by the codec planning, which derived sources refer to
            continue
        out = step.dtype
        if name not in base.tensors and step.source.dtype in dtypes.COMPUTABLE:
            out = main
        if dtype is not None and out in dtypes.COMPUTABLE:
            out = dtype
        if step.ops and (out not in dtypes.COMPUTABLE or step.source.dtype not in dtypes.COMPUTABLE):
            where = f" in {step.source.path}" if isinstance(step.source, TensorRef) else ""
            raise AdapterError(
                f"{name}{where} is stored as {step.source.dtype}; bonemerge merges into float16, "
                "bfloat16, float32 or float64 weights only (dequantize the base first)."
            )
        if out != step.source.dtype and step.source.dtype not in dtypes.COMPUTABLE:
            out = step.source.dtype
        done[name] = replace(step, dtype=out)
    return done


def _config_updates(builder: _Builder, steps: dict[str, Step], dtype: str | None) -> dict[str, object]:
    updates: dict[str, object] = {}
    if dtype is not None:
        updates["dtype"] = dtypes.TORCH_NAME[dtype]
    if builder.untied:
        updates["tie_word_embeddings"] = False
    for name, step in steps.items():
        if _leaf(name) in INPUT_EMBEDDINGS and name in builder.base.tensors:
            rows = step.shape[0] if step.shape else None
            if rows and rows != builder.base.tensors[name].shape[0]:
                updates["vocab_size"] = rows
    return updates


def build_plan(
    base: Checkpoint,
    adapters: Sequence[Adapter],
    *,
    operation: str = "merge",
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
    allow_lossy: bool = False,
) -> Plan:
    """Plan a new model from `base`: `merge` applies `adapters` in order, `unmerge` takes them
    off in reverse order, `unload` applies only their saved full tensors. `dtype` None keeps
    each tensor's own dtype."""
    builder = _Builder(base, base.config())
    if operation == "unmerge":
        for adapter in reversed(adapters):
            builder.unmerge(adapter, allow_lossy)
    else:
        for adapter in adapters:
            builder.merge(adapter, blocks=operation == "merge")
    coded, storage_updates, storage_notes = plan_storage(builder.steps, base, dtype, operation, allow_lossy)
    steps = _finish_dtypes(coded, base, dtype)
    entries = [s.entry() for s in steps.values()]
    # Companions derived from an encoded weight (its scales) are written after it when they can
    # be, so that they come from that weight's own pass instead of a pass of their own.
    after = {name for name, s in steps.items() if isinstance(s.source, Derived)}
    if max_shard_bytes is None:
        # a weight a codec writes under a new name (MXFP4's `X_blocks` as `X`) stays in its file
        homes = dict(base.shard_of)
        for name, step in steps.items():
            origin = getattr(step.source, "stored", None)
            if name not in homes and isinstance(origin, TensorRef) and origin.name in homes:
                homes[name] = homes[origin.name]
        shards = layout.like_base(entries, homes, [s.name for s in base.shards], str(base.root), last=after)
        write_index = base.index_name is not None
        index_name = base.index_name or f"{base.file_prefix}.safetensors.index.json"
    else:
        shards = layout.by_size(entries, max_shard_bytes, base.file_prefix, last=after)
        write_index = len(shards) > 1
        index_name = f"{base.file_prefix}.safetensors.index.json"
    return Plan(
        tuple(shards),
        steps,
        write_index,
        index_name,
        _config_updates(builder, steps, dtype) | storage_updates,
        tuple(builder.notes + storage_notes),
    )
