"""Checking a merged model against a fresh computation of the same merge, tensor by tensor.

The merge is planned again from the base and adapters and streamed through the engine, but
instead of being written each chunk is compared with the same rows of the merged model.
Untouched tensors must be identical. Merged ones may differ by what rounding in another
order explains, measured in units in the last place (ulp) of the output dtype at the scale
of the row (the largest magnitude in it): PEFT rounds intermediate results of that scale, so
one such unit is its worst case for the default and mini variants; a Bat tile product adds
the error of an fp32 inner product over r terms. A model merged twice, merged with the
wrong adapter or edited afterwards is far outside that.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bonemerge.checkpoint import Checkpoint, RangeReader, dtypes
from bonemerge.checkpoint.tensors import read_rows
from bonemerge.engine import CHUNK_ELEMENTS, Engine, EngineOptions
from bonemerge.plan import Plan, Step

_MANTISSA = {"F16": 10, "BF16": 7, "F32": 23, "F64": 52}


@dataclass
class Difference:
    """A tensor outside tolerance: largest absolute error, and in row-scaled ulps."""

    name: str
    max_abs: float
    max_ulp: float
    allowed_ulp: float
    elements: int


@dataclass
class VerifyReport:
    """What `bonemerge verify` found; `ok` only when nothing differs, is missing or is extra."""

    merged: str
    identical: int = 0
    within_rounding: int = 0
    differing: list[Difference] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.differing or self.missing or self.extra or self.mismatched or self.stray)

    def to_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok}


def row_ulps(expected: torch.Tensor, got: torch.Tensor, dtype: str) -> torch.Tensor:
    """|got - expected| in units in the last place of `dtype` at each row's largest magnitude."""
    scale = expected.double().abs().amax(dim=-1, keepdim=True)
    _, exponent = torch.frexp(scale)
    unit = torch.ldexp(torch.ones_like(scale), exponent - 1 - _MANTISSA[dtype])
    unit = torch.where(scale > 0, unit, torch.finfo(torch.float64).tiny)
    return (got.double() - expected.double()).abs() / unit


def allowed_ulps(step: Step) -> float:
    """Rounding another implementation may add: one unit, plus an fp32 product per Bat term."""
    if step.dtype not in _MANTISSA:
        return 0.0
    terms = sum(op.block.shape[-1] for op in step.ops if op.variant == "bat")
    return (1.0 if step.ops else 0.0) + terms * 2.0 ** (_MANTISSA[step.dtype] - 23)


@dataclass
class _Tally:
    max_abs: float = 0.0
    max_ulp: float = 0.0
    elements: int = 0

    def add(self, expected: torch.Tensor, got: torch.Tensor, dtype: str) -> None:
        if torch.equal(expected, got):
            return
        wrong = expected != got
        if expected.is_floating_point():
            wrong &= ~(expected.isnan() & got.isnan())
        self.elements += int(wrong.sum())
        if not expected.is_floating_point() or dtype not in _MANTISSA:
            self.max_abs, self.max_ulp = math.inf, math.inf
            return
        diff = torch.nan_to_num((expected.double() - got.double()).abs(), nan=math.inf)
        self.max_abs = max(self.max_abs, float(diff.max()))
        ulps = torch.nan_to_num(row_ulps(expected, got, dtype), nan=math.inf)
        self.max_ulp = max(self.max_ulp, float(ulps.max()))


def verify_plan(plan: Plan, merged: Checkpoint, options: EngineOptions) -> VerifyReport:
    """Stream `plan` and compare every tensor with the one of the same name in `merged`."""
    report = VerifyReport(str(merged.root))
    report.missing = sorted(set(plan.steps) - set(merged.tensors))
    report.extra = sorted(set(merged.tensors) - set(plan.steps))
    steps: list[Step] = []
    for name, step in plan.steps.items():
        found = merged.tensors.get(name)
        if found is None:
            continue
        if found.shape != step.shape or (found.dtype != step.dtype and step.dtype not in dtypes.COMPUTABLE):
            report.mismatched.append(
                f"{name}: expected {step.dtype} {list(step.shape)}, found {found.dtype} {list(found.shape)}"
            )
            continue
        # Compare in the dtype the merged model chose (it may have been written with --dtype).
        steps.append(Step(name, found.dtype, step.shape, step.source, step.ops))

    engine = Engine(steps, options)
    tallies: dict[str, _Tally] = {}
    with RangeReader() as reader:
        try:
            for chunk in engine.stream():
                step, ref = chunk.step, merged.tensors[chunk.step.name]
                tally = tallies.setdefault(step.name, _Tally())
                if chunk.data is not None:
                    try:
                        tally.add(chunk.data, read_rows(reader, ref, chunk.start, chunk.stop), step.dtype)
                    finally:
                        chunk.release()
                    continue
                cols = math.prod(step.shape) // max(chunk.stop, 1)
                size = max(1, CHUNK_ELEMENTS // max(cols, 1))
                for start in range(0, chunk.stop, size):
                    stop = min(chunk.stop, start + size)
                    tally.add(
                        read_rows(reader, step.source, start, stop),
                        read_rows(reader, ref, start, stop),
                        step.dtype,
                    )
        finally:
            engine.close()
    allowed = {step.name: allowed_ulps(step) for step in steps}
    for name, tally in tallies.items():
        if tally.elements == 0:
            report.identical += 1
        elif tally.max_ulp <= allowed[name]:
            report.within_rounding += 1
        else:
            report.differing.append(
                Difference(name, tally.max_abs, round(tally.max_ulp, 2), allowed[name], tally.elements)
            )
    report.mismatched.sort()
    return report


@dataclass
class ChecksumReport:
    """`verify --checksums`: every file the manifest lists, compared by size and SHA-256."""

    folder: str
    matching: list[str] = field(default_factory=list)
    differing: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.matching) and not (self.differing or self.missing or self.stray)

    def to_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok}


def verify_checksums(folder: Path, manifest: dict) -> ChecksumReport:
    """Hash every file named in `manifest["files"]`; no base model is needed."""
    from bonemerge.checkpoint.writer import file_sha256

    report = ChecksumReport(str(folder))
    for name, expected in sorted(manifest.get("files", {}).items()):
        path = folder / name
        if not path.is_file():
            report.missing.append(name)
        elif path.stat().st_size != expected.get("bytes") or file_sha256(path) != expected.get("sha256"):
            report.differing.append(name)
        else:
            report.matching.append(name)
    return report
