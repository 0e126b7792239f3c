"""Positional reads of tensor byte ranges into buffers the caller owns.

`pread` into reused buffers keeps memory flat: no mmap whose pages linger in RSS, no fresh
`bytes` object per read. One descriptor per file stays open for the run; positional reads
need no seeking, so a read-ahead thread and the writer can share descriptors safely.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from bonemerge.errors import CheckpointError

# The most a bounded read of a whole tensor (a check, a fingerprint) holds at once.
PIECE_BYTES = 64 << 20


class MountedFile(Protocol):
    """A file that is not on this disk (a Hub model's shard read by HTTP ranges) standing at a
    path: every reader reads it through `readinto`, and `identity` stands for its stat."""

    identity: tuple[int, ...]
    size: int

    def readinto(self, offset: int, view: memoryview) -> None: ...

    def expect(self, runs: Sequence[tuple[int, int]]) -> None:
        """The byte ranges [start, end) that will be read, each front to back (a hint)."""


_mounts: dict[Path, MountedFile] = {}


def mount(path: Path, file: MountedFile) -> None:
    """Make `path` read as `file` for every reader of this process until `unmount`."""
    _mounts[path] = file


def unmount(path: Path) -> None:
    _mounts.pop(path, None)


def mounted(path: Path) -> MountedFile | None:
    """The file standing at `path` in place of one on disk, or None."""
    return _mounts.get(path) if _mounts else None


def expect_reads(runs: Mapping[Path, Sequence[tuple[int, int]]]) -> None:
    """Tell each mounted file which byte runs a plan will read from it, so that each run can be
    asked for in one request; files on disk need no telling."""
    for path, spans in runs.items():
        if (file := mounted(path)) is not None:
            file.expect(spans)


class RangeReader:
    """Opens each input file once and reads exact byte ranges from it."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: Path) -> int:
        """The descriptor of `path`, opened on first use by whichever thread asks first."""
        if mounted(path) is not None:
            raise AssertionError(f"{path} is not on this disk: it has no descriptor, read it instead")
        with self._lock:
            return self._fd(path)

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as exc:
                raise CheckpointError(f"cannot open {path}: {exc.strerror or exc}.") from None
            self._fds[path] = fd
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return fd

    def readinto(self, path: Path, offset: int, view: memoryview) -> None:
        """Fill `view` with the bytes at `offset`; a short file is an error, never zeros."""
        if (remote := mounted(path)) is not None:
            remote.readinto(offset, view)
            return
        fd = self.fd(path)
        done, size = 0, len(view)
        while done < size:
            try:
                got = os.preadv(fd, [view[done:]], offset + done)
            except OSError as exc:
                raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}.") from None
            if got == 0:
                raise CheckpointError(
                    f"{path} ended at byte {offset + done}, before the data its header promises; "
                    "the file was truncated or replaced while bonemerge ran."
                )
            done += got

    def pieces(
        self, path: Path, offset: int, size: int, limit: int | None = None, align: int = 1
    ) -> Iterator[memoryview]:
        """The `size` bytes at `offset` in consecutive pieces of at most `limit` bytes (default
        PIECE_BYTES; a multiple of `align`, an element's size), read into one reused buffer: a
        piece is valid only until the next is asked for."""
        limit = max(align, (limit or PIECE_BYTES) // align * align)
        buffer = memoryview(bytearray(min(size, limit)))
        for begin in range(0, size, limit):
            view = buffer[: min(limit, size - begin)]
            self.readinto(path, offset + begin, view)
            yield view

    def read(self, path: Path, offset: int, size: int) -> bytearray:
        buf = bytearray(size)
        self.readinto(path, offset, memoryview(buf))
        return buf

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def file_identity(path: Path) -> tuple[int, ...]:
    """Size, modification time, inode, device and status-change time of `path` (`stat_identity`);
    for a mounted file, what stands for them (its size and content digest)."""
    if (remote := mounted(path)) is not None:
        return remote.identity
    return stat_identity(os.stat(path))


def stat_identity(stat: os.stat_result) -> tuple[int, ...]:
    """Size, modification time, inode, device and status-change time.

    Size and mtime alone can be put back from user space (`os.utime`) after a file is rewritten;
    the inode changes when a file is replaced and the ctime whenever its data or times change,
    and neither can be set back, so a file with the same identity holds the same bytes unless
    the clock or the filesystem itself is tampered with.
    """
    return stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev, stat.st_ctime_ns


class InputWatch:
    """Detects input files that change while bonemerge reads them.

    A checkpoint rewritten under a running merge would give an output that mixes two inputs;
    comparing each file's identity (`file_identity`) with what it was when the work was
    planned turns that into an error instead.
    """

    def __init__(self, paths: Iterable[Path], seen: Mapping[Path, tuple[int, ...]] | None = None) -> None:
        self._expected = {path: (seen or {}).get(path) or file_identity(path) for path in paths}

    def check(self) -> None:
        for path, expected in self._expected.items():
            try:
                now = file_identity(path)
            except FileNotFoundError:
                now = None
            if now != expected:
                raise CheckpointError(
                    f"{path} changed while bonemerge was reading it (its size, times or inode differ "
                    "from when the work started); nothing was written, rerun once it is stable."
                )
