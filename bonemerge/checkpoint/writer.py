"""Writing a safetensors shard in one sequential pass, header first.

The header is fixed before any data is written because the plan knows every tensor's name,
dtype and shape up front. The writer then accepts bytes strictly in header order and counts
them, so a bug that writes a tensor short, long or out of order fails loudly instead of
producing a file whose header lies. Untouched tensors go file-to-file with
`copy_file_range`, never passing through Python memory, and may be placed ahead of the
sequential writing, from another thread, at the offsets the header gives them.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bonemerge.checkpoint.digest import Digest, hash_range
from bonemerge.checkpoint.digest import new as new_digest
from bonemerge.checkpoint.direct import BlockStream, write_fully
from bonemerge.errors import OutputError

_ALIGN = 8
METADATA = {"format": "pt"}
FLUSH_EVERY = 16 << 20
WRITE_PIECE = 512 << 10
_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4
_DROP_BEHIND = 8  # ranges of FLUSH_EVERY bytes kept in the page cache before being dropped


def _sync_file_range() -> object | None:
    """libc's sync_file_range, to start writeback early without waiting; None off Linux."""
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return call


_START_WRITEBACK = _sync_file_range()
_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}
_COPY_PIECE = 64 << 20
_COPY_BUFFER = 8 << 20


@dataclass(frozen=True)
class Entry:
    """One output tensor as the header will describe it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def encode_header(entries: Sequence[Entry], metadata: dict[str, str]) -> bytes:
    """Length prefix plus JSON header, space-padded so the data buffer starts 8-aligned."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % _ALIGN)
    return len(text).to_bytes(8, "little") + text


def data_starts(entries: Sequence[Entry], metadata: dict[str, str]) -> dict[str, int]:
    """Where each tensor's bytes start in the file `ShardWriter` writes."""
    starts = itertools.accumulate((e.nbytes for e in entries), initial=len(encode_header(entries, metadata)))
    return {entry.name: start for entry, start in zip(entries, starts, strict=False)}


def _ended_early(path: Path) -> OutputError:
    return OutputError(
        f"an input file ended early while it was copied into {path}; it was changed or truncated "
        "while bonemerge ran."
    )


def hash_source(digest: Digest, fd: int, offset: int, size: int) -> None:
    """Feed `size` bytes of `fd` from `offset` into `digest`; a short file changed under us."""
    try:
        hash_range(digest, fd, offset, size)
    except EOFError:
        raise OutputError(
            "an input file ended early while it was copied; it changed while bonemerge ran."
        ) from None


