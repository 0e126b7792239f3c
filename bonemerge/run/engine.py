"""Executing a `Plan`: every output tensor, in order, into shard files, in bounded memory.

The engine decides nothing about *what* to compute; it only moves bytes as fast as it can:

- tensors the plan leaves untouched go file-to-file (`copy_file_range`), never into Python;
- the others are computed in row chunks by `compute` (the one part that needs torch, imported
  when the first such tensor comes up, so that the copies before it, and everything the
  command did before, overlap torch's start-up);
- a writer thread writes finished chunks and a hasher thread checksums them, so the disk and
  the CPU work at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

from bonemerge.checkpoint import RangeReader, ShardWriter, TensorRef
from bonemerge.checkpoint.dtypes import rows_cols
from bonemerge.checkpoint.reader import expect_reads
from bonemerge.checkpoint.writer import METADATA, data_starts
from bonemerge.run.threads import Pool, Worker
from bonemerge.run.work import WRITE_BEHIND, Chunk, EngineOptions, EngineStats

if TYPE_CHECKING:
    import torch

    from bonemerge.checkpoint.layout import ShardPlan
    from bonemerge.codecs import Encoded
    from bonemerge.plan.build import Plan, Step
    from bonemerge.run.compute import Compute

COPY_LEAD = 1 << 30


MEMORY_PIECE = 8 << 20  # an untouched tensor's piece when it passes through memory


MEMORY_PIECES = 4


class Engine:
    """Produces every output tensor of `steps`, in order, as a stream of chunks."""

    def __init__(
        self, steps: Sequence[Step], options: EngineOptions, starts: Mapping[str, int] | None = None
    ) -> None:
        """`starts`: where each tensor's bytes start in its output file, so that chunks are laid
        out in memory as they will lie on disk (and can go there straight from memory)."""
        self.steps = list(steps)
        self.options = options
        self._starts = starts or {}
        self.reader = RangeReader()
        self._compute: Compute | None = None

    def stream(self) -> Iterator[Chunk]:
        """Every step's chunks in order: a plain copy as one chunk without data, the others
        computed (see `compute`), their reads running ahead while the caller consumes."""
        for step in self.steps:
            if step.is_copy or not step.nbytes:
                yield Chunk(step, 0, rows_cols(step.shape)[0], None)
            else:
                yield from self._computing().transform(step)

    def _computing(self) -> Compute:
        if self._compute is None:
            from bonemerge.run.compute import Compute

            self._compute = Compute(
                [s for s in self.steps if not s.is_copy and s.nbytes], self.options, self.reader, self._starts
            )
        return self._compute

    def encoded(self) -> dict[str, Encoded]:
        """What encoding did to each weight written in a quantized format so far."""
        if self._compute is None:
            return {}
        return {name: bands.encoded for name, bands in self._compute.encoded.items()}

    def close(self) -> None:
        if self._compute is not None:
            self._compute.close()
        self.reader.close()


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            from bonemerge.units import PROGRESS_DIVISOR

            self._bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=PROGRESS_DIVISOR,
                desc="writing",
                leave=False,
            )

    def update(self, size: int) -> None:
        if self._bar is not None:
            self._bar.update(size)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


ShardDone = Callable[[str, int, str], None]


ShardOpening = Callable[[str], None]


class _Shards:
    """The shard files: the writer thread fills them in plan order, reporting each finished
    (fsynced) one with its size and digest; the copy-ahead thread may open one earlier."""

    def __init__(
        self,
        shards: Sequence[ShardPlan],
        folder: Path,
        progress: _Progress,
        done: ShardDone,
        hasher: Worker,
        opening: ShardOpening = lambda file: None,
    ) -> None:
        self._shards = list(shards)
        self._folder = folder
        self._progress = progress
        self._done = done
        self._opening = opening
        self._hasher = hasher
        self._index = {e.name: i for i, shard in enumerate(self._shards) for e in shard.entries}
        self._open: dict[int, ShardWriter] = {}
        self._placing: dict[int, list[Callable[[], None]]] = {}  # waits for each shard's copies
        self._lock = threading.Lock()
        self._current = -1

    def holding(self, name: str) -> ShardWriter:
        """The writer of the shard that holds tensor `name`, created on first use (any thread)."""
        return self._writer(self._index[name])

    def _writer(self, index: int) -> ShardWriter:
        with self._lock:
            writer = self._open.get(index)
            if writer is None:
                shard = self._shards[index]
                writer = ShardWriter(
                    self._folder / shard.filename, shard.entries, METADATA, self._hasher.submit
                )
                self._open[index] = writer
            return writer

    def _through(self, index: int) -> ShardWriter:
        """Shard `index`'s writer, once every shard before it is closed (writer thread)."""
        while self._current < index:
            if self._current >= 0:
                self._close(self._current)
            self._current += 1
            if self._current not in self._open:
                self._opening(self._shards[self._current].filename)
        return self._writer(index)

    def _close(self, index: int) -> None:
        file = self._shards[index].filename
        writer = self._writer(index)
        for placed in self._placing.pop(index, []):
            placed()
        with self._lock:
            del self._open[index]
        writer.close(lambda size, digest: self._done(file, size, digest))

    def copied(self, step: Step, fd: int, ahead: _CopyAhead) -> None:
        """Step over an untouched tensor the copy-ahead thread places, without waiting for it:
        no byte the writer writes depends on it (its partial blocks are read from the source
        here, its checksum too). The shard is not closed before the copy is done."""
        index = self._index[step.name]
        self._through(index).skip(fd, step.source.offset if step.nbytes else 0, step.nbytes)
        if step.nbytes:
            self._placing.setdefault(index, []).append(lambda: ahead.wait(step))
        ahead.passed(step)
        self._progress.update(step.nbytes)

    def through_memory(self, step: Step, reader: RangeReader, buffers: Pool[memoryview]) -> None:
        """Write an untouched tensor by reading it into pooled buffers (an input that has no
        descriptor, such as a Hub shard read by ranges, or an output that must not be written
        ahead); each buffer goes back to the pool once written and hashed."""
        writer = self._through(self._index[step.name])
        if not step.nbytes:
            writer.skip(-1, 0, 0)
        for begin in range(0, step.nbytes, MEMORY_PIECE):
            buffer = buffers.take()
            view = buffer[: min(MEMORY_PIECE, step.nbytes - begin)]
            try:
                reader.readinto(step.source.path, step.source.offset + begin, view)
            except BaseException:
                buffers.give(buffer)
                raise
            writer.write(view, lambda b=buffer: buffers.give(b))
            self._progress.update(len(view))

    def write(self, name: str, data: torch.Tensor, release: Callable[[], None]) -> None:
        """Write a chunk; its buffer goes back to the pool once it is written and hashed."""
        import torch  # loaded already: `data` is a tensor

        try:
            view = memoryview(data.view(-1).view(torch.uint8).numpy())
            self._through(self._index[name]).write(view, release)
        except BaseException:
            release()
            raise
        self._progress.update(len(view))

    def finish(self) -> None:
        if self._shards:
            self._through(len(self._shards) - 1)
            self._close(len(self._shards) - 1)

    def abort(self) -> None:
        with self._lock:
            writers, self._open = list(self._open.values()), {}
        for writer in writers:
            writer.abort()


