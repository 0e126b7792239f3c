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

Before any value, each tensor's dtype and shape must be the plan's: the base's, or for every
float tensor the one float dtype the merged model holds them all in (what `merge --dtype`
writes). Anything else (an integer, boolean or FP8 tensor in place of a float one, one tensor
cast on its own) is reported as of another dtype, never compared. A stored Inf or NaN where
the exact value is finite is always a difference, even where rounding to the stored dtype
would give it (an overflow is not a rounding error).

A bound is only a check while it is small beside the value it bounds. An adapter can inflate
it (an r=2 LoRA whose factors hold values near 10⁸ that cancel makes |B|·|A| huge, and with
it the allowance, while ΔW stays small), and then any value passes. So an element that is not
the correctly rounded exact value, but within an allowance above `CHECKABLE` of its value, is
*not checkable*: the tensor is reported as such and verify fails. The value here is the
larger of the element's magnitude and its row's root mean square, since an element that
cancels to almost zero has no scale of its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bonemerge.checkpoint import Checkpoint, ComputedTensor, RangeReader, TensorRef, dtypes
from bonemerge.checkpoint.tensors import read_grid_rows, read_rows, read_whole
from bonemerge.codecs import Bands, Derived, Rounding, Stored, find_stored
from bonemerge.plan.build import Plan, Step
from bonemerge.run.compute import CHUNK_ELEMENTS, chunk_rows
from bonemerge.run.engine import Engine
from bonemerge.run.work import EngineOptions
from bonemerge.verification import tolerance

MODES = ("exact", "tolerance")
# The largest allowance, as a fraction of the value, at which an element still counts as
# checked: FP8 (e4m3) rounding moves a value by up to 1/16 of it, so a bound wider than that
# could not tell the model from a far coarser copy of it. Correct merges stay far below: the
# output's own rounding is at most 1/256 of the value (bf16), the fp32 arithmetic about
# 10⁻⁶ of the magnitudes that went in, DoRA's norm about 4·n·2⁻²⁴ over n inputs (0.8 % at
# 32 k, 6 % only for a 256 k-row embedding); only cancelling adapters reach it otherwise.
CHECKABLE = 1 / 16


@dataclass
class Difference:
    """A tensor outside its allowance: how many elements, the largest absolute error, and the
    largest error in units in the last place of each element's own value."""

    name: str
    elements: int
    max_abs: float
    max_ulp: float
    floating: bool = True

    def describe(self, exact: bool) -> str:
        """`NAME: 3 elements beyond their rounding bound, largest 0.25 (2 ulp of the element)`."""
        head = f"{self.name}: {_counted(self.elements, 'element')}"
        if not self.floating:
            return f"{head} {_differ(self.elements)} (not a float tensor)"
        allowed = "no difference allowed" if exact else f"beyond {_their(self.elements)} rounding bound"
        if not math.isfinite(self.max_abs):
            return f"{head} {allowed}, stored as Inf or NaN where the merge is finite"
        return f"{head} {allowed}, largest {self.max_abs:.3g} ({_ulps(self.max_ulp)} of the element)"


@dataclass
class Unchecked:
    """A tensor verify cannot vouch for: `elements` differ from the correctly rounded value by
    less than their allowance, but that allowance exceeds `CHECKABLE` of the value (up to
    `max_ratio` times it)."""

    name: str
    elements: int
    max_ratio: float

    def describe(self) -> str:
        return (
            f"{self.name}: {_counted(self.elements, 'element')} {_differ(self.elements)} from the exact "
            f"merge by less than {_their(self.elements)} rounding bound, but that bound reaches "
            f"{self.max_ratio:.3g} times {_their(self.elements)} value (more than 1/{round(1 / CHECKABLE)}), "
            "so rounding cannot be told from a change (the adapter's factors are far larger than the "
            "update they make); a model bonemerge merged is checked bit for bit instead"
        )


