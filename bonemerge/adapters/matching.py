"""Mapping an adapter's module paths onto a checkpoint's tensor names.

An adapter trained on `BertForSequenceClassification` names `bert.encoder.layer.0...` while a
`BertModel` checkpoint stores `encoder.layer.0...`; a `LlamaModel` adapter lacks the `model.`
that a `LlamaForCausalLM` checkpoint has. One prefix rule (strip something, add something)
explains such differences for a whole adapter, so one rule is inferred per adapter and a
name that the rule cannot place is reported with the closest candidates, never skipped.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from bonemerge.errors import AdapterError


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


def _candidate_rules(module: str, weights: Iterable[str]) -> set[PrefixRule]:
    rules = set()
    for tensor in weights:
        base_module = tensor[: -len(".weight")]
        if base_module.endswith("." + module):
            rules.add(PrefixRule("", base_module[: -len(module)]))
        elif module.endswith("." + base_module):
            rules.add(PrefixRule(module[: -len(base_module)], ""))
    return rules


def infer_rule(modules: Collection[str], names: Collection[str], what: str) -> PrefixRule:
    """The one prefix rule that places the most of `modules` onto `<module>.weight` in `names`."""
    weights = [n for n in names if n.endswith(".weight")]
    weight_set = set(weights)

    def placed(rule: PrefixRule) -> int:
        return sum(rule.apply(m) + ".weight" in weight_set for m in modules)

    identity = PrefixRule()
    if placed(identity) == len(modules):
        return identity
    rules = {identity}
    for module in modules:
        if module + ".weight" not in weight_set:
            found = _candidate_rules(module, weights)
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
    """`closest: a, b` for error messages, or a hint that nothing resembles `name`."""
    found = difflib.get_close_matches(name, list(names), n=n, cutoff=0.5)
    return f"closest: {', '.join(found)}" if found else "nothing similar"
