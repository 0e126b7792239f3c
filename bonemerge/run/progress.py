"""A bar for work counted in steps (modules converted, blocks checked), looking like the
byte bar of the engine's writes: tqdm on stderr, gone when done, shown only when asked."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def counted(items: Sequence[T], what: str, enabled: bool) -> Iterator[T]:
    """Yield `items`, advancing a bar named `what` after each one when `enabled`."""
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    with tqdm(total=len(items), desc=what, unit=" modules", leave=False) as bar:
        for item in items:
            yield item
            bar.update(1)