def _counted(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def _differ(number: int) -> str:
    return "differs" if number == 1 else "differ"


def _their(number: int) -> str:
    return "its" if number == 1 else "their"


def _ulps(ulps: float) -> str:
    """Ulps as a reader takes them in: `2`, `37.5`, `1,234`, `more than 10⁶`."""
    if ulps >= 1e6:
        return "more than 10⁶ ulp"
    if ulps >= 100:
        return f"{round(ulps):,} ulp"
    return f"{ulps:.3g} ulp"


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
    unchecked: list[Unchecked] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (
            self.differing or self.unchecked or self.missing or self.extra or self.mismatched or self.stray
        )

    def to_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok}

    def counts(self) -> str:
        """`12 identical, 4 within rounding, 0 differing, ...`: the report's first line."""
        counts = [
            f"{self.identical} identical",
            f"{self.within_rounding} within rounding",
            f"{len(self.differing)} differing",
        ]
        if self.unchecked:
            counts.append(f"{len(self.unchecked)} not checkable")
        counts += [
            f"{len(self.missing)} missing",
            f"{len(self.extra)} extra",
            f"{len(self.mismatched)} of another shape or dtype",
        ]
        return ", ".join(counts)


@dataclass
class _Tally:
    """Differences found so far in one tensor."""

    max_abs: float = 0.0
    max_ulp: float = 0.0
    elements: int = 0
    changed: bool = False
    floating: bool = True
    unchecked: int = 0
    max_ratio: float = 0.0

    def add(self, expected: torch.Tensor, got: torch.Tensor, dtype: str) -> None:
        """Compare `got` with `expected` bit for bit (NaN equal to NaN)."""
        if torch.equal(expected, got) or _same_nans(expected, got):
            return
        self.changed = True
        if not expected.is_floating_point() or dtype not in dtypes.COMPUTABLE:
            self.floating = False
            self.elements += int((expected != got).sum())
            return
        self._count(expected.double(), got.double(), torch.zeros((), dtype=torch.float64), dtype)

    def add_within(
        self,
        exact: torch.Tensor,
        got: torch.Tensor,
        dtype: str,
        allowance: torch.Tensor,
        exempt: torch.Tensor | float = 0.0,
    ) -> None:
        """Compare `got` with the float64 `exact` values element by element: equal to their
        rounding to `dtype`, or within `allowance` of them (and then checkable only where the
        allowance is small beside the value, see `CHECKABLE`). `exempt` is the part of the
        allowance that is the stored format's own step (a quantized code step): it is what the
        format promises, so only the rest counts against `CHECKABLE`."""
        rounded = exact.to(dtypes.to_torch(dtype))
        same = ((rounded == got) | (rounded.isnan() & got.isnan())) & (got.isfinite() | ~exact.isfinite())
        if bool(same.all()):
            return
        self.changed = True
        wrong = self._count(exact, got.double(), allowance, dtype, ~same)
        loose = ~same & ~wrong
        if bool(loose.any()):
            ratio = (allowance - exempt) / torch.maximum(exact.abs(), _row_scale(exact))
            loose &= ~(ratio <= CHECKABLE)
            if bool(loose.any()):
                self.unchecked += int(loose.sum())
                self.max_ratio = max(self.max_ratio, float(ratio[loose].max()))

    def _count(
        self,
        exact: torch.Tensor,
        stored: torch.Tensor,
        allowance: torch.Tensor,
        dtype: str,
        among: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Count the elements (of `among`) beyond `allowance`, a stored Inf or NaN where the
        exact value is finite included; returns where they are."""
        diff = torch.nan_to_num((exact - stored).abs(), nan=math.inf, posinf=math.inf)
        wrong = ~(diff <= allowance) & ~(exact.isnan() & stored.isnan())
        if among is not None:
            wrong &= among
        if bool(wrong.any()):
            self.elements += int(wrong.sum())
            found = diff[wrong]
            self.max_abs = max(self.max_abs, float(found.max()))
            self.max_ulp = max(self.max_ulp, float((found / tolerance.ulp(exact[wrong], dtype)).max()))
        return wrong


def _row_scale(values: torch.Tensor) -> torch.Tensor:
    """Each element's row's root mean square (of the whole chunk for a 1-D tensor)."""
    if values.dim() < 2:
        return values.square().mean().sqrt().expand_as(values)
    return values.square().mean(dim=-1, keepdim=True).sqrt().expand_as(values)


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
            merged.decode(_step_rows(reader, ref, step, start, stop), got, start)
            step_size = merged.step_size(values, start)
            tally.add_within(values, got, "F64", carried + step_size, exempt=step_size)
            continue
        allowance = tolerance.final_allowance(values, carried, step.dtype)
        tally.add_within(values, read_rows(reader, ref, start, stop), step.dtype, allowance)
    if isinstance(step.source, ComputedTensor):
        step.source.release()


def _exact_input(
    reader: RangeReader, step: Step, start: int, stop: int, decoder: Bands | None
) -> torch.Tensor:
    """Rows of the step's input (decoded, when stored quantized) as a float64 copy the merges
    may change in place."""
    rows = _step_rows(reader, step.source, step, start, stop)
    if decoder is None:
        return rows.to(torch.float64, copy=True)
    values = torch.empty((rows.shape[0], rows.shape[1] * decoder.values_per_code), dtype=torch.float64)
    decoder.decode(rows, values, start)
    return values


def _step_rows(reader: RangeReader, source, step: Step, start: int, stop: int) -> torch.Tensor:
    return read_grid_rows(reader, source, step.grid, start, stop)


def _loader(reader: RangeReader, op) -> Callable[[str], torch.Tensor]:
    def load(part: str) -> torch.Tensor:
        return read_whole(reader, op.block.parts[part])

    return load


def _spans(step: Step) -> list[tuple[int, int]]:
    """Row ranges of about CHUNK_ELEMENTS elements, keeping the rows each method needs together."""
    rows = step.grid[0]
    size = chunk_rows(step)
    return [(start, min(rows, start + size)) for start in range(0, rows, size)]


def stored_cast(plan: Plan, merged: Checkpoint) -> str | None:
    """The one float dtype `merged` holds every float tensor of `plan` in, where the plan keeps
    other dtypes: what `merge --dtype` writes, so the plan to compare with is cast to it. None
    when the stored dtypes are the plan's, or mixed (each tensor must then be the plan's)."""
    found = {
        merged.tensors[name].dtype
        for name, step in plan.steps.items()
        if step.dtype in dtypes.COMPUTABLE and name in merged.tensors
    }
    if len(found) != 1:
        return None
    (dtype,) = found
    # a quantized weight written dense, under its name or its module's (MXFP4's `X_blocks` as `X`)
    dequantized = any(
        step.dtype not in dtypes.COMPUTABLE
        and (name not in merged.tensors or merged.tensors[name].dtype in dtypes.COMPUTABLE)
        for name, step in plan.steps.items()
    )
    if dtype not in dtypes.COMPUTABLE or (
        not dequantized
        and all(step.dtype == dtype for step in plan.steps.values() if step.dtype in dtypes.COMPUTABLE)
    ):
        return None
    return dtype


def verify_plan(plan: Plan, merged: Checkpoint, options: EngineOptions, exact: bool) -> VerifyReport:
    """Stream `plan` and compare every tensor with the one of the same name in `merged`: first
    its dtype and shape, then bit for bit when `exact`, else merged tensors element by element
    within their rounding bound."""
    report = VerifyReport(str(merged.root), mode=MODES[0] if exact else MODES[1])
    report.missing = sorted(set(plan.steps) - set(merged.tensors))
    report.extra = sorted(set(merged.tensors) - set(plan.steps))
    steps: list[Step] = []
    for name, step in plan.steps.items():
        found = merged.tensors.get(name)
        if found is None:
            continue
        if found.shape != step.shape or found.dtype != step.dtype:
            report.mismatched.append(
                f"{name} is {found.dtype} {list(found.shape)}, "
                f"but the merge gives {step.dtype} {list(step.shape)}"
            )
            continue
        steps.append(step)

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
                        got = read_grid_rows(reader, ref, step.written_grid, chunk.start, chunk.stop)
                        tally.add(chunk.data, got, step.dtype)
                    finally:
                        chunk.release()
                    continue
                cols = dtypes.rows_cols(step.shape)[1]
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
        elif tally.elements:
            report.differing.append(
                Difference(name, tally.elements, tally.max_abs, round(tally.max_ulp, 2), tally.floating)
            )
        elif tally.unchecked:
            report.unchecked.append(Unchecked(name, tally.unchecked, tally.max_ratio))
        else:
            report.within_rounding += 1
    report.differing.sort(key=lambda d: d.name)
    report.unchecked.sort(key=lambda u: u.name)
    report.mismatched.sort()
    return report


@dataclass
class ChecksumReport:
    """`verify --checksums`: every file the manifest lists, compared by size and the digest it
    records (XXH3-128; BLAKE3 or SHA-256 in manifests of earlier versions)."""

    folder: str
    matching: list[str] = field(default_factory=list)
    differing: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.matching) and not (self.differing or self.missing or self.stray)

    def counts(self) -> str:
        """`checksums: 7 files intact, 0 differing, 0 missing`."""
        return (
            f"checksums: {_counted(len(self.matching), 'file')} intact, {len(self.differing)} differing, "
            f"{len(self.missing)} missing"
        )

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
