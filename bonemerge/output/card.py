"""Model cards (README.md) that say what a folder is and exactly how it was made.

The input's own README describes the input, not the result, so it is never copied; instead a
card names the base, the adapters in the order they were applied, the dtype and the command
line, with Hub metadata (`base_model`, `tags`, `library_name`) that the Hub can index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class AppliedAdapter:
    """An adapter as the card lists it: its name, its kind and, if known, its Hub id."""

    label: str
    kind: str
    tag: str
    hub_id: str | None = None


def hub_id(value: str | None) -> str | None:
    """`value` when it is a valid Hub repo id (`org/name`) rather than a local path."""
    from bonemerge.resolve.hub import id_problem

    if value and not value.startswith((".", "/")) and id_problem(value) is None:
        return value
    return None


def render_card(
    *,
    heading: str,
    summary: str,
    adapters: Sequence[AppliedAdapter],
    closing: str,
    command: str | None,
    notes: Sequence[str] = (),
    base_hub_id: str | None = None,
    relation: str | None = None,
    library: str = "transformers",
    tags: Sequence[str] = (),
) -> str:
    """README.md text: YAML metadata, then what was done, in order, and how to redo it.

    `relation` (the Hub's `base_model_relation`: finetune, adapter...) is only stated when the
    base's Hub id is known, since it describes the link to that base.
    """
    from huggingface_hub import ModelCardData

    all_tags = list(dict.fromkeys(["bonemerge", *(a.tag for a in adapters), *tags]))
    data = ModelCardData(
        library_name=library,
        tags=all_tags,
        base_model=base_hub_id,
        base_model_relation=relation if base_hub_id else None,
    )
    lines = [f"# {heading}", "", summary, ""]
    for number, adapter in enumerate(adapters, start=1):
        name = (
            f"[{adapter.hub_id}](https://huggingface.co/{adapter.hub_id})"
            if adapter.hub_id
            else f"`{adapter.label}`"
        )
        lines.append(f"{number}. {name}: {adapter.kind}")
    lines += ["", closing]
    if notes:
        lines += ["", "Notes:", "", *(f"- {note}" for note in notes)]
    if command:
        lines += [
            "",
            "Made with [bonemerge](https://pypi.org/project/bonemerge/):",
            "",
            "```",
            command,
            "```",
        ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"
