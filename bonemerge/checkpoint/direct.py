"""Writing a file in whole aligned blocks with O_DIRECT, from the memory the bytes lie in.

Written through the page cache, every byte is copied into a cached page, which the kernel then
writes back and, once memory runs short, reclaims, much of it in the writing thread's own time:
on the FP8 bench, 6.4 GB of merged codes cost the writer thread 2.6-3.9 CPU-s, on a machine
whose two cores the merge itself needs. With O_DIRECT the disk takes the bytes from the buffer
they were computed in: 0.15 CPU-s per 3 GB here, against 1.1 through the page cache however
tuned. The output also stays out of the page cache, which keeps room for the input still to be
read.

O_DIRECT wants the file offset, the length and the memory address to be multiples of the
block (`UNIT`). A file is written in three ways at once:

- its stream (bytes in file order, `BlockStream.append`) goes front to back; bytes of a
  partial block wait in an aligned staging buffer until the block is whole;
- a caller's buffer laid out in memory as its bytes lie in the file (address ≡ offset mod
  `UNIT`: the compute pool places chunks so) is written from where it lies, else it goes
  through the staging buffer;
- whole blocks inside an untouched tensor may be written ahead from another thread
  (`copy_blocks`), the tensor's partial blocks at either end coming with the stream
  (`pass_over`).

No block is written two ways, so none is ever both cached and written direct.

A direct write returns only once the disk has the bytes, so the stream keeps `IN_FLIGHT` of
them going on threads of their own: one at a time, the writer thread waited out every write,
and on two busy cores each wake-up too (0.8 GB/s where the disk takes 2).

Where the file system refuses O_DIRECT (tmpfs before Linux 6.6, some FUSE and network file
systems), or `BONEMERGE_NO_DIRECT_IO=1` says not to use it, the unit is one byte and the
stream goes through the page cache as before; where a direct write is refused later, that
block and every one after it go through the page cache, unchanged.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where first used: see `address`
    from concurrent.futures import Future, ThreadPoolExecutor

UNIT = max(4096, mmap.PAGESIZE)
STAGE = 4 << 20
BOUNCE = 8 << 20
IN_FLIGHT = 3
# buffers smaller than this go through the staging buffer: a direct write of a few blocks
# costs more than copying them
_FROM_PLACE_MIN = 64 << 10

WriteAt = Callable[[memoryview, int], None]

_disk: ThreadPoolExecutor | None = None
_disk_lock = threading.Lock()


def _disk_threads() -> ThreadPoolExecutor:
    """The threads that wait for direct writes, shared by every stream of the process."""
    global _disk
    from concurrent.futures import ThreadPoolExecutor

    with _disk_lock:
        if _disk is None:
            _disk = ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="bonemerge-disk")
        return _disk


def _forget_disk_threads() -> None:
    """In a forked child: the parent's threads are not there to run its writes."""
    global _disk
    _disk = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_disk_threads)


