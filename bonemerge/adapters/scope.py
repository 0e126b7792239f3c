"""Which modules an adapter's config lets PEFT adapt; tensors for any other module are refused.

PEFT wraps a module only where `check_target_module_exists` (peft/tuners/tuners_utils.py,
0.18.1) accepts its name, the key a saved tensor carries after `base_model.model.`:
`exclude_modules` (a regex matched in full, or names matched whole or as a dotted suffix) and
`modules_to_save` (`(^|.*\\.)NAME($|\\..*)`) rule it out; `target_modules` (a regex matched in
full, or names matched whole or as a dotted suffix) must take it in; and with a list of names,
a module that matched only as a suffix must also sit in a layer `layers_to_transform` lists
(its index read after `layers_pattern`, or after any segment when the pattern is empty).
Loading an adapter whose file holds tensors for another module, PEFT drops them without a
word (`load_state_dict(strict=False)`).

bonemerge refuses such an adapter, naming the tensor and the field that excludes it, rather
than merging the tensor (a model PEFT never builds) or skipping it (trained weights silently
lost): the file and its config contradict each other, which happens only when one of them
was edited by hand, and only its author knows which one is right. Two cases are not checked
because PEFT decides them from the model rather than the config: `target_modules` absent (the
architecture's defaults) and `"all-linear"` (every Linear layer but the output head). Blocks
on parameters (LoRA's `target_parameters`) have their own scope, which their method checks.

Patterns are matched with RE2, in time linear in the name, so that no pattern can stall a run;
a pattern RE2 cannot read (look-around, back-references) is refused in one sentence.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from bonemerge.adapters.patterns import compiled
from bonemerge.errors import AdapterError, shown
from bonemerge.methods import Block

__all__ = ["check_scope", "excluded_by"]


def _names(raw: dict, field: str, path: Path) -> str | list[str] | None:
    """A field PEFT reads as one regex (a string) or a list of names; anything else is refused."""
    value = raw.get(field)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise AdapterError(
        f"{path} has {field}={shown(value)}; it must be a regular expression or a list of module names."
    )


def _layers(raw: dict, path: Path) -> int | list[int] | None:
    value = raw.get("layers_to_transform")
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value
    raise AdapterError(
        f"{path} has layers_to_transform={shown(value)}; it must be a layer index or a list of them."
    )


def _search(kind: str, pattern: str, module: str, field: str, path: Path):
    """RE2's full match (`kind` "full") or match at the start of `module`, or None."""
    program = compiled(pattern)
    if program is None:
        raise AdapterError(
            f"{path} has {field} {shown(pattern)}, which is not a regular expression bonemerge can "
            "match (RE2 syntax: no look-around or back-references); rewrite it without them."
        )
    return program.fullmatch(module) if kind == "full" else program.match(module)


def _listed(names: list[str], module: str) -> bool:
    return module in names or any(module.endswith("." + name) for name in names)


def _layer_index(raw: dict, module: str, path: Path) -> int | None:
    """The layer index PEFT reads from `module` (None when it finds none)."""
    patterns = raw.get("layers_pattern")
    if isinstance(patterns, str):
        patterns = [patterns] if patterns else []
    elif patterns is None:
        patterns = []
    elif not (isinstance(patterns, list) and all(isinstance(p, str) for p in patterns)):
        raise AdapterError(
            f"{path} has layers_pattern={shown(patterns)}; it must be a name or a list of names."
        )
    regexes = [rf".*\.{p}\.(\d+)\." for p in patterns] or [r".*\.[^.]*\.(\d+)\."]
    for regex in regexes:
        found = _search("start", regex, module, "layers_pattern", path)
        if found is not None:
            index = found.group(1)
            if not (index and index.isascii() and index.isdigit()):
                raise AdapterError(
                    f"{path} has a layers_pattern with a group of its own, which PEFT would read as "
                    f"the layer index ({shown(index)} in {module}); write it without parentheses."
                )
            return int(index)
    return None


def excluded_by(raw: dict, module: str, path: Path) -> str | None:
    """The config field under which PEFT would not adapt `module`, or None when it would."""
    exclude = _names(raw, "exclude_modules", path)
    if isinstance(exclude, str):
        if _search("full", exclude, module, "exclude_modules", path):
            return "exclude_modules"
    elif exclude and _listed(exclude, module):
        return "exclude_modules"
    saved = raw.get("modules_to_save")
    if isinstance(saved, list):
        for name in saved:
            if isinstance(name, str) and _search(
                "start", rf"(^|.*\.){name}($|\..*)", module, "modules_to_save", path
            ):
                return "modules_to_save"
    target = _names(raw, "target_modules", path)
    if target is None or (isinstance(target, str) and target.lower() == "all-linear"):
        return None
    if isinstance(target, str):
        return None if _search("full", target, module, "target_modules", path) else "target_modules"
    if module in target:
        return None
    if not _listed(target, module):
        return "target_modules"
    layers = _layers(raw, path)
    if layers is None or layers == []:
        return None
    index = _layer_index(raw, module, path)
    if index is None or index not in (layers if isinstance(layers, list) else [layers]):
        return "layers_to_transform"
    return None


def check_scope(blocks: Iterable[Block], raw: dict, config: Path, weights: Path) -> None:
    """Refuse the first block whose module the config at `config` keeps PEFT from adapting. A
    layer PEFT adapts inside one it wrapped (an nn.MultiheadAttention's out_proj, saved as
    `mha.base_layer.out_proj`) is in scope with the wrapped module."""
    for block in blocks:
        if not block.method.module_scoped(block):
            continue
        field = excluded_by(raw, block.module.split(".base_layer.")[0], config)
        if field is not None:
            raise AdapterError(
                f"{weights} holds {block.key}, but the {field} of {config} leave out {block.module}, "
                f"so PEFT would never load it; remove the tensor or correct {field}."
            )