def output_failure(path: Path, exc: OSError) -> OutputError:
    """One sentence for a failed write, with the fix for the usual causes."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = "free some space or choose another --output location"
    else:
        hint = "check the output location"
    return OutputError(f"cannot write {path}: {exc.strerror or exc}; {hint}.")


def write_all(fd: int, view: memoryview, at: int, path: Path) -> None:
    """Write all of `view` at `at` in pieces of at most WRITE_PIECE bytes: measured on ext4,
    single writes of several MB through the page cache spend 3-8x more kernel time than the
    same bytes in 512 KB pieces."""
    write_fully(fd, view, at, lambda exc: output_failure(path, exc), WRITE_PIECE)


Job = Callable[[], None]
Feed = Callable[[Job, "Job | None"], None]


def run_now(job: Job, on_skip: Job | None = None) -> None:
    job()


class ShardWriter:
    """Streams one shard: `write` and `skip` must account for each tensor's bytes in order
    (`skip` steps over an untouched tensor `place` copied, possibly earlier and from another
    thread).

    Bytes go to the disk with O_DIRECT where the file system allows it (`direct.py`: no page
    cache to fill, write back and reclaim), else through the page cache with writeback started
    early and written ranges dropped.

    Every byte written is also hashed (`digest.py`), so that `close` can say exactly what the
    file holds (recorded in the output's manifest, checked by `verify --checksums` and by
    `--resume` before it trusts a shard an interrupted run finished). Hashing is handed to
    `feed` in order, which may run it on another thread: `feed(job, on_skip)` must run the
    jobs in order, or `on_skip` in place of a job it drops.
    """

    def __init__(
        self, path: Path, entries: Sequence[Entry], metadata: dict[str, str], feed: Feed = run_now
    ) -> None:
        self.path = path
        self._hash = new_digest()
        self._feed = feed
        self._sizes = [e.nbytes for e in entries]
        self._names = [e.name for e in entries]
        self._index_of = {e.name: i for i, e in enumerate(entries)}
        self._index = 0
        self._left = self._sizes[0] if self._sizes else 0
        self._copy_file_range = hasattr(os, "copy_file_range")
        self._flushed = 0
        self._in_flight: list[tuple[int, int]] = []
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise output_failure(path, exc) from None
        self._stream = BlockStream(path, self._fd, self._through_cache, lambda exc: output_failure(path, exc))
        header = memoryview(encode_header(entries, metadata))
        self._starts = list(itertools.accumulate(self._sizes, initial=len(header)))
        self._stream.append(header)
        self._feed(lambda: self._hash.update(header), None)
        self._skip_empty()

    @property
    def stream(self) -> BlockStream:
        """How the shard's bytes are written (for the tests that check which way)."""
        return self._stream

    def _skip_empty(self) -> None:
        while self._left == 0 and self._index < len(self._sizes) - 1:
            self._index += 1
            self._left = self._sizes[self._index]

    def _advance(self, size: int) -> None:
        if size > self._left:
            current = self._names[self._index] if self._index < len(self._names) else "<end>"
            raise AssertionError(f"{self.path}: {size} bytes written past the end of {current}")
        self._left -= size
        self._skip_empty()

    def _through_cache(self, view: memoryview, at: int) -> None:
        """Write `view` at `at` through the page cache, then hand what was written so far to the
        disk, so the final fsync has little left to wait for and writing overlaps with the rest
        of the work (cp + sync cannot do that).

        Older ranges are then waited for and dropped from the page cache: the output of a 70B
        merge is larger than memory, and left cached it would evict the input still to be read.
        Waiting also bounds how far writing can run ahead of the disk.
        """
        write_all(self._fd, view, at, self.path)
        written = at + len(view)
        if _START_WRITEBACK is None or written - self._flushed < FLUSH_EVERY:
            return
        _START_WRITEBACK(self._fd, self._flushed, written - self._flushed, _SYNC_FILE_RANGE_WRITE)
        self._in_flight.append((self._flushed, written - self._flushed))
        self._flushed = written
        if len(self._in_flight) > _DROP_BEHIND:
            offset, size = self._in_flight.pop(0)
            wait = _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER
            _START_WRITEBACK(self._fd, offset, size, wait)
            os.posix_fadvise(self._fd, offset, size, os.POSIX_FADV_DONTNEED)

    @property
    def current(self) -> str:
        """Name of the tensor whose bytes are expected next."""
        return self._names[self._index]

    def write(self, view: memoryview, release: Job | None = None) -> None:
        """Append `view`; `release` runs once its bytes are written and hashed (on the thread
        that finishes last). Where this raises, it has not run and will not."""
        self._advance(len(view))
        written = self._stream.append(view)
        if release is not None and written is not None:
            given = release
            release = lambda: written.add_done_callback(lambda _: given())  # noqa: E731

        def digest() -> None:
            self._hash.update(view)
            if release is not None:
                release()

        self._feed(digest, release)

    def place(self, name: str, src_fd: int, offset: int, stop: Callable[[], bool] = lambda: False) -> bool:
        """Copy tensor `name`'s bytes from `src_fd` at `offset` to where the header puts them,
        ahead of the sequential writing and safe to call from another thread; `skip` steps
        over them later. Writing direct, only the whole blocks inside the tensor are copied
        here (its partial blocks come with the stream's). Copies in pieces, returning False
        without finishing once `stop()`."""
        index = self._index_of[name]
        start, end = self._stream.interior(self._starts[index], self._sizes[index])
        offset += start - self._starts[index]
        for begin in range(0, max(0, end - start), _COPY_PIECE):
            if stop():
                return False
            piece = min(_COPY_PIECE, end - start - begin)
            try:
                if self._stream.unit > 1:
                    self._stream.copy_blocks(src_fd, offset + begin, start + begin, piece)
                    continue
                self._copy_range(src_fd, offset + begin, start + begin, piece)
            except EOFError:
                raise _ended_early(self.path) from None
            if _START_WRITEBACK is not None:
                _START_WRITEBACK(self._fd, start + begin, piece, _SYNC_FILE_RANGE_WRITE)
        return True

    def _copy_range(self, src_fd: int, offset: int, at: int, size: int) -> None:
        """`size` bytes from `src_fd` at `offset` to this file at `at`: in the kernel where it
        can, else through a buffer."""
        while size and self._copy_file_range:
            try:
                got = os.copy_file_range(src_fd, self._fd, size, offset, at)
            except OSError as exc:
                if exc.errno not in _FALLBACK_ERRNOS:
                    raise output_failure(self.path, exc) from None
                got = 0
            if got == 0:
                self._copy_file_range = False
                break
            offset, at, size = offset + got, at + got, size - got
        buf = memoryview(bytearray(min(size, _COPY_BUFFER)))
        while size:
            got = os.preadv(src_fd, [buf[: min(size, len(buf))]], offset)
            if got == 0:
                raise _ended_early(self.path)
            write_all(self._fd, buf[:got], at, self.path)
            offset, at, size = offset + got, at + got, size - got

    def skip(self, src_fd: int, offset: int, size: int) -> None:
        """Step over a tensor `place` has copied: its bytes are hashed, in order, from the
        source they were copied from (`src_fd` at `offset`); its partial blocks, which `place`
        left to the stream, are read from there too."""
        self._advance(size)
        try:
            self._stream.pass_over(src_fd, offset, size)
        except EOFError:
            raise _ended_early(self.path) from None
        self._feed(lambda: hash_source(self._hash, src_fd, offset, size), None)

    def close(self, done: Callable[[int, str], None] | None = None) -> None:
        """Check every promised byte arrived and make the file durable; then, after the last
        hashing job, `done(size, digest)` (see `digest.py`)."""
        try:
            if self._left or self._index < len(self._sizes) - 1:
                raise AssertionError(f"{self.path}: closed before {self.current} was complete")
            self._stream.finish()
            try:
                os.fsync(self._fd)
                size = os.fstat(self._fd).st_size
            except OSError as exc:
                raise output_failure(self.path, exc) from None
        finally:
            self.abort()
        if done is not None:
            self._feed(lambda: done(size, self._hash.hexdigest()), None)

    def abort(self) -> None:
        self._stream.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
