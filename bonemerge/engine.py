"""Executing a `Plan`: read, transform, check and write every output tensor, in bounded memory.

The engine decides nothing about *what* to compute; it only moves bytes as fast as it can:

- tensors the plan leaves untouched go file-to-file (`copy_file_range`), never into Python;
- other tensors are streamed in row chunks of about `CHUNK_ELEMENTS` elements through three
  preallocated buffers (raw input, compute, output), so memory does not grow with the model;
- a read-ahead thread fills raw-input buffers from a small pool while the main thread
  computes and writes, so the disk and the CPU work at the same time;
- every merged chunk is checked for NaN/Inf before it is written when `safe_merge` is on.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bonemerge import maths
from bonemerge.checkpoint import MemoryTensor, RangeReader, ShardWriter, TensorRef, dtypes
from bonemerge.errors import BonemergeError, MergeError

if TYPE_CHECKING:
    from bonemerge.plan import Plan, Step

CHUNK_ELEMENTS = 4 << 20
READ_AHEAD = 3
METADATA = {"format": "pt"}


@dataclass(frozen=True)
class EngineOptions:
    """How to compute: `precision` auto = fp64 for fp32/fp64 outputs, fp32 for 16-bit ones."""

    device: str = "cpu"
    precision: str = "auto"
    safe_merge: bool = True
    progress: bool = True


@dataclass
class EngineStats:
    merged: int = 0
    copied: int = 0
    converted: int = 0
    bytes_written: int = 0


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    rows = shape[0] if shape else 1
    return rows, (math.prod(shape) // rows if rows else 0)


def _row_multiple(step: Step) -> int:
    multiple = 1
    for op in step.ops:
        if op.variant == "bat":
            multiple = math.lcm(multiple, op.block.shape[-1])
    return multiple


def chunk_rows(step: Step) -> int:
    """Rows per chunk: about CHUNK_ELEMENTS elements, a multiple of every Bat block size."""
    rows, cols = _rows_cols(step.shape)
    multiple = _row_multiple(step)
    fit = max(1, CHUNK_ELEMENTS // max(cols, 1) // multiple) * multiple
    return min(rows, fit) if rows else 0


def _chunks(step: Step) -> Iterator[tuple[int, int]]:
    rows, _ = _rows_cols(step.shape)
    size = chunk_rows(step)
    for start in range(0, rows, size or 1):
        yield start, min(rows, start + size)


def compute_dtype(step: Step, precision: str) -> torch.dtype:
    if precision == "fp64" or step.dtype == "F64" or (precision == "auto" and step.dtype == "F32"):
        return torch.float64
    return torch.float32


def all_finite(values: torch.Tensor) -> bool:
    """NaN/Inf check at the cost of one sum: NaN and Inf survive summation, so a finite sum
    proves a finite chunk; only a non-finite sum (or an overflowing one) needs the full test."""
    total = values.sum(dtype=torch.float64 if values.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(values).all())


@dataclass(frozen=True)
class _Read:
    step: Step
    start: int
    stop: int


class _ReadAhead:
    """A thread that reads the raw rows of upcoming chunks into a small pool of buffers."""

    def __init__(self, reader: RangeReader, reads: list[_Read], size: int) -> None:
        self._reader = reader
        self._reads = reads
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(READ_AHEAD if reads else 0):
            self._free.put(bytearray(size))
        self._ready: queue.Queue[tuple[_Read, bytearray] | BaseException] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bonemerge-read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for read in self._reads:
                buf = None
                while buf is None:
                    if self._stop.is_set():
                        return
                    try:
                        buf = self._free.get(timeout=0.1)
                    except queue.Empty:
                        continue
                source = read.step.source
                _, cols = _rows_cols(source.shape)
                row_bytes = cols * dtypes.BITS[source.dtype] // 8
                size = (read.stop - read.start) * row_bytes
                self._reader.readinto(
                    source.path, source.offset + read.start * row_bytes, memoryview(buf)[:size]
                )
                self._ready.put((read, buf))
        except BaseException as exc:  # handed to the main thread, which re-raises it
            self._ready.put(exc)

    def next(self) -> tuple[_Read, bytearray]:
        item = self._ready.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def release(self, buf: bytearray) -> None:
        self._free.put(buf)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="writing", leave=False
            )

    def update(self, size: int) -> None:
        if self._bar is not None:
            self._bar.update(size)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Engine:
    """Runs one plan into one folder; `run` is the only entry point."""

    def __init__(self, plan: Plan, options: EngineOptions) -> None:
        self.plan = plan
        self.options = options
        self.device = torch.device(options.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BonemergeError("--device cuda was asked for, but torch sees no CUDA device here.")
        self.stats = EngineStats()
        self.reader = RangeReader()
        transformed = [s for s in plan.steps.values() if not s.is_copy and s.nbytes]

        def chunk_bytes(step: Step, dtype: str) -> int:
            return chunk_rows(step) * _rows_cols(step.shape)[1] * dtypes.BITS[dtype] // 8

        elements = max((chunk_rows(s) * _rows_cols(s.shape)[1] for s in transformed if s.ops), default=0)
        self._work = torch.empty(elements, dtype=torch.float64 if self._wide(transformed) else torch.float32)
        self._out = torch.empty(
            max((chunk_bytes(s, s.dtype) for s in transformed), default=0), dtype=torch.uint8
        )
        self._raw_size = max(
            (chunk_bytes(s, s.source.dtype) for s in transformed if isinstance(s.source, TensorRef)),
            default=0,
        )

    def _wide(self, steps: list[Step]) -> bool:
        return any(s.ops and compute_dtype(s, self.options.precision) == torch.float64 for s in steps)

    def run(self, folder: Path) -> EngineStats:
        reads = [
            _Read(step, start, stop)
            for shard in self.plan.shards
            for entry in shard.entries
            if not (step := self.plan.steps[entry.name]).is_copy and isinstance(step.source, TensorRef)
            for start, stop in _chunks(step)
        ]
        progress = _Progress(self.plan.total_bytes, self.options.progress)
        ahead = _ReadAhead(self.reader, reads, self._raw_size)
        try:
            for shard in self.plan.shards:
                writer = ShardWriter(folder / shard.filename, shard.entries, METADATA)
                try:
                    for entry in shard.entries:
                        self._write_step(self.plan.steps[entry.name], writer, ahead, progress)
                    writer.close()
                except BaseException:
                    writer.abort()
                    raise
        finally:
            ahead.close()
            progress.close()
            self.reader.close()
        return self.stats

    def _write_step(self, step: Step, writer: ShardWriter, ahead: _ReadAhead, progress: _Progress) -> None:
        if step.is_copy:
            source = step.source
            writer.copy_from(self.reader.fd(source.path), source.offset, source.nbytes)
            self.stats.copied += 1
        elif step.nbytes:
            self._transform(step, writer, ahead, progress)
            if step.ops:
                self.stats.merged += 1
            else:
                self.stats.converted += 1
        if step.is_copy:
            progress.update(step.nbytes)
        self.stats.bytes_written += step.nbytes

    def _prepare(self, step: Step, dtype: torch.dtype) -> list[tuple[maths.BlockMaths, bool]]:
        return [
            (maths.prepare(op.variant, self._load(op.block), step.shape, dtype, self.device), op.inverse)
            for op in step.ops
        ]

    def _load(self, source: TensorRef | MemoryTensor) -> torch.Tensor:
        """A whole (small) tensor such as an adapter block, in its own dtype."""
        if isinstance(source, MemoryTensor):
            return source.tensor
        raw = self.reader.read(source.path, source.offset, source.nbytes)
        return torch.frombuffer(raw, dtype=dtypes.to_torch(source.dtype)).reshape(source.shape)

    def _rows(
        self, step: Step, start: int, stop: int, ahead: _ReadAhead
    ) -> tuple[torch.Tensor, bytearray | None]:
        source = step.source
        rows, cols = _rows_cols(source.shape)
        if isinstance(source, MemoryTensor):
            return source.tensor.reshape(rows, cols)[start:stop], None
        read, buf = ahead.next()
        assert (read.step, read.start, read.stop) == (step, start, stop), "read-ahead out of order"
        count = (stop - start) * cols
        raw = torch.frombuffer(buf, dtype=dtypes.to_torch(source.dtype), count=count)
        return raw.view(stop - start, cols), buf

    def _transform(self, step: Step, writer: ShardWriter, ahead: _ReadAhead, progress: _Progress) -> None:
        compute = compute_dtype(step, self.options.precision)
        prepared = self._prepare(step, compute)
        out_dtype = dtypes.to_torch(step.dtype)
        check = self.options.safe_merge and step.dtype in dtypes.COMPUTABLE
        _, cols = _rows_cols(step.shape)
        for start, stop in _chunks(step):
            rows, buf = self._rows(step, start, stop, ahead)
            out = self._out[: (stop - start) * cols * dtypes.BITS[step.dtype] // 8]
            typed = out.view(out_dtype).view(stop - start, cols)
            typed.copy_(self._compute(rows, prepared, compute, start) if prepared else rows)
            if buf is not None:
                ahead.release(buf)
            if check and not all_finite(typed):
                self._non_finite(step, start, stop)
            writer.write(memoryview(out.numpy()))
            progress.update(len(out))

    def _compute(
        self,
        rows: torch.Tensor,
        prepared: list[tuple[maths.BlockMaths, bool]],
        dtype: torch.dtype,
        start: int,
    ) -> torch.Tensor:
        """The chunk in the compute dtype with every block applied, in order, in place."""
        if self.device.type == "cpu":
            work = self._work.view(dtype)[: rows.numel()].view(rows.shape)
            work.copy_(rows)
        else:
            work = rows.to(self.device).to(dtype)
        for block, inverse in prepared:
            if inverse:
                block.unmerge(work, start)
            else:
                block.merge(work, start)
        return work

    def _non_finite(self, step: Step, start: int, stop: int) -> None:
        what = (
            f"merging {', '.join(op.adapter for op in step.ops)} into {step.name}"
            if step.ops
            else f"converting {step.name} to {dtypes.TORCH_NAME[step.dtype]}"
        )
        raise MergeError(
            f"{what} gave NaN or Inf in rows {start}-{stop - 1}; the adapter or the base holds "
            "broken values (pass --no-safe-merge to write them anyway)."
        )


def run_plan(plan: Plan, folder: Path, options: EngineOptions) -> tuple[EngineStats, float]:
    """Write every shard of `plan` into `folder`; returns the counts and the seconds taken."""
    began = time.perf_counter()
    stats = Engine(plan, options).run(folder)
    return stats, time.perf_counter() - began
