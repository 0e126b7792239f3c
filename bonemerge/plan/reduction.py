"""Reducing an adapter: which modules to keep, in what dtype, under which method — planning only.

The written adapter must load in PEFT as is, so its `adapter_config.json` has to describe
exactly the modules that were kept, and the tensors stored once for the whole adapter must
be what PEFT expects for them: the adapter's method says both (`Method.reduced_config`,
`Method.reduced_shared`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from bonemerge.adapters import Adapter, infer_rule
from bonemerge.adapters.matching import layer_of
from bonemerge.checkpoint import Checkpoint, Source, dtypes
from bonemerge.checkpoint.layout import ShardPlan, write_order
from bonemerge.errors import AdapterError, BonemergeError, shown
from bonemerge.methods import Converted, RankRequest, Reduction, Target, kind_name
from bonemerge.plan.build import Plan, Step, fit_blocks
from bonemerge.units import format_size

WEIGHTS = "adapter_model.safetensors"


def parse_layers(text: str) -> frozenset[int]:
    """`0-11,20` -> {0, ..., 11, 20}."""
    layers: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise BonemergeError(f"cannot read {shown(text)} as layers; write them like 0-11,20.")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise BonemergeError(f"the layer range {shown(part.strip())} runs backwards.")
        layers.update(range(first, last + 1))
    return frozenset(layers)


@dataclass(frozen=True)
class StripOptions:
    """What `bonemerge strip` keeps and changes."""

    include: str | None = None
    exclude: str | None = None
    layers: frozenset[int] | None = None
    dtype: str | None = None
    drop_modules_to_save: bool = False
    to: str | None = None
    rank: RankRequest = field(default_factory=RankRequest)


def _pattern(text: str | None, flag: str) -> re.Pattern[str] | None:
    if text is None:
        return None
    try:
        return re.compile(text)
    except re.error as exc:
        raise BonemergeError(f"{flag} {shown(text)} is not a valid regular expression ({exc}).") from None


def kept_modules(adapter: Adapter, options: StripOptions) -> list[str]:
    include = _pattern(options.include, "--include")
    exclude = _pattern(options.exclude, "--exclude")
    kept = []
    for block in adapter.blocks:
        module = block.module
        if include and not include.search(module):
            continue
        if exclude and exclude.search(module):
            continue
        if options.layers is not None:
            found = layer_of(module)
            if found is None or found[1] not in options.layers:
                continue
        kept.append(module)
    if not kept:
        raise AdapterError(f"the filters keep none of the {len(adapter.blocks)} blocks of {adapter.root}.")
    return kept


def _peft_type(adapter: Adapter, to: str | None) -> str:
    """The `peft_type` of the written adapter: its own, or what `--to` converts it to."""
    config = adapter.config
    if to is None:
        return config.peft_type
    found = config.method.conversions(config).get(to)
    if found is None:
        raise AdapterError(config.method.refuse_conversion(config, to, adapter.root))
    return found


def stripped_config(
    adapter: Adapter,
    reduction: Reduction,
    options: StripOptions,
    peft_type: str,
    converted: Mapping[str, Converted],
) -> dict:
    """The adapter_config.json of the reduced adapter: the method's reduced config, converted
    by the method when `--to` asks for another one."""
    config = adapter.config.method.reduced_config(dict(adapter.config.raw), reduction)
    if peft_type != adapter.config.peft_type:
        config = adapter.config.method.converted_config(config, peft_type, converted)
    if options.drop_modules_to_save:
        config["modules_to_save"] = None
    return config


def needs_base(adapter: Adapter, options: StripOptions) -> bool:
    """Whether this strip needs the adapter's base model (a conversion that sizes or computes
    from it, or a method whose reduced adapter depends on the kept layers' shapes)."""
    peft_type = _peft_type(adapter, options.to)
    filtered = len(kept_modules(adapter, options)) != len(adapter.blocks)
    return adapter.config.method.needs_base(adapter.config, peft_type, filtered)


@dataclass(frozen=True)
class Conversion:
    """What converting did: from and to which `peft_type` (and how the methods name them), how
    many blocks, and for conversions to LoRA per module the rank and the error."""

    source: str
    peft_type: str
    names: tuple[str, str]
    blocks: int
    ranks: dict[str, int]
    errors: dict[str, float]
    error: float
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "from": self.source,
            "to": self.peft_type,
            "ranks": self.ranks,
            "errors": self.errors,
            "error": self.error,
            "warnings": list(self.warnings),
        }

    def note(self) -> str:
        """`converted Bone to LoRA exactly at rank 64`, or with its ranks and error."""
        done = f"converted {self.names[0]} to {self.names[1]}"
        ranks = sorted(set(self.ranks.values()))
        if not ranks:
            return (
                f"{done}: {self.blocks} block keys renamed and peft_type {self.peft_type} "
                "(the maths is identical)"
            )
        shown = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
        if not self.errors:
            return f"{done} exactly at {shown}"
        worst = max(self.errors, key=self.errors.__getitem__)
        return (
            f"{done} at {shown}, approximately: relative Frobenius error {self.error:.3g} overall, "
            f"at most {self.errors[worst]:.3g} ({worst})"
        )


