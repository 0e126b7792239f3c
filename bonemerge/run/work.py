"""What the engine, its compute side and the commands share: the options a run is made with,
what it reports, the chunks compute hands the writer, and how many may wait to be written.
Both sides import it, neither imports the other's module for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from bonemerge.codecs import Encoded
    from bonemerge.plan.build import Step


WRITE_BEHIND = 6


@dataclass(frozen=True)
class EngineOptions:
    """How to compute: `precision` auto = fp64 for fp32/fp64 outputs, fp32 for 16-bit ones;
    `rounding` (nearest, or stochastic seeded by `seed`) for weights encoded in a quantized format.

    Every field but those in `DISPLAY` changes the bytes written or the checks they passed, so
    `decides_output` (all of them, new fields included) goes into the plan's fingerprint that
    `--resume` compares: shards a `--no-safe-merge` run wrote are never reused by a checked one.
    """

    DISPLAY: ClassVar[frozenset[str]] = frozenset({"progress"})

    device: str = "cpu"
    precision: str = "auto"
    safe_merge: bool = True
    progress: bool = True
    rounding: str = "nearest"
    seed: int = 0

    def decides_output(self) -> dict[str, object]:
        """The settings that decide what is written, or what it was checked for."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.DISPLAY}


@dataclass
class EngineStats:
    """What `write_plan` did; `unmerged_elements` counts the elements of tensors that blocks were
    taken out of, and `may_differ` those among them that cannot be guaranteed to come back
    exactly (see `compute.may_differ`)."""

    merged: int = 0
    copied: int = 0
    converted: int = 0
    bytes_written: int = 0
    unmerged_elements: int = 0
    may_differ: int = 0
    #: what encoding did to each weight written in a quantized format, by name
    encoded: dict[str, Encoded] = field(default_factory=dict)


@dataclass
class Chunk:
    """Rows [start, stop) of one output tensor, ready in the output dtype.

    `data` is None when the step is a plain copy: its bytes are `step.source` as they are, for
    the consumer to move file-to-file. Otherwise `data` lives in a pooled buffer that the
    consumer must hand back with `release()` once it has used it (possibly on another thread).
    """

    step: Step
    start: int
    stop: int
    data: torch.Tensor | None
    release: Callable[[], None] = field(default=lambda: None)
    may_differ: int = 0
