"""The maths side of the engine: a transformed tensor's row chunks, read, computed and checked.

Tensors stream in row chunks of about `CHUNK_ELEMENTS` elements: a read-ahead thread `pread`s
raw rows into a small pool of buffers and compute threads convert and transform them, so the
disk and the CPU work at once. The maths runs on sub-chunks of about `COMPUTE_ELEMENTS`
elements: small enough that conversion, block maths, rounding and the NaN/Inf check stay in
the CPU's caches instead of making four passes over main memory, large enough that torch's
fixed cost per call (a few microseconds, a dozen calls per sub-chunk, each taking the GIL)
stays small. The compiled pass of quantized weights cuts its own cache-sized tiles, so it
takes a chunk in one call.
Every buffer comes from a fixed pool, so memory does not grow with the model.

This is the only part of a run that needs torch; `engine` imports it when the first tensor to
compute comes up, so that everything before it runs while torch is still loading.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from bonemerge.checkpoint import ComputedTensor, RangeReader, Source, TensorRef, dtypes
from bonemerge.checkpoint.direct import UNIT
from bonemerge.checkpoint.dtypes import rows_cols
from bonemerge.checkpoint.tensors import read_grid_rows, read_rows, read_whole
from bonemerge.codecs import DENSE, Bands, Derived, Rounding
from bonemerge.errors import BonemergeError, MergeError
from bonemerge.methods import BlockOp, LowRankUpdate, RowMaths
from bonemerge.run.threads import Pool
from bonemerge.run.work import WRITE_BEHIND, Chunk, EngineOptions

if TYPE_CHECKING:
    from bonemerge.plan.build import Step


def _usable_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


CHUNK_ELEMENTS = 2 << 20
COMPUTE_ELEMENTS = 1 << 20
# torch's maths: each compute thread's torch calls open their own OpenMP team, so two threads
# keep a machine busy; more oversubscribe it (measured: three were slower than two here)
COMPUTE_THREADS = min(2, _usable_cores())
# compiled tiles (a quantized weight re-encoded on its own scales) run single-threaded, without
# the GIL, so they need a thread per core to keep up with a fast disk; past eight a single writer
# thread (about 2.4 GB/s here) is the limit, and each thread costs ~10 MB of buffers
COMPILED_THREADS = min(8, _usable_cores())
READ_AHEAD = 3
# chunks handed to the compute threads beyond one running on each: they wait in the pool's
# shared queue, so that a thread that finishes never waits for the main thread to hand it the
# next (two threads: both cores ~90 % busy instead of ~80 %); each costs two chunk buffers
QUEUED = 2
KEEP_LOADED = 4


def _row_multiple(step: Step) -> int:
    multiple = 1
    for stored in (step.decode, step.encode):
        if stored is not None:
            multiple = math.lcm(multiple, stored.codec.row_band(stored))
    for op in step.ops:
        multiple = math.lcm(multiple, op.block.method.row_multiple(op))
    return multiple


def _fit(step: Step, elements: int) -> int:
    """Rows holding about `elements` values, a multiple of the rows every op keeps together."""
    rows, cols = step.grid
    cols *= step.values_per_code
    multiple = _row_multiple(step)
    fit = max(1, elements // max(cols, 1) // multiple) * multiple
    return min(rows, fit) if rows else 0


def chunk_rows(step: Step) -> int:
    """Rows per I/O chunk: about CHUNK_ELEMENTS elements, whole row groups (Bat tiles, say).
    8-bit codes written back as 8-bit codes take twice as many, the bytes of a 16-bit chunk,
    so the buffers stay the size they were: half the chunks, and half the Python around
    each (about 0.2 ms of a compute thread per chunk, on caches the compiled pass left cold)."""
    recoded = (
        step.encode is not None
        and step.encode is step.decode
        and step.values_per_code == 1
        and dtypes.BITS[step.dtype] == 8
    )
    return _fit(step, CHUNK_ELEMENTS * (2 if recoded else 1))


def _spans(start: int, stop: int, size: int) -> Iterator[tuple[int, int]]:
    for begin in range(start, stop, size or 1):
        yield begin, min(stop, begin + size)


def _chunks(step: Step) -> Iterator[tuple[int, int]]:
    return _spans(0, step.grid[0], chunk_rows(step))


def compute_dtype(step: Step, precision: str) -> torch.dtype:
    if precision == "fp64" or step.dtype == "F64" or (precision == "auto" and step.dtype == "F32"):
        return torch.float64
    return torch.float32


@dataclass
class _Coded:
    """A step's storage in this run: how its rows are decoded and its result encoded, and
    whether the share of the update that survives encoding is measured (quantized outputs)."""

    decoder: Bands
    encoder: Bands

    #: whether the survival of the update is measured (the output is quantized)
    measured: bool

    def tally(self, sums: list[tuple[float, float]]) -> None:
        """Add a chunk's survival sums, sub-chunk by sub-chunk: called in chunk order (never from
        the compute threads, which finish in any order) so that the totals, and the survival
        the report prints, do not depend on how many threads there were or which came first."""
        for kept, update in sums:
            self.encoder.encoded.kept += kept
            self.encoder.encoded.update += update


def all_finite(values: torch.Tensor) -> bool:
    """NaN/Inf check at the cost of one sum: NaN and Inf survive summation, so a finite sum
    proves a finite chunk; only a non-finite sum (or an overflowing one) needs the full test."""
    total = values.sum(dtype=torch.float64 if values.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(values).all())


@dataclass(frozen=True)
class _Computing:
    """A chunk handed to a compute thread: rows [start, stop) land in `typed`, a view of the
    pooled `buffer`, once `job` is done."""

    start: int
    stop: int
    typed: torch.Tensor
    buffer: torch.Tensor
    job: Future[_Filled]


@dataclass(frozen=True)
class _Filled:
    """What computing a chunk found: for an unmerge, how many elements may differ from the
    original base; for a quantized output, each sub-chunk's survival sums, in order."""

    may_differ: int
    survival: list[tuple[float, float]]