class _CopyAhead:
    """A thread that copies every untouched tensor into its shard ahead of the writer thread.

    Copies then run while chunks are computed instead of between them (a 1 GB embedding no
    longer holds up the writer for a second), and those before the first computed tensor run
    while torch is still loading. The thread stays at most COPY_LEAD bytes ahead of the
    writer, which hashes each copied tensor from its source when it gets there, in order,
    while those bytes are still likely to be in the page cache.
    """

    def __init__(self, copies: Sequence[Step], files: _Shards, reader: RangeReader) -> None:
        self._done: dict[str, Future[None]] = {step.name: Future() for step in copies}
        self._files = files
        self._reader = reader
        self._lead = 0
        self._room = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(list(copies),), name="bonemerge-copy-ahead", daemon=True
        )
        self._thread.start()

    def _run(self, copies: list[Step]) -> None:
        for step in copies:
            done = self._done[step.name]
            try:
                if not self._make_room(step.nbytes):
                    break
                fd = self._reader.fd(step.source.path)
                if not self._files.holding(step.name).place(
                    step.name, fd, step.source.offset, self._stop.is_set
                ):
                    break
            except BaseException as exc:  # handed to the writer thread when it reaches this tensor
                done.set_exception(exc)
                break
            done.set_result(None)
        for future in self._done.values():
            future.cancel()  # those never copied (stopped early): the writer gives up at the first

    def _make_room(self, size: int) -> bool:
        with self._room:
            while self._lead and self._lead + size > COPY_LEAD and not self._stop.is_set():
                self._room.wait(0.1)
            self._lead += size
        return not self._stop.is_set()

    def wait(self, step: Step) -> None:
        """Block until `step` is copied; re-raises the copy's failure."""
        self._done[step.name].result()

    def passed(self, step: Step) -> None:
        if step.name in self._done:
            with self._room:
                self._lead -= step.nbytes
                self._room.notify()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _read_runs(steps: Sequence[Step]) -> dict[Path, list[tuple[int, int]]]:
    """The byte runs the plan reads from each input file, in plan order: consecutive tensors
    that lie back to back and are read the same way (copied, computed, or loaded whole as a
    quantized weight's scales) make one run."""
    runs: dict[Path, list[tuple[int, int]]] = {}
    last: dict[str, tuple[Path, int, int]] = {}  # lane -> (file, where its run ends, run's index)
    for step in steps:
        companions = list(step.decode.companions.values()) if step.decode is not None else []
        lane = "copied" if step.is_copy else "computed"
        for kind, source in [(lane, step.source), *(("scales", part) for part in companions)]:
            if not isinstance(source, TensorRef) or not source.nbytes:
                continue
            spans = runs.setdefault(source.path, [])
            end = source.offset + source.nbytes
            path, until, index = last.get(kind, (None, -1, -1))
            if (path, until) == (source.path, source.offset):
                spans[index] = (spans[index][0], end)
            else:
                index = len(spans)
                spans.append((source.offset, end))
            last[kind] = (source.path, end, index)
    return runs


