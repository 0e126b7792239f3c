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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bonemerge import maths
from bonemerge.checkpoint import MemoryTensor, RangeReader, ShardWriter, TensorRef, dtypes
from bonemerge.checkpoint.writer import METADATA
from bonemerge.errors import BonemergeError, MergeError

if TYPE_CHECKING:
    from bonemerge.plan import Plan, Step

CHUNK_ELEMENTS = 4 << 20
READ_AHEAD = 3


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


@dataclass
class Chunk:
    """Rows [start, stop) of one output tensor, ready in the output dtype.

    `data` is None when the step is a plain copy: its bytes are `step.source` as they are,
    for the consumer to move file-to-file. `data` is only valid until the next chunk.
    """

    step: Step
    start: int
    stop: int
    data: torch.Tensor | None


class Engine:
    """Produces every output tensor of `steps`, in order, as a stream of chunks."""

    def __init__(self, steps: Sequence[Step], options: EngineOptions) -> None:
        self.steps = list(steps)
        self.options = options
        try:
            self.device = torch.device(options.device)
        except RuntimeError:
            raise BonemergeError(f"unknown device {options.device!r}; use cpu, cuda or cuda:N.") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BonemergeError("--device cuda was asked for, but torch sees no CUDA device here.")
        self.reader = RangeReader()
        transformed = [s for s in self.steps if not s.is_copy and s.nbytes]

        def chunk_bytes(step: Step, dtype: str) -> int:
            return chunk_rows(step) * _rows_cols(step.shape)[1] * dtypes.BITS[dtype] // 8

        wide = any(s.ops and compute_dtype(s, options.precision) == torch.float64 for s in transformed)
        elements = max((chunk_rows(s) * _rows_cols(s.shape)[1] for s in transformed if s.ops), default=0)
        self._work = torch.empty(elements, dtype=torch.float64 if wide else torch.float32)
        self._out = torch.empty(
            max((chunk_bytes(s, s.dtype) for s in transformed), default=0), dtype=torch.uint8
        )
        self._raw_size = max(
            (chunk_bytes(s, s.source.dtype) for s in transformed if isinstance(s.source, TensorRef)),
            default=0,
        )

    def stream(self) -> Iterator[Chunk]:
        """Every step's chunks in order; the read-ahead thread runs while the caller consumes."""
        reads = [
            _Read(step, start, stop)
            for step in self.steps
            if step.nbytes and not step.is_copy and isinstance(step.source, TensorRef)
            for start, stop in _chunks(step)
        ]
        ahead = _ReadAhead(self.reader, reads, self._raw_size)
        try:
            for step in self.steps:
                if step.is_copy or not step.nbytes:
                    yield Chunk(step, 0, _rows_cols(step.shape)[0], None)
                else:
                    yield from self._transform(step, ahead)
        finally:
            ahead.close()

    def close(self) -> None:
        self.reader.close()

    def _transform(self, step: Step, ahead: _ReadAhead) -> Iterator[Chunk]:
        compute = compute_dtype(step, self.options.precision)
        prepared = [
            (maths.prepare(op.variant, self.load(op.block), step.shape, compute, self.device), op.inverse)
            for op in step.ops
        ]
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
                _non_finite(step, start, stop)
            yield Chunk(step, start, stop, typed)

    def load(self, source: TensorRef | MemoryTensor) -> torch.Tensor:
        """A whole (small) tensor such as an adapter block, in its own dtype."""
        if isinstance(source, MemoryTensor):
            return source.tensor
        raw = self.reader.read(source.path, source.offset, source.nbytes)
        if not raw:
            return torch.empty(source.shape, dtype=dtypes.to_torch(source.dtype))
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
        raw = torch.frombuffer(buf, dtype=dtypes.to_torch(source.dtype), count=(stop - start) * cols)
        return raw.view(stop - start, cols), buf

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


def _non_finite(step: Step, start: int, stop: int) -> None:
    if step.ops:
        verb = "unmerging" if step.ops[0].inverse else "merging"
        what = f"{verb} {', '.join(op.adapter for op in step.ops)} into {step.name}"
    else:
        what = f"converting {step.name} to {dtypes.TORCH_NAME[step.dtype]}"
    raise MergeError(
        f"{what} gave NaN or Inf in rows {start}-{stop - 1}; the adapter or the input holds "
        "broken values (pass --no-safe-merge to write them anyway)."
    )


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


def write_plan(plan: Plan, folder: Path, options: EngineOptions) -> EngineStats:
    """Write every shard of `plan` into `folder`, each in one sequential pass."""
    steps = [plan.steps[e.name] for shard in plan.shards for e in shard.entries]
    shard_index = {e.name: i for i, shard in enumerate(plan.shards) for e in shard.entries}
    engine = Engine(steps, options)
    progress = _Progress(plan.total_bytes, options.progress)
    stats = EngineStats()
    writer: ShardWriter | None = None
    opened = -1

    def open_through(index: int) -> ShardWriter | None:
        nonlocal writer, opened
        while opened < index:
            if writer is not None:
                writer.close()
            opened += 1
            writer = ShardWriter(folder / plan.shards[opened].filename, plan.shards[opened].entries, METADATA)
        return writer

    try:
        for chunk in engine.stream():
            step = chunk.step
            out = open_through(shard_index[step.name])
            if chunk.data is None:
                out.copy_from(engine.reader.fd(step.source.path), step.source.offset, step.nbytes)
                size = step.nbytes
                stats.copied += 1
            else:
                view = memoryview(chunk.data.view(-1).view(torch.uint8).numpy())
                out.write(view)
                size = len(view)
                if chunk.start == 0:
                    stats.merged += bool(step.ops)
                    stats.converted += not step.ops
            stats.bytes_written += size
            progress.update(size)
        open_through(len(plan.shards) - 1)
        if writer is not None:
            writer.close()
            writer = None
    finally:
        if writer is not None:
            writer.abort()
        progress.close()
        engine.close()
    return stats