def build_strip_plan(
    adapter: Adapter,
    options: StripOptions,
    base: Checkpoint | None = None,
    extracted: bool = False,
    progress: bool = False,
) -> tuple[Plan, dict, StripSummary]:
    """The reduced adapter's tensors (one file, PEFT's key names), its config and what was
    done (`extracted`: the adapter came out of a full PEFT checkpoint). `base` is required when `needs_base`
    says so; conversions that need its values read them one tensor at a time (Bat's take a
    while: `progress` shows a bar)."""
    from bonemerge.checkpoint.tensors import load_whole
    from bonemerge.run.progress import counted

    kept = kept_modules(adapter, options)
    peft_type = _peft_type(adapter, options.to)
    kept_set = set(kept)
    blocks = [block for block in adapter.blocks if block.module in kept_set]
    pairs = list(zip(blocks, _base_weights(adapter, blocks, base), strict=True))
    reduction = Reduction(
        tuple(kept),
        len(kept) != len(adapter.blocks),
        options.layers,
        adapter.blocks,
        _weight_shapes(adapter, base),
    )
    converted = {
        block.module: block.method.convert(block, peft_type, base=target, load=load_whole, rank=options.rank)
        for block, target in counted(pairs, "converting", progress and base is not None)
    }
    steps: dict[str, Step] = {}
    for result in converted.values():
        for name, source in result.tensors.items():
            steps[name] = Step(name, source.dtype, tuple(source.shape), source)
    method = adapter.config.method
    same = peft_type == adapter.config.peft_type
    shared = method.reduced_shared(blocks, peft_type, reduction) if same else {}
    for name, source in shared.items():
        steps[name] = Step(name, source.dtype, tuple(source.shape), source)
    block_modules = {b.module for b in adapter.blocks}
    for name, source in adapter.replacements.items():
        module = name.rsplit(".", 1)[0]
        if module in block_modules:
            if module not in kept_set:
                continue
        elif options.drop_modules_to_save:
            continue
        key = adapter.key_of(name)
        steps[key] = Step(key, source.dtype, tuple(source.shape), source)
    if options.dtype is not None:
        steps = {
            n: Step(n, options.dtype, s.shape, s.source) if s.dtype in dtypes.COMPUTABLE else s
            for n, s in steps.items()
        }
    shard = ShardPlan(WEIGHTS, write_order([s.entry() for s in steps.values()]))
    plan = Plan((shard,), steps, write_index=False, index_name="")
    config = stripped_config(adapter, reduction, options, peft_type, converted)
    conversion = None
    if peft_type != adapter.config.peft_type:
        discarded = sum(c.discarded for c in converted.values())
        total = sum(c.total for c in converted.values())
        conversion = Conversion(
            adapter.config.peft_type,
            peft_type,
            (kind_name(adapter.config.peft_type), kind_name(peft_type)),
            len(converted),
            {m: c.rank for m, c in converted.items() if c.rank is not None},
            {m: c.error for m, c in converted.items() if c.total},
            (discarded / total) ** 0.5 if total else 0.0,
            _size_warnings(converted, pairs, steps),
        )
    block_keys = {key for c in converted.values() for key in c.tensors} | set(shared)
    block_steps = len(block_keys)
    summary = StripSummary(
        blocks_kept=len(kept),
        blocks_total=len(adapter.blocks),
        full_left_out=len(adapter.replacements) - (len(plan.steps) - block_steps),
        cast=sum(1 for step in plan.steps.values() if step.dtype != step.source.dtype),
        dtype=options.dtype,
        conversion=conversion,
        extracted=extracted,
        changed=sum(
            1
            for step in plan.steps.values()
            if step.dtype != step.source.dtype or (conversion is not None and step.name in block_keys)
        ),
    )
    return plan, config, summary