def write_plan(
    plan: Plan,
    folder: Path,
    options: EngineOptions,
    *,
    skip: Container[str] = (),
    shard_done: ShardDone = lambda name, size, digest: None,
    bounded: ShardOpening | None = None,
) -> EngineStats:
    """Write the shards of `plan` not named in `skip` into `folder`, each in one sequential pass
    (untouched tensors copied ahead by their own thread); writes and fsyncs run on a writer
    thread while the next chunks are computed, and `shard_done(file, size, digest)` is called
    as each shard becomes durable.

    With `bounded` (streaming to the Hub), nothing is written ahead: untouched tensors pass
    through memory in order, and `bounded(file)` is called on the writer thread before each
    shard file is created, so that it can hold the writing back until there is room."""
    shards = [shard for shard in plan.shards if shard.filename not in skip]
    steps = [plan.steps[e.name] for shard in shards for e in shard.entries]
    expect_reads(_read_runs(steps))
    starts = {name: at for shard in shards for name, at in data_starts(shard.entries, METADATA).items()}
    engine = Engine(steps, options, starts)
    progress = _Progress(sum(s.data_bytes for s in shards), options.progress)
    hasher = Worker("bonemerge-hasher", depth=WRITE_BEHIND + 2)
    files = _Shards(shards, folder, progress, shard_done, hasher, bounded or (lambda file: None))
    copies = [s for s in steps if s.is_copy and s.nbytes]
    ahead = _CopyAhead(copies, files, engine.reader) if bounded is None else None
    buffers: Pool[memoryview] = Pool(
        memoryview(bytearray(MEMORY_PIECE)) for _ in range(MEMORY_PIECES if ahead is None and copies else 0)
    )
    # no bound on the writer's queue: computed chunks are bounded by their buffers' pool, and
    # untouched tensors queue as a few bytes each, so the main thread goes on to the first
    # tensor to compute (starting torch's maths and the compiled kernels, and computing its
    # first chunks) while the untouched tensors before it are still being copied
    writer = Worker("bonemerge-writer", depth=0)
    stats = EngineStats()
    try:
        for chunk in engine.stream():
            step = chunk.step
            if chunk.data is None and ahead is None:
                writer.submit(lambda s=step: files.through_memory(s, engine.reader, buffers))
                stats.copied += 1
                stats.bytes_written += step.nbytes
                continue
            if chunk.data is None:
                fd = engine.reader.fd(step.source.path) if step.nbytes else -1
                writer.submit(lambda s=step, fd=fd: files.copied(s, fd, ahead))
                stats.copied += 1
                stats.bytes_written += step.nbytes
                continue
            writer.submit(lambda c=chunk: files.write(c.step.name, c.data, c.release), chunk.release)
            stats.bytes_written += chunk.data.numel() * chunk.data.element_size()
            if step.ops and all(op.inverse for op in step.ops):
                # values, where the output is codes (MXFP4's two a byte)
                stats.unmerged_elements += chunk.data.numel() * (step.values_per_code if step.encode else 1)
                stats.may_differ += chunk.may_differ
            if chunk.start == 0:
                stats.merged += bool(step.ops)
                stats.converted += not step.ops
        writer.submit(files.finish)
        writer.close()
        hasher.close()
        stats.encoded = engine.encoded()
    except BaseException:
        if ahead is not None:
            ahead.close()
        writer.close(discard=True)
        hasher.close(discard=True)
        files.abort()
        raise
    finally:
        if ahead is not None:
            ahead.close()
        progress.close()
        engine.close()
    return stats
