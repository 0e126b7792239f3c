"""What a model-writing command did: the summary line and what `--json` prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# What each command did to the tensors it changed with adapter blocks: the summary's words
# and `--json`'s key (`tensors_merged` stays in unmerge's JSON too, for existing readers).
BLOCK_VERBS = {"merge": "merged", "unmerge": "unmerged"}


@dataclass
class Report:
    """What a command wrote; `--json` prints exactly this. `tensors_merged` counts the tensors
    whose blocks were merged (or, for unmerge, taken out: `tensors_unmerged` in `to_dict`).
    `lossy` (unmerge only): how many elements of those tensors may not come back exactly."""

    operation: str
    output: str
    inputs: list[str]
    tensors_merged: int
    tensors_copied: int
    tensors_converted: int
    bytes_written: int
    seconds: float
    files: list[str]
    notes: list[str] = field(default_factory=list)
    pushed_to: str | None = None
    conversion: dict | None = None
    lossy: dict | None = None
    quantized: dict | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.operation != "unmerge":
            return data
        ordered = {}
        for key, value in data.items():
            if key == "tensors_merged":
                ordered["tensors_unmerged"] = value
            ordered[key] = value
        return ordered

    def counts(self) -> str:
        """`12 tensors merged, 40 copied, 0 converted`: what the summary line says was done,
        in the words of the command (strip and unload merge nothing, so they say nothing of it)."""
        verb = BLOCK_VERBS.get(self.operation)
        if verb is None:
            return f"{self.tensors_copied} tensors copied, {self.tensors_converted} converted"
        return (
            f"{self.tensors_merged} tensors {verb}, {self.tensors_copied} copied, "
            f"{self.tensors_converted} converted"
        )
