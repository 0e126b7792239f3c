"""Checking a merged model against a fresh computation of the same merge, tensor by tensor.

The merge is planned again from the base and adapters and streamed, but instead of being
written each chunk is compared with the same rows of the merged model. Untouched tensors
must be identical. Merged ones are checked in one of two modes:

- **exact**: the merged model's history says bonemerge made it from these adapters with the
  same maths version, precision, device type and torch version. That computation is
  deterministic, so the engine recomputes it and every bit must match.
- **tolerance**: anything else (PEFT, other tools, other settings). The merge is recomputed
  in float64 and each element may differ from that only by its own rounding error, bounded
  from the magnitudes that went into it (see `tolerance.py`), never by a row-wide scale: a
  model merged twice, merged with the wrong adapter, or with one element edited by a few
  units in its last place is outside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from bonemerge import tolerance
from bonemerge.checkpoint import Checkpoint, RangeReader, TensorRef, dtypes
from bonemerge.checkpoint.tensors import read_rows, read_whole
from bonemerge.codecs import Bands, Derived, Rounding, Stored, find_stored
from bonemerge.compute import CHUNK_ELEMENTS, chunk_rows
from bonemerge.engine import Engine, EngineOptions
from bonemerge.plan import Plan, Step

MODES = ("exact", "tolerance")


@dataclass
class Difference:
    """A tensor outside its allowance: how many elements, the largest absolute error, and the
    largest error in units in the last place of each element's own value."""

    name: str
    elements: int
    max_abs: float
    max_ulp: float


@dataclass
class VerifyReport:
    """What `bonemerge verify` found; `ok` only when nothing differs, is missing or is extra."""

    merged: str
    base: str = ""
    mode: str = "tolerance"
    reason: str = ""
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


@dataclass
class _Tally:
    """Differences found so far in one tensor."""

    max_abs: float = 0.0
    max_ulp: float = 0.0
    elements: int = 0
    changed: bool = False

    def add(
        self,
        expected: torch.Tensor,
        got: torch.Tensor,
        dtype: str,
        allowance: torch.Tensor | None = None,
        rounded: torch.Tensor | None = None,
    ) -> None:
        """Compare `got` with `expected`: bit for bit without `allowance`, else element by
        element within it (`rounded`, the expected values in the stored dtype, tells an
        identical tensor from one within rounding)."""
        reference = expected if rounded is None else rounded
        if torch.equal(reference, got) or _same_nans(reference, got):
            return
        self.changed = True
        if not expected.is_floating_point() or dtype not in dtypes.COMPUTABLE:
            self.elements += int((reference != got).sum())
            self.max_abs, self.max_ulp = math.inf, math.inf
            return
        wide, stored = expected.double(), got.double()
        diff = torch.nan_to_num((wide - stored).abs(), nan=math.inf)
        wrong = ~(diff <= (0 if allowance is None else allowance))
        wrong &= ~(wide.isnan() & stored.isnan())
        if not bool(wrong.any()):
            return
        self.elements += int(wrong.sum())
        self.max_abs = max(self.max_abs, float(diff[wrong].max()))
        ulps = diff[wrong] / tolerance.ulp(wide[wrong], dtype)
        self.max_ulp = max(self.max_ulp, float(ulps.max()))


def _same_nans(expected: torch.Tensor, got: torch.Tensor) -> bool:
    return expected.is_floating_point() and bool(((expected == got) | (expected.isnan() & got.isnan())).all())