@dataclass(frozen=True)
class _Read:
    step: Step
    start: int
    stop: int


class _ReadAhead:
    """A thread that `pread`s the raw rows of upcoming chunks into a pool of buffers."""

    def __init__(self, reader: RangeReader, reads: list[_Read], size: int, depth: int) -> None:
        self._reader = reader
        self._reads = reads
        self._pool: Pool[bytearray] = Pool(bytearray(size) for _ in range(depth if reads else 0))
        self._ready: list[tuple[_Read, bytearray] | BaseException] = []
        self._available = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bonemerge-read-ahead", daemon=True)
        self._thread.start()

    def _publish(self, item: tuple[_Read, bytearray] | BaseException) -> None:
        with self._available:
            self._ready.append(item)
            self._available.notify()

    def _run(self) -> None:
        try:
            for read in self._reads:
                buf = self._pool.take(self._stop)
                if buf is None:
                    return
                source = read.step.source
                _, cols = read.step.grid
                row_bytes = cols * dtypes.BITS[source.dtype] // 8
                size = (read.stop - read.start) * row_bytes
                self._reader.readinto(
                    source.path, source.offset + read.start * row_bytes, memoryview(buf)[:size]
                )
                self._publish((read, buf))
        except BaseException as exc:  # handed to the main thread, which re-raises it
            self._publish(exc)

    def next(self) -> tuple[_Read, bytearray]:
        with self._available:
            while not self._ready:
                self._available.wait()
            item = self._ready.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def release(self, buf: bytearray) -> None:
        self._pool.give(buf)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class Compute:
    """Computes the chunks of transformed steps (never plain copies), in plan order: a read-ahead
    thread `pread`s their raw rows while compute threads turn earlier rows into output bytes."""

    def __init__(
        self, steps: Sequence[Step], options: EngineOptions, reader: RangeReader, starts: Mapping[str, int]
    ) -> None:
        self.options = options
        self._starts = starts
        self.device = torch.device(options.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BonemergeError("--device cuda was asked for, but torch sees no CUDA device here.")
        self.reader = reader
        self._loaded: dict[Source, torch.Tensor] = {}
        self._loaded_lock = threading.Lock()
        transformed = [s for s in steps if s.nbytes]

        def chunk_bytes(step: Step, dtype: str, cols: int) -> int:
            return chunk_rows(step) * cols * dtypes.BITS[dtype] // 8

        worked = [s for s in transformed if s.ops or s.encode is not None]
        wide = any(compute_dtype(s, options.precision) == torch.float64 for s in worked)
        self._work_dtype = torch.float64 if wide else torch.float32
        self._work_size = max(
            (_fit(s, COMPUTE_ELEMENTS) * s.grid[1] * s.values_per_code for s in worked), default=0
        )
        self.rounding = Rounding(options.rounding, options.seed)
        #: the encoder of every step encoded so far, by name: what encoding did, and its scales
        self.encoded: dict[str, Bands] = {}
        #: companions (weight, role) as encoding left them, while they are being written
        self._derived: dict[tuple[str, str], torch.Tensor] = {}
        self._local = threading.local()
        on_cpu = self.device.type == "cpu"
        self._parallel = COMPUTE_THREADS if on_cpu else 1
        self._threads = ThreadPoolExecutor(self._parallel, thread_name_prefix="bonemerge-compute")
        # only a weight re-encoded on its own scales, rounding to nearest, can go through the
        # compiled tiles; other runs keep the buffers of two threads
        recoded = (
            on_cpu
            and options.rounding == "nearest"
            and any(s.encode is not None and s.encode is s.decode for s in worked)
        )
        self._compiled_parallel = COMPILED_THREADS if recoded else self._parallel
        self._compiled = ThreadPoolExecutor(self._compiled_parallel, thread_name_prefix="bonemerge-compiled")
        queued = max(self._parallel, self._compiled_parallel) + QUEUED
        self._torch_threads = torch.get_num_threads()
        if self._parallel > 1:
            torch.set_num_threads(1)
        out_bytes = max((chunk_bytes(s, s.dtype, s.written_grid[1]) for s in transformed), default=0)
        # a block more, to lay each chunk out as it lies in the file (`_laid_out`)
        self._out: Pool[torch.Tensor] = Pool(
            torch.empty(out_bytes + UNIT, dtype=torch.uint8) for _ in range(WRITE_BEHIND + queued)
        )
        raw_size = max(
            (
                chunk_bytes(s, s.source.dtype, s.grid[1])
                for s in transformed
                if isinstance(s.source, TensorRef)
            ),
            default=0,
        )
        reads = [
            _Read(step, start, stop)
            for step in transformed
            if isinstance(step.source, TensorRef)
            for start, stop in _chunks(step)
        ]
        # a buffer for each chunk queued, and READ_AHEAD more being read
        self._ahead = _ReadAhead(reader, reads, raw_size, queued + READ_AHEAD - 1)

    def close(self) -> None:
        self._ahead.close()
        self._threads.shutdown()
        self._compiled.shutdown()
        torch.set_num_threads(self._torch_threads)

    def _work_buffer(self, slot: int = 0) -> torch.Tensor:
        """This compute thread's own scratch buffers (slot 1 keeps the decoded rows while slot 0
        is merged, to measure what survives encoding), allocated on first use."""
        buffers = getattr(self._local, "work", None)
        if buffers is None:
            buffers = self._local.work = {}
        if slot not in buffers:
            buffers[slot] = torch.empty(self._work_size, dtype=self._work_dtype)
        return buffers[slot]

    def _coded(self, step: Step) -> _Coded:
        """The step's decoder and encoder: one object when it is re-encoded on its own scales."""

        def prepare(stored):
            if stored is None:
                return DENSE.prepare(None, self.load, self.rounding, self.device)
            return stored.codec.prepare(stored, self.load, self.rounding, self.device)

        decoder = prepare(step.decode)
        encoder = decoder if step.encode is not None and step.encode is step.decode else prepare(step.encode)
        return _Coded(decoder, encoder, step.encode is not None)

    def _scratch(self, like: torch.Tensor) -> list[torch.Tensor]:
        """This compute thread's two integer buffers for `may_differ`, as wide as `like`'s
        elements and as long as a sub-chunk, allocated on first use."""
        dtype = _SAME_SIZE_INT[torch.finfo(like.dtype).bits]
        buffers = getattr(self._local, "scratch", {})
        self._local.scratch = buffers
        if dtype not in buffers or buffers[dtype][0].numel() < like.numel():
            size = max(self._work_size, like.numel())
            buffers[dtype] = [torch.empty(size, dtype=dtype), torch.empty(size, dtype=dtype)]
        return buffers[dtype]

    def transform(self, step: Step) -> Iterator[Chunk]:
        """Chunks of one step, computed on the compute threads, yielded in order."""
        ahead = self._ahead
        compute = compute_dtype(step, self.options.precision)
        prepared = [(self._prepare(op, step, compute), op.inverse) for op in step.ops]
        coded = self._coded(step)
        self._first_pass(step, prepared, compute, coded)
        out_dtype = dtypes.to_torch(step.dtype)
        _, cols = step.written_grid
        if self._compiled_alone(prepared, compute, coded, chunk_rows(step)):
            # the compiled pass cuts its own cache-sized tiles: a chunk is one call
            threads, parallel, span = self._compiled, self._compiled_parallel, chunk_rows(step)
        else:
            threads, parallel, span = self._threads, self._parallel, _fit(step, COMPUTE_ELEMENTS)
        pending: deque[_Computing] = deque()
        try:
            for start, stop in _chunks(step):
                rows, buf = self._rows(step, start, stop, ahead)
                out = self._out.take()
                typed = self._laid_out(step, out, start, stop).view(out_dtype).view(-1, cols)
                job = threads.submit(
                    self._fill, step, prepared, compute, rows, typed, start, span, buf, ahead, coded
                )
                pending.append(_Computing(start, stop, typed, out, job))
                if len(pending) >= parallel + QUEUED:
                    yield self._finished(step, pending.popleft(), coded)
            while pending:
                yield self._finished(step, pending.popleft(), coded)
            if step.encode is not None:
                coded.encoder.finish()
                self.encoded[step.name] = coded.encoder
        finally:
            for item in pending:
                item.job.exception()
                self._out.give(item.buffer)
            if isinstance(step.source, ComputedTensor):
                step.source.release()
            if isinstance(step.source, Derived):
                self._derived.pop((step.source.weight.name, step.source.role), None)

    def _laid_out(self, step: Step, out: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Where in `out` rows [start, stop) of `step` are computed: at an address equal to
        their offset in the output file modulo the disk's block (`direct.UNIT`), so that the
        writer hands them to the disk from where they lie, not through a copy; from the
        buffer's start where that offset is unknown or not a multiple of the element's size."""
        bits = step.written_grid[1] * dtypes.BITS[step.dtype]
        size = (stop - start) * bits // 8
        at = self._starts.get(step.name)
        if at is None:
            return out[:size]
        shift = (at + start * bits // 8 - out.data_ptr()) % UNIT
        return out[shift : shift + size] if shift % max(1, dtypes.BITS[step.dtype] // 8) == 0 else out[:size]

    def _finished(self, step: Step, item: _Computing, coded: _Coded) -> Chunk:
        try:
            filled = item.job.result()
        except BaseException:
            self._out.give(item.buffer)
            raise
        coded.tally(filled.survival)
        return Chunk(
            step, item.start, item.stop, item.typed, lambda: self._out.give(item.buffer), filled.may_differ
        )

    def _fill(
        self,
        step: Step,
        prepared: list[tuple[RowMaths, bool]],
        compute: torch.dtype,
        rows: torch.Tensor,
        typed: torch.Tensor,
        start: int,
        span: int,
        buf: bytearray | None,
        ahead: _ReadAhead,
        coded: _Coded,
    ) -> _Filled:
        """Compute one chunk into `typed`, `span` rows at a time (on a compute thread)."""
        check = self.options.safe_merge and step.dtype in dtypes.COMPUTABLE
        inverting = bool(prepared) and all(inverse for _, inverse in prepared)
        differ = 0
        survival: list[tuple[float, float]] = []
        # A finite sum of squares of the fp32 result bounds every element far below the bf16
        # limit, at a third of the cost of summing the bf16 output; other dtypes check the output.
        squares = check and step.dtype == "BF16" and compute == torch.float32 and self.device.type == "cpu"
        try:
            for begin, end in _spans(0, typed.shape[0], span):
                target = typed[begin:end]
                row0 = start + begin
                finite = False
                tiles = self._tiles(prepared, compute, coded, end - begin)
                if tiles is not None:
                    sums = self._fill_tiles(step, rows[begin:end], prepared, coded, target, row0, tiles)
                    survival.append(sums)
                elif prepared or coded.measured:
                    work, before = self._compute(rows[begin:end], prepared, compute, row0, coded)
                    if not check and self.options.safe_merge and not all_finite(work):
                        _non_finite(step, row0, start + end)
                    if before is None:
                        coded.encoder.encode(work, target, row0)
                    else:
                        survival.append(coded.encoder.encode_measured(work, before, target, row0))
                    flat = work.view(-1)
                    finite = squares and bool(torch.isfinite(torch.dot(flat, flat)))
                else:
                    coded.decoder.decode(rows[begin:end], target, row0)
                if check and not finite and not all_finite(target):
                    _non_finite(step, start + begin, start + end)
                if inverting:
                    # a codec of integer codes (MXFP4) counts them; float bits tell the rest
                    codes = coded.encoder.may_differ(rows[begin:end], target, row0)
                    differ += (
                        may_differ(rows[begin:end], target, self._scratch(target)) if codes is None else codes
                    )
        finally:
            if buf is not None:
                ahead.release(buf)
        return _Filled(differ, survival)

    def _tiles(
        self, prepared: list[tuple[RowMaths, bool]], compute: torch.dtype, coded: _Coded, rows: int
    ) -> list[tuple[int, int, int, int]] | None:
        """The cache-sized tiles a quantized weight's sub-chunk is merged in, where its codec and
        every block can work on them (fp32 on the CPU, re-encoded on its own scales); else None."""
        if not (
            coded.measured
            and coded.encoder is coded.decoder
            and compute == torch.float32
            and self.device.type == "cpu"
            and all(block.column_tiles for block, _ in prepared)
        ):
            return None
        return coded.decoder.tiles(rows)

    def _compiled_alone(
        self, prepared: list[tuple[RowMaths, bool]], compute: torch.dtype, coded: _Coded, rows: int
    ) -> bool:
        """Whether compiled code alone merges the step's sub-chunks of `rows` rows: one low-rank
        update, whose tile products the codec computes itself. Those chunks may go to a thread
        per core; any torch call (a product, an addition) would open an OpenMP team in each
        of them, and too many threads would spin on the machine's cores."""
        tiles = self._tiles(prepared, compute, coded, rows)
        update = _low_rank(prepared)
        return tiles is not None and update is not None and coded.encoder.takes_low_rank(update, tiles)

    def _fill_tiles(
        self,
        step: Step,
        rows: torch.Tensor,
        prepared: list[tuple[RowMaths, bool]],
        coded: _Coded,
        target: torch.Tensor,
        row0: int,
        tiles: list[tuple[int, int, int, int]],
    ) -> tuple[float, float]:
        """Decode, merge, check and encode one tile at a time, so that a tile's values stay in
        the CPU's cache from its codes to its codes: the whole rows of a wide weight would
        make each of those passes a trip through main memory. One adapter's update goes into
        the codec's fused pass: with its factors, for every tile in one call (`merge_low_rank`),
        else tile by tile given torch's product (`merge_tile`); several are added one after
        another."""
        factors = _low_rank(prepared)
        if factors is not None and coded.encoder.takes_low_rank(factors, tiles):
            kept, update, finite = coded.encoder.merge_low_rank(rows, factors, target, row0, tiles)
            if self.options.safe_merge and not finite:
                _non_finite(step, row0, row0 + rows.shape[0])
            return kept, update
        kept = update = 0.0
        for r0, r1, c0, c1 in tiles:
            shape = (r1 - r0, c1 - c0)
            if len(prepared) == 1:
                product, alpha = _block_update(prepared[0], row0 + r0, c0, shape)
                k, u, finite = coded.encoder.merge_tile(
                    rows[r0:r1], product, alpha, target[r0:r1], row0 + r0, c0
                )
            else:
                count = shape[0] * shape[1]
                work = self._work_buffer().view(torch.float32)[:count].view(shape)
                before = self._work_buffer(1).view(torch.float32)[:count].view(shape)
                coded.decoder.decode_tile(rows[r0:r1], before, row0 + r0, c0)
                work.copy_(before)
                for maths in prepared:
                    product, alpha = _block_update(maths, row0 + r0, c0, shape)
                    work.add_(product, alpha=alpha)
                finite = all_finite(work)
                if finite or not self.options.safe_merge:
                    k, u = coded.encoder.encode_tile(work, before, target[r0:r1], row0 + r0, c0)
            if self.options.safe_merge and not finite:
                _non_finite(step, row0, row0 + rows.shape[0])
            kept, update = kept + k, update + u
        return kept, update

    def _prepare(self, op: BlockOp, step: Step, compute: torch.dtype) -> RowMaths:
        def load(part: str) -> torch.Tensor:
            return self.load(op.block.parts[part])

        return op.block.method.prepare(op, load, step.shape, compute, self.device, self.options.precision)

    def _first_pass(
        self, step: Step, prepared: list[tuple[RowMaths, bool]], compute: torch.dtype, coded: _Coded
    ) -> None:
        """Stream the tensor once for every op whose maths needs a whole-tensor statistic
        (DoRA's column norms), applying the ops before it, so that it sees what it will merge
        into; and once more, every op applied, for an encoder that must see the merged values
        before it encodes any (a scale shared by the whole weight)."""
        for index, (block, _) in enumerate(prepared):
            if block.needs_pass:
                self._observe(step, prepared[:index], compute, coded.decoder, block.observe)
                block.finish()
        if coded.measured and coded.encoder.needs_pass:
            self._observe(step, prepared, compute, coded.decoder, coded.encoder.observe)
            coded.encoder = coded.encoder.observed()

    def _observe(
        self,
        step: Step,
        prepared: list[tuple[RowMaths, bool]],
        compute: torch.dtype,
        decoder: Bands,
        observe: Callable[[torch.Tensor, int], None],
    ) -> None:
        """Hand `observe` every chunk of the tensor's values with the ops `prepared` applied."""
        for start, stop in _chunks(step):
            rows = read_grid_rows(self.reader, step.source, step.grid, start, stop)
            work = self._decoded(rows, compute, start, decoder)
            for maths, inverse in prepared:
                (maths.unmerge if inverse else maths.merge)(work, start)
            observe(work, start)

    def _decoded(self, rows: torch.Tensor, compute: torch.dtype, start: int, decoder: Bands) -> torch.Tensor:
        """Rows read whole (not through the read-ahead) as values in the compute dtype."""
        work = torch.empty(_values_shape(rows, decoder), dtype=compute, device=self.device)
        decoder.decode(rows.to(self.device), work, start)
        return work

    def load(self, source: Source) -> torch.Tensor:
        """A whole (small) tensor such as an adapter block, in its own dtype. The last few
        stay loaded: one MoE parameter's lora_A and lora_B serve each of its per-expert tensors."""
        with self._loaded_lock:
            found = self._loaded.pop(source, None)
            if found is None:
                found = read_whole(self.reader, source)
            self._loaded[source] = found
            while len(self._loaded) > KEEP_LOADED:
                del self._loaded[next(iter(self._loaded))]
            return found

    def derived(self, source: Derived) -> torch.Tensor:
        """A companion (scales) of an encoded weight, as encoding left it. A weight planned
        after its companion (or in a shard reused by --resume) is encoded once more here,
        without writing it, in the same sub-chunks, so that its scales come out the same."""
        key = (source.weight.name, source.role)  # made once, then read chunk by chunk
        if key in self._derived:
            return self._derived[key]
        encoder = self.encoded.get(source.weight.name)
        if encoder is None:
            step = source.weight
            compute = compute_dtype(step, self.options.precision)
            prepared = [(self._prepare(op, step, compute), op.inverse) for op in step.ops]
            coded = self._coded(step)
            self._first_pass(step, prepared, compute, coded)
            for start, stop in _chunks(step):
                rows = read_grid_rows(self.reader, step.source, step.grid, start, stop)
                for begin, end in _spans(0, stop - start, _fit(step, COMPUTE_ELEMENTS)):
                    work = self._decoded(rows[begin:end], compute, start + begin, coded.decoder)
                    for maths, inverse in prepared:
                        (maths.unmerge if inverse else maths.merge)(work, start + begin)
                    codes = torch.empty(
                        rows[begin:end].shape, dtype=dtypes.to_torch(step.dtype), device=self.device
                    )
                    coded.encoder.encode(work, codes, start + begin)
            encoder = self.encoded[step.name] = coded.encoder
        found = self._derived[key] = encoder.derived()[source.role]
        return found

    def _rows(
        self, step: Step, start: int, stop: int, ahead: _ReadAhead
    ) -> tuple[torch.Tensor, bytearray | None]:
        source = step.source
        rows, cols = step.grid if isinstance(source, TensorRef) else rows_cols(source.shape)
        if isinstance(source, Derived):
            return self.derived(source).reshape(rows, cols)[start:stop], None
        if not isinstance(source, TensorRef):
            return read_rows(self.reader, source, start, stop), None
        read, buf = ahead.next()
        assert (read.step, read.start, read.stop) == (step, start, stop), "read-ahead out of order"
        raw = torch.frombuffer(buf, dtype=dtypes.to_torch(source.dtype), count=(stop - start) * cols)
        return raw.view(stop - start, cols), buf

    def _compute(
        self,
        rows: torch.Tensor,
        prepared: list[tuple[RowMaths, bool]],
        dtype: torch.dtype,
        start: int,
        coded: _Coded,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows decoded into the compute dtype with every block applied, in order, in place;
        and, when the survival of the update is measured, a copy of them before the blocks."""
        if self.device.type == "cpu":
            shape = _values_shape(rows, coded.decoder)
            work = self._work_buffer().view(dtype)[: math.prod(shape)].view(shape)
            coded.decoder.decode(rows, work, start)
        else:
            work = torch.empty(_values_shape(rows, coded.decoder), dtype=dtype, device=self.device)
            coded.decoder.decode(rows.to(self.device), work, start)
        before = None
        if coded.measured:
            if self.device.type == "cpu":
                before = self._work_buffer(1).view(dtype)[: work.numel()].view(work.shape)
                before.copy_(work)
            else:
                before = work.clone()
        for block, inverse in prepared:
            if inverse:
                block.unmerge(work, start)
            else:
                block.merge(work, start)
        return work, before


def _low_rank(prepared: list[tuple[RowMaths, bool]]) -> LowRankUpdate | None:
    """The factors of the update, where there is one update and it is a low-rank product."""
    if len(prepared) != 1:
        return None
    maths, inverse = prepared[0]
    return maths.low_rank_update(-1 if inverse else 1)


def _block_update(
    maths: tuple[RowMaths, bool], row0: int, col0: int, shape: tuple[int, int]
) -> tuple[torch.Tensor, float]:
    """A block's update (or its undoing) of one tile, as `columns_update` gives it."""
    block, inverse = maths
    return block.columns_update(row0, shape[0], col0, shape[1], -1 if inverse else 1)


def _values_shape(rows: torch.Tensor, decoder: Bands) -> tuple[int, int]:
    """The shape of the values of stored `rows` (MXFP4 holds two in a byte)."""
    return rows.shape[0], rows.shape[1] * decoder.values_per_code


_SAME_SIZE_INT = {8: torch.int8, 16: torch.int16, 32: torch.int32, 64: torch.int64}


def _ulp_exponents(values: torch.Tensor) -> torch.Tensor:
    """log2 of the spacing of the floats of `values`' dtype around each value (subnormals and
    zero: the smallest spacing), as int16 (-1074..971 for fp64), read from the exponent bits:
    shifts and masks, which cost a tenth of `frexp`."""
    info = torch.finfo(values.dtype)
    digits = round(-math.log2(info.eps))
    width = info.bits - 1 - digits
    field = (values.view(_SAME_SIZE_INT[info.bits]) >> digits) & ((1 << width) - 1)
    if field.dtype != torch.int16:
        field = field.to(torch.int16)
    return field.clamp_(min=1).sub_((1 << (width - 1)) - 1 + digits)


def may_differ(
    merged: torch.Tensor, restored: torch.Tensor, scratch: list[torch.Tensor] | None = None
) -> int:
    """How many elements of an unmerge may not equal the original base, found while streaming:
    the merge rounded each merged value m to a step ulp(m), so an element comes back exactly
    when that step is no coarser than the one of its restored value r (|error| <= ulp(m)/2 <=
    ulp(r)/2) and may be off by up to about ulp(m) where it is coarser, as for a small base
    value that a larger update lifted into a higher binade.

    When both have one dtype (the usual case) this compares the exponent bits in place in
    `scratch` (two integer buffers of at least `merged.numel()` elements, reused), summing per
    row first: a few vectorised integer passes, about 1 ms of CPU per million elements (fresh
    buffers and `frexp` cost several times more)."""
    if merged.dtype != restored.dtype or scratch is None:
        lower = _ulp_exponents(restored).sub_(_ulp_exponents(merged)).bitwise_right_shift_(15)
        return -int(lower.sum(dtype=torch.int64))
    info = torch.finfo(merged.dtype)
    digits = round(-math.log2(info.eps))
    exponent = ((1 << (info.bits - 1)) - 1) & ~((1 << digits) - 1)
    fields = []
    for values, buffer in zip((merged, restored), scratch, strict=True):
        bits = values.reshape(values.shape[0] if values.dim() else 1, -1).view(buffer.dtype)
        field = buffer[: bits.numel()].view(bits.shape)
        # max(exponent field, 1), still in place: zero and subnormals share the smallest step
        torch.bitwise_and(bits, exponent | ((1 << digits) - 1), out=field).clamp_(min=1 << digits)
        fields.append(field.bitwise_and_(exponent))
    lower = fields[1].sub_(fields[0]).bitwise_right_shift_(info.bits - 1)  # -1 where m's is coarser
    if lower.shape[1] < 1 << 15 and lower.dtype != torch.int8:
        return -int(lower.sum(dim=1, dtype=lower.dtype).sum(dtype=torch.int64))
    return -int(lower.sum(dtype=torch.int64))


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