def _open_direct(path: Path) -> int:
    """A second, O_DIRECT descriptor of `path`; -1 where the platform or file system has none,
    or `BONEMERGE_NO_DIRECT_IO` is set (to anything but 0): for a file system that takes
    O_DIRECT but is slow with it."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag or os.environ.get("BONEMERGE_NO_DIRECT_IO", "0") not in ("", "0"):
        return -1
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC | flag)
    except OSError:
        return -1


def address(view: memoryview) -> int:
    """Where `view`'s first byte lies in memory (read-only buffers too, which ctypes cannot
    take). numpy is imported here, not with the module: this one is on the path a command
    takes before its signal handlers are in place."""
    import numpy as np

    return int(np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0])


def write_fully(
    fd: int, view: memoryview, at: int, failure: Callable[[OSError], Exception], piece: int | None = None
) -> None:
    """All of `view` at `at`, in writes of at most `piece` bytes; a failure as `failure(error)`."""
    done = 0
    while done < len(view):
        try:
            done += os.pwrite(fd, view[done : done + piece if piece else None], at + done)
        except OSError as exc:
            raise failure(exc) from None


def _ended_early(path: Path) -> EOFError:
    return EOFError(f"an input file ended early while it was copied into {path}")


class BlockStream:
    """One output file's writing in aligned blocks, `fd` being the file opened for writing
    through the page cache. Where O_DIRECT is refused at the start, the stream goes through
    `through_cache(view, offset)` (which tunes writeback for a sequential writer); where it is
    refused later, the rest goes through `fd` as it comes.

    `unit` is fixed when the file is opened: which blocks the stream writes and which
    `copy_blocks` writes ahead must never change while both are writing. Input that ends
    early raises EOFError; a failed write, `failure(error)`, from the call that next waits
    for writes in flight."""

    def __init__(
        self, path: Path, fd: int, through_cache: WriteAt, failure: Callable[[OSError], Exception]
    ) -> None:
        self.path = path
        self._fd = fd
        self._through_cache = through_cache
        self._failure = failure
        self._direct = _open_direct(path)
        self._refused = threading.Event()
        self.unit = UNIT if self._direct >= 0 else 1
        # two staging buffers: one fills while the other's blocks are being written
        self._stages = [memoryview(mmap.mmap(-1, STAGE)) for _ in range(2 if self.unit > 1 else 0)]
        self._stage_written: list[Future[None] | None] = [None, None]
        self._current = 0
        self._staged_from = 0  # the file offset of the staging buffer's first byte
        self._staged = 0
        self._in_flight: deque[Future[None]] = deque()
        self.position = 0
        #: bytes written from the callers' own buffers, for the tests that keep it so
        self.from_place = 0

    @property
    def direct(self) -> bool:
        return self.unit > 1 and not self._refused.is_set()

    def interior(self, start: int, size: int) -> tuple[int, int]:
        """The whole blocks inside [start, start + size), as [begin, end); empty: begin >= end."""
        return -(-start // self.unit) * self.unit, (start + size) // self.unit * self.unit

    def append(self, view: memoryview) -> Future[None] | None:
        """The next `len(view)` bytes of the file. Returns the write that still reads `view`
        (its memory must not change before it is done), or None where none does."""
        if not self._stages:
            self._through_cache(view, self.position)
            self.position += len(view)
            return None
        head = min(len(view), -self.position % self.unit)
        self._stage_bytes(view[:head])
        rest = view[head:]
        whole = len(rest) // self.unit * self.unit
        written = None
        if whole >= _FROM_PLACE_MIN and address(rest) % self.unit == 0:
            self._flush()
            written = self._start(rest[:whole], self.position)
            self.from_place += whole
            self.position += whole
            self._staged_from = self.position
            rest = rest[whole:]
        self._stage_bytes(rest)
        return written

    def pass_over(self, fd: int, offset: int, size: int) -> None:
        """The next `size` bytes of the file are those of `fd` at `offset`, and `copy_blocks`
        writes the whole blocks among them (`interior`): the stream reads in the partial
        blocks at either end (all of a tensor too small to hold a block) and steps over the
        rest."""
        start, end = self.interior(self.position, size)
        if start >= end:
            self._read_in(fd, offset, size)
            return
        here = self.position
        self._read_in(fd, offset, start - here)
        self._flush()
        self.position = self._staged_from = end
        self._read_in(fd, offset + end - here, here + size - end)

    def _read_in(self, fd: int, offset: int, size: int) -> None:
        while size:
            room = self._stages[self._current][self._staged : min(STAGE, self._staged + size)]
            got = os.preadv(fd, [room], offset)
            if got == 0:
                raise _ended_early(self.path)
            self._staged += got
            self.position += got
            offset, size = offset + got, size - got
            if self._staged == STAGE:
                self._flush()

    def _stage_bytes(self, view: memoryview) -> None:
        while len(view):
            take = min(len(view), STAGE - self._staged)
            self._stages[self._current][self._staged : self._staged + take] = view[:take]
            self._staged += take
            self.position += take
            view = view[take:]
            if self._staged == STAGE:
                self._flush()

    def _flush(self) -> None:
        """Start writing the staged blocks (the last one partial only when the file ends
        there, written at once through the page cache), and go on in the other buffer."""
        if not self._staged:
            return
        stage = self._stages[self._current]
        whole = self._staged // self.unit * self.unit
        if whole:
            self._stage_written[self._current] = self._start(stage[:whole], self._staged_from)
        if whole < self._staged:
            self._write_cached(stage[whole : self._staged], self._staged_from + whole)
        self._staged_from += self._staged
        self._staged = 0
        self._current ^= 1
        earlier = self._stage_written[self._current]
        if earlier is not None:
            earlier.result()

    def _start(self, view: memoryview, at: int) -> Future[None]:
        """Write whole blocks on a disk thread, once fewer than IN_FLIGHT are going."""
        while len(self._in_flight) >= IN_FLIGHT:
            self._in_flight.popleft().result()
        written = _disk_threads().submit(self.write_blocks, view, at)
        self._in_flight.append(written)
        return written

    def write_blocks(self, view: memoryview, at: int) -> None:
        """Whole blocks at `at`, direct where the file system takes them (any thread)."""
        done = 0
        while done < len(view) and not self._refused.is_set():
            try:
                done += os.pwrite(self._direct, view[done:], at + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise self._failure(exc) from None
                self._refused.set()  # never closed here: another thread may be writing with it
        if done < len(view):
            self._write_cached(view[done:], at + done)

    def _write_cached(self, view: memoryview, at: int) -> None:
        write_fully(self._fd, view, at, self._failure)

    def copy_blocks(self, src_fd: int, offset: int, at: int, size: int) -> None:
        """Whole blocks from `src_fd` at `offset` to `at`, through a buffer of this call's own
        (called from the copy-ahead thread while the stream goes on)."""
        bounce = memoryview(mmap.mmap(-1, min(BOUNCE, size)))  # freed when this call returns
        while size:
            piece = bounce[: min(len(bounce), size)]
            got = 0
            while got < len(piece):
                read = os.preadv(src_fd, [piece[got:]], offset + got)
                if read == 0:
                    raise _ended_early(self.path)
                got += read
            self.write_blocks(piece, at)
            offset, at, size = offset + got, at + got, size - got

    def finish(self) -> None:
        """Write what is staged and wait for every write; the file ends at `position`."""
        if self._stages:
            self._flush()
        while self._in_flight:
            self._in_flight.popleft().result()

    def close(self) -> None:
        """Let the writes in flight end (never close a descriptor a disk thread is using),
        then close; their failures are the caller's to have seen already."""
        from concurrent.futures import wait

        wait(self._in_flight)
        self._in_flight.clear()
        if self._direct >= 0:
            os.close(self._direct)
            self._direct = -1
        self._stages = []  # their pages are unmapped with the last reference
