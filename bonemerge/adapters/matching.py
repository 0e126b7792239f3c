"""Mapping an adapter's module paths onto a checkpoint's tensor names.

An adapter trained on `BertForSequenceClassification` names `bert.encoder.layer.0...` while a
`BertModel` checkpoint stores `encoder.layer.0...`; a `LlamaModel` adapter lacks the `model.`
that a `LlamaForCausalLM` checkpoint has. One prefix rule (strip something, add something)
explains such differences for a whole adapter, so one rule is inferred per adapter and a
name that the rule cannot place is reported with the closest candidates, never skipped.
"""

from __future__ import annotations

import difflib
import heapq
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from bonemerge.errors import AdapterError

_SIMILARITY_POOL = 2000
_LAYER = re.compile(r"(?:^|\.)([^.]+)\.(\d+)(?:\.|$)")


def layer_of(module: str) -> tuple[str, int] | None:
    """(`layers`, 3) for `model.layers.3.self_attn.q_proj`: the first numbered path segment."""
    match = _LAYER.search(module)
    return (match.group(1), int(match.group(2))) if match else None


@dataclass(frozen=True)
class PrefixRule:
    """Replace a leading `strip` by `add`; names without the leading `strip` pass unchanged."""

    strip: str = ""
    add: str = ""

    def apply(self, name: str) -> str:
        if self.strip and not name.startswith(self.strip):
            return name
        return self.add + name[len(self.strip) :]

    def __str__(self) -> str:
        if not self.strip and not self.add:
            return "names as they are"
        return f"{self.strip or '(nothing)'} -> {self.add or '(nothing)'}"


class _WeightModules:
    """The module names of a checkpoint's `.weight` tensors, indexed by every dotted suffix.

    Finding the rules that relate one adapter module to the base must not scan every base
    name for every module: with N of each that is N² string comparisons (minutes at 20,000).
    Every suffix of every name is indexed once instead, so one module's candidates cost a
    dictionary lookup per segment of its own path.
    """

    def __init__(self, names: Iterable[str]) -> None:
        self.modules: set[str] = set()
        self._prefixes: dict[str, list[str]] = {}
        for name in names:
            if not name.endswith(".weight"):
                continue
            module = name[: -len(".weight")]
            self.modules.add(module)
            dot = module.find(".")
            while dot != -1:
                self._prefixes.setdefault(module[dot + 1 :], []).append(module[: dot + 1])
                dot = module.find(".", dot + 1)

    def rules_for(self, module: str) -> set[PrefixRule]:
        """Every rule that maps `module` onto some base module by adding or removing a prefix."""
        rules = {PrefixRule("", prefix) for prefix in self._prefixes.get(module, ())}
        dot = module.find(".")
        while dot != -1:
            if module[dot + 1 :] in self.modules:
                rules.add(PrefixRule(module[: dot + 1], ""))
            dot = module.find(".", dot + 1)
        return rules


def infer_rule(modules: Collection[str], names: Collection[str], what: str) -> PrefixRule:
    """The one prefix rule that places the most of `modules` onto `<module>.weight` in `names`."""
    base = _WeightModules(names)

    def placed(rule: PrefixRule) -> int:
        return sum(rule.apply(m) in base.modules for m in modules)

    identity = PrefixRule()
    if placed(identity) == len(modules):
        return identity
    rules = {identity}
    for module in modules:
        if module not in base.modules:
            found = base.rules_for(module)
            if found:
                rules |= found
                break
    scores = {rule: placed(rule) for rule in rules}
    best = max(scores.values())
    winners = [rule for rule, score in scores.items() if score == best]
    if len(winners) > 1 and identity in winners:
        return identity
    if len(winners) > 1:
        listed = "; ".join(sorted(str(w) for w in winners))
        raise AdapterError(
            f"the module names of {what} fit the base in more than one way ({listed}); "
            "the checkpoint holds duplicate module trees, pass a checkpoint with one model."
        )
    return winners[0]


def closest(name: str, names: Collection[str], n: int = 3) -> str:
    """`closest: a, b` for error messages, or a hint that nothing resembles `name`.

    difflib compares with every candidate and costs seconds at 100,000 names, so a large set
    is first narrowed to the names that share the most dotted segments with `name`."""
    pool = list(names)
    if len(pool) > _SIMILARITY_POOL:
        segments = set(name.split("."))
        pool = heapq.nlargest(_SIMILARITY_POOL, pool, key=lambda c: len(segments.intersection(c.split("."))))
    found = difflib.get_close_matches(name, pool, n=n, cutoff=0.5)
    return f"closest: {', '.join(found)}" if found else "nothing similar"
