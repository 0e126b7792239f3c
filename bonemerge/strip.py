"""Reducing an adapter: which modules to keep, in what dtype, under which method — planning only.

The written adapter must load in PEFT as is, so its `adapter_config.json` has to describe
exactly the modules that were kept: when a filter removes modules, `target_modules` becomes
the list of kept module paths (PEFT matches a listed full path exactly), and
`layers_to_transform` the kept layers, so that PEFT neither builds empty blocks for modules
that are gone nor warns about missing keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bonemerge.adapters import Adapter
from bonemerge.adapters.config import METHODS
from bonemerge.adapters.loader import PREFIX
from bonemerge.checkpoint import dtypes
from bonemerge.checkpoint.layout import ShardPlan, write_order
from bonemerge.errors import AdapterError, BonemergeError
from bonemerge.plan import Plan, Step

WEIGHTS = "adapter_model.safetensors"
_LAYER = re.compile(r"(?:^|\.)([^.]+)\.(\d+)(?:\.|$)")
_MISS_ONLY = ("mini_r", "miss_dropout")


def parse_layers(text: str) -> frozenset[int]:
    """`0-11,20` -> {0, ..., 11, 20}."""
    layers: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise BonemergeError(f"cannot read {text!r} as layers; write them like 0-11,20.")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise BonemergeError(f"the layer range {part.strip()!r} runs backwards.")
        layers.update(range(first, last + 1))
    return frozenset(layers)


def layer_of(module: str) -> tuple[str, int] | None:
    """(`layers`, 3) for `model.layers.3.self_attn.q_proj`: the first numbered path segment."""
    match = _LAYER.search(module)
    return (match.group(1), int(match.group(2))) if match else None


@dataclass(frozen=True)
class StripOptions:
    """What `bonemerge strip` keeps and changes."""

    include: str | None = None
    exclude: str | None = None
    layers: frozenset[int] | None = None
    dtype: str | None = None
    drop_modules_to_save: bool = False
    to: str | None = None


def _pattern(text: str | None, flag: str) -> re.Pattern[str] | None:
    if text is None:
        return None
    try:
        return re.compile(text)
    except re.error as exc:
        raise BonemergeError(f"{flag} {text!r} is not a valid regular expression ({exc}).") from None


def _kept_modules(adapter: Adapter, options: StripOptions) -> list[str]:
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


def _method(adapter: Adapter, to: str | None) -> str:
    method = {"miss": "MISS", "bone": "BONE", None: adapter.config.method}[to]
    if method == "BONE" and adapter.config.variant == "mini":
        raise AdapterError(
            f"{adapter.root} is a MiSS mini adapter, which Bone cannot express; it stays MiSS."
        )
    return method


def stripped_config(adapter: Adapter, kept: list[str], options: StripOptions, method: str) -> dict:
    """The adapter_config.json of the reduced adapter."""
    config = dict(adapter.config.raw)
    config["peft_type"] = method
    if method == "BONE":
        for key in _MISS_ONLY:
            config.pop(key, None)
    if len(kept) != len(adapter.blocks):
        config["target_modules"] = sorted(kept)
        config["exclude_modules"] = None
        if options.layers is not None:
            found = [layer_of(m) for m in kept]
            config["layers_to_transform"] = sorted({f[1] for f in found if f})
            patterns = sorted({f[0] for f in found if f})
            config["layers_pattern"] = patterns[0] if len(patterns) == 1 else patterns
    if options.drop_modules_to_save:
        config["modules_to_save"] = None
    return config


def build_strip_plan(adapter: Adapter, options: StripOptions) -> tuple[Plan, dict]:
    """The reduced adapter's tensors (one file, PEFT's key names) and its config."""
    kept = _kept_modules(adapter, options)
    method = _method(adapter, options.to)
    suffix = METHODS[method]
    steps: dict[str, Step] = {}
    kept_set = set(kept)
    for block in adapter.blocks:
        if block.module in kept_set:
            name = f"{PREFIX}{block.module}.{suffix}"
            steps[name] = Step(name, block.tensor.dtype, tuple(block.tensor.shape), block.tensor)
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
    return plan, stripped_config(adapter, kept, options, method)


@dataclass(frozen=True)
class StripSummary:
    """What a strip did, counted from its plan, so that the report and the card say exactly
    that: blocks filtered, full tensors left out, tensors cast, method converted."""

    blocks_kept: int
    blocks_total: int
    full_left_out: int
    cast: int
    dtype: str | None
    method_from: str
    method_to: str
    extracted: bool
    changed: int  # tensors written differently from the source: cast, or renamed to the other method

    @property
    def converted(self) -> bool:
        return self.method_from != self.method_to

    def actions(self) -> list[str]:
        """One line per thing done, for the report's notes and the card."""
        names = {"BONE": "Bone", "MISS": "MiSS"}
        done = []
        if self.extracted:
            done.append("extracted the adapter from a full PEFT training checkpoint")
        done.append(f"kept {self.blocks_kept} of {self.blocks_total} blocks")
        if self.full_left_out:
            done.append(f"left out {self.full_left_out} full tensors (modules_to_save or biases)")
        if self.cast:
            done.append(f"cast {self.cast} tensors to {dtypes.TORCH_NAME[self.dtype or 'F32']}")
        if self.converted:
            done.append(
                f"converted {names[self.method_from]} to {names[self.method_to]}: {self.blocks_kept} block "
                f"keys renamed and peft_type {self.method_to} (the maths is identical)"
            )
        return done

    def heading(self, name: str) -> str:
        """The card's title: `Reduced and converted adapter from X in bfloat16`, and so on."""
        words = [
            word
            for word, done in (
                ("reduced", self.blocks_kept < self.blocks_total or self.full_left_out),
                ("converted", self.converted),
            )
            if done
        ]
        kind = " and ".join(words) or ("extracted" if self.extracted else "copied")
        cast = f" in {dtypes.TORCH_NAME[self.dtype or 'F32']}" if self.cast else ""
        return f"{kind.capitalize()} adapter from {name}{cast}"


def summarize(
    adapter: Adapter, plan: Plan, method: str, options: StripOptions, extracted: bool
) -> StripSummary:
    """Count what `plan` (made by `build_strip_plan`) does to `adapter`."""
    suffix = f".{METHODS[method]}"
    kept = sum(1 for name in plan.steps if name.endswith(suffix))
    renamed = method != adapter.config.method
    return StripSummary(
        blocks_kept=kept,
        blocks_total=len(adapter.blocks),
        full_left_out=len(adapter.replacements) - (len(plan.steps) - kept),
        cast=sum(1 for step in plan.steps.values() if step.dtype != step.source.dtype),
        dtype=options.dtype,
        method_from=adapter.config.method,
        method_to=method,
        extracted=extracted,
        changed=sum(
            1
            for name, step in plan.steps.items()
            if step.dtype != step.source.dtype or (renamed and name.endswith(suffix))
        ),
    )
