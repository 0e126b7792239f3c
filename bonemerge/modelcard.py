"""Model cards (README.md) that say what a folder is and exactly how it was made.

The base's own README describes the base, not the merge, so it is never copied; instead a
card names the base, the adapters in the order they were applied, the dtype and the command
line, with Hub metadata (`base_model`, `tags`, `library_name`) that the Hub can index.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class AppliedAdapter:
    """An adapter as the card lists it: its name, its kind and, if known, its Hub id."""

    label: str
    kind: str
    method_tag: str
    hub_id: str | None = None


def hub_id(value: str | None) -> str | None:
    """`value` when it looks like `org/name` rather than a local path."""
    if value and HUB_ID.match(value) and not value.startswith((".", "/")):
        return value
    return None


def merged_card(
    *,
    base: str,
    base_hub_id: str | None,
    adapters: Sequence[AppliedAdapter],
    dtype: str,
    command: str | None,
    notes: Sequence[str] = (),
) -> str:
    """README.md text for a merged model."""
    from huggingface_hub import ModelCardData

    tags = ["bonemerge", *dict.fromkeys(a.method_tag for a in adapters), "merge"]
    data = ModelCardData(library_name="transformers", tags=tags, base_model=base_hub_id)
    lines = [
        f"# {base} with {len(adapters)} adapter{'s' if len(adapters) != 1 else ''} merged",
        "",
        f"This model is `{base}` with the following adapters merged into its weights by "
        "[bonemerge](https://pypi.org/project/bonemerge/), in this order:",
        "",
    ]
    for number, adapter in enumerate(adapters, start=1):
        name = (
            f"[{adapter.hub_id}](https://huggingface.co/{adapter.hub_id})"
            if adapter.hub_id
            else f"`{adapter.label}`"
        )
        lines.append(f"{number}. {name}: {adapter.kind}")
    lines += [
        "",
        f"Weights are stored as {dtype}. It loads like any `transformers` model; no PEFT is needed.",
    ]
    if notes:
        lines += ["", "Notes:", "", *(f"- {note}" for note in notes)]
    if command:
        lines += ["", "Made with:", "", "```", command, "```"]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"