def _size_warnings(
    converted: Mapping[str, Converted], pairs: list, steps: Mapping[str, Step]
) -> tuple[str, ...]:
    """Warnings for an approximation that stopped being a small adapter: modules whose rank
    gives factors with more values than the weight (full rank among them), or factors larger
    than the weights they adapt; each says which `--max-error` keeps every module's factors at
    most half its weight."""
    approximate = {m: c for m, c in converted.items() if c.full_rank}
    if not approximate:
        return ()
    shapes = {block.module: tuple(target.shape) for block, target in pairs if block.module in approximate}
    large = sorted(
        (m for m, c in approximate.items() if (c.rank or 0) * sum(shapes[m]) >= math.prod(shapes[m])),
        key=lambda m: (-(approximate[m].rank or 0), m),
    )
    written = sum(steps[key].nbytes for c in approximate.values() for key in c.tensors)
    adapted = sum(target.nbytes for block, target in pairs if block.module in approximate)
    bound = _round_up(max(c.compact_error for c in approximate.values()))
    advice = (
        f"--rank auto --max-error {bound} keeps every module's factors at most half the size of its weight"
        if float(bound) < 1
        else "a smaller --rank keeps it small"
    )
    found = []
    if large:
        first = large[0]
        found.append(
            f"warning: {len(large)} of {len(approximate)} modules reached a rank whose factors hold more "
            f"values than the weight itself (e.g. {first} at rank {approximate[first].rank} of "
            f"{approximate[first].full_rank}); {advice}"
        )
    if written > adapted:
        found.append(
            f"warning: the LoRA factors ({format_size(written)}) outgrow the weights they adapt "
            f"({format_size(adapted)}); {advice}"
        )
    return tuple(found)


def _round_up(value: float) -> str:
    """`value` with two significant digits, rounded up, so that the advice it gives holds."""
    if value <= 0:
        return f"{value:.2g}"
    exponent = math.floor(math.log10(value)) - 1
    return f"{math.ceil(round(value / 10**exponent, 9)) * 10**exponent:.2g}"


def _weight_shapes(adapter: Adapter, base: Checkpoint | None) -> dict[str, tuple[int, ...]]:
    """The shape of the base weight each block of the adapter changes, by module, where the
    base has one (none without a base)."""
    if base is None:
        return {}
    rule = infer_rule([b.module for b in adapter.blocks], base.tensors.keys(), str(adapter.root))
    found = {}
    for block in adapter.blocks:
        source = base.tensors.get(rule.apply(block.module) + ".weight")
        if source is not None:
            found[block.module] = tuple(source.shape)
    return found


def _base_weights(adapter: Adapter, blocks: list, base: Checkpoint | None) -> list[Source | None]:
    """The base weight each block merges into (its values, when it is stored quantized),
    checked to fit, or None without a base."""
    if base is None:
        return [None] * len(blocks)
    from bonemerge.codecs import find_stored

    rule = infer_rule([b.module for b in blocks], base.tensors.keys(), str(adapter.root))
    stored = find_stored(base)
    shapes = {name: tuple(source.shape) for name, source in base.tensors.items()}
    dtypes = {name: source.dtype for name, source in base.tensors.items()}
    fitted = fit_blocks(replace(adapter, blocks=tuple(blocks)), rule, shapes, dtypes, base.config(), [])
    found = []
    for block, module in fitted:
        name = module + ".weight"
        source = base.tensors.get(name)
        if source is None:
            raise AdapterError(
                f"block {block.key} of {adapter.root} has no matching weight {name} in {base.root}; "
                "is this the adapter's base model?"
            )
        where = f"block {block.key} of {adapter.root}"
        block.method.check_target(block, Target("weight"), name, tuple(source.shape), where, False)
        found.append(stored[name].decoded() if name in stored else source)
    return found


@dataclass(frozen=True)
class StripSummary:
    """What a strip did, counted from its plan, so that the report and the card say exactly
    that: blocks filtered, full tensors left out, tensors cast, method converted."""

    blocks_kept: int
    blocks_total: int
    full_left_out: int
    cast: int
    dtype: str | None
    conversion: Conversion | None
    extracted: bool
    changed: int  # tensors written differently from the source: cast, renamed or converted

    def actions(self) -> list[str]:
        """One line per thing done, for the report's notes and the card."""
        done = []
        if self.extracted:
            done.append("extracted the adapter from a full PEFT training checkpoint")
        done.append(f"kept {self.blocks_kept} of {self.blocks_total} blocks")
        if self.full_left_out:
            done.append(f"left out {self.full_left_out} full tensors (modules_to_save or biases)")
        if self.cast:
            done.append(f"cast {self.cast} tensors to {dtypes.TORCH_NAME[self.dtype or 'F32']}")
        if self.conversion:
            done.append(self.conversion.note())
            done.extend(self.conversion.warnings)
        return done

    def heading(self, name: str) -> str:
        """The card's title: `Reduced and converted adapter from X in bfloat16`, and so on."""
        words = [
            word
            for word, done in (
                ("reduced", self.blocks_kept < self.blocks_total or self.full_left_out),
                ("converted", self.conversion is not None),
            )
            if done
        ]
        kind = " and ".join(words) or ("extracted" if self.extracted else "copied")
        cast = f" in {dtypes.TORCH_NAME[self.dtype or 'F32']}" if self.cast else ""
        return f"{kind.capitalize()} adapter from {name}{cast}"