def _check_with_tolerance(
    step: Step, ref: TensorRef, reader: RangeReader, tally: _Tally, stored: Stored | None = None
) -> None:
    """Recompute `step` in float64 and compare each stored element within its own bound. A
    weight kept quantized (`stored`: how the merged model stores it) is compared by value:
    its codes decoded with its own scales, within one code step of the recomputed value."""
    loaders = [_loader(reader, op) for op in step.ops]
    maths = [
        op.block.method.prepare(op, load, step.shape, torch.float64, "cpu", "fp64")
        for op, load in zip(step.ops, loaders, strict=True)
    ]
    # a re-encoded weight is computed in fp32 and not rounded between its merges
    dtype = "F32" if step.encode is not None else step.dtype
    bounds = [
        op.block.method.error_bound(op, load, step.shape, dtype)
        for op, load in zip(step.ops, loaders, strict=True)
    ]
    load = lambda source: read_whole(reader, source)  # noqa: E731
    decoder = None if step.decode is None else step.decode.codec.prepare(step.decode, load, Rounding(), "cpu")
    merged = None if stored is None else stored.codec.prepare(stored, load, Rounding(), "cpu")

    def through(values: torch.Tensor, start: int, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact rows and their error bound after the first `upto` ops."""
        carried = torch.zeros_like(values)
        for number in range(upto):
            if number:
                carried = tolerance.between_merges(values, carried, dtype)
            carried = bounds[number].bound(values, start, carried, number > 0)
            maths[number].merge(values, start)
        return values, carried

    for index, op_maths in enumerate(maths):
        watch = bounds[index].needs_pass
        if not (op_maths.needs_pass or watch):
            continue
        for start, stop in _spans(step):
            values, carried = through(_exact_input(reader, step, start, stop, decoder), start, index)
            if index:
                carried = tolerance.between_merges(values, carried, dtype)
            if op_maths.needs_pass:
                op_maths.observe(values, start)
            if watch:
                bounds[index].observe(values, carried, start)
        if op_maths.needs_pass:
            op_maths.finish()
    for start, stop in _spans(step):
        values, carried = through(_exact_input(reader, step, start, stop, decoder), start, len(maths))
        if merged is not None:
            got = torch.empty_like(values)
            merged.decode(read_rows(reader, ref, start, stop), got, start)
            tally.add(values, got, "F64", carried + merged.step_size(values, start))
            continue
        allowance = tolerance.final_allowance(values, carried, step.dtype)
        rounded = values.to(dtypes.to_torch(step.dtype))
        tally.add(values, read_rows(reader, ref, start, stop), step.dtype, allowance, rounded)


def _exact_input(
    reader: RangeReader, step: Step, start: int, stop: int, decoder: Bands | None
) -> torch.Tensor:
    """Rows of the step's input (decoded, when stored quantized) as a float64 copy the merges
    may change in place."""
    rows = read_rows(reader, step.source, start, stop)
    if decoder is None:
        return rows.to(torch.float64, copy=True)
    values = torch.empty(rows.shape, dtype=torch.float64)
    decoder.decode(rows, values, start)
    return values


def _loader(reader: RangeReader, op) -> Callable[[str], torch.Tensor]:
    def load(part: str) -> torch.Tensor:
        return read_whole(reader, op.block.parts[part])

    return load


def _spans(step: Step) -> list[tuple[int, int]]:
    """Row ranges of about CHUNK_ELEMENTS elements, keeping the rows each method needs together."""
    rows = step.shape[0] if step.shape else 1
    size = chunk_rows(step)
    return [(start, min(rows, start + size)) for start in range(0, rows, size)]


def verify_plan(plan: Plan, merged: Checkpoint, options: EngineOptions, exact: bool) -> VerifyReport:
    """Stream `plan` and compare every tensor with the one of the same name in `merged`: bit for
    bit when `exact`, else merged tensors element by element within their rounding bound."""
    report = VerifyReport(str(merged.root), mode=MODES[0] if exact else MODES[1])
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
        steps.append(replace(step, dtype=found.dtype))

    streamed = steps if exact else [s for s in steps if not s.ops and not isinstance(s.source, Derived)]
    tallies: dict[str, _Tally] = {s.name: _Tally() for s in steps}
    engine = Engine(streamed, options)
    with RangeReader() as reader:
        try:
            for chunk in engine.stream():
                step, ref = chunk.step, merged.tensors[chunk.step.name]
                tally = tallies[step.name]
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
        if not exact:
            stored = find_stored(merged) if any(s.encode for s in steps) else {}
            for step in steps:
                if step.ops:
                    where = merged.tensors[step.name]
                    _check_with_tolerance(step, where, reader, tallies[step.name], stored.get(step.name))
                elif isinstance(step.source, Derived):
                    # scales are checked through the values they decode (above)
                    tallies[step.name].changed = True
    for name, tally in tallies.items():
        if not tally.changed:
            report.identical += 1
        elif not tally.elements:
            report.within_rounding += 1
        else:
            report.differing.append(Difference(name, tally.elements, tally.max_abs, round(tally.max_ulp, 2)))
    report.differing.sort(key=lambda d: d.name)
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
    from bonemerge.checkpoint.digest import file_digest, recorded

    report = ChecksumReport(str(folder))
    for name, expected in sorted(manifest.get("files", {}).items()):
        path = folder / name
        if not path.is_file():
            report.missing.append(name)
        elif path.stat().st_size != expected.get("bytes") or (
            (found := recorded(expected)) is None or file_digest(path, found[0]) != found[1]
        ):
            report.differing.append(name)
        else:
            report.matching.append(name)
    return report
