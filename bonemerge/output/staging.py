"""Where results are built and how they appear: all or nothing, never over an input.

An output is built in a hidden sibling folder of its final path and renamed into place only
when every file is written and fsynced. A previous output is swapped out atomically
(`renameat2(RENAME_EXCHANGE)` where the kernel has it) and only then deleted, so at every
instant the path holds either the old complete result or the new one. A lock beside the
output keeps a second run away, and the staging folder records enough (the plan's
fingerprint, each finished shard's digest) for `--resume` to continue a killed run safely.
Whatever a run creates (staging folder, lock, missing parent folders) goes again if it fails
or a signal ends it (`bonemerge.run.interrupts`); the renames that publish are never cut in two.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path
from types import TracebackType

from bonemerge.checkpoint.confine import expand_home
from bonemerge.checkpoint.digest import ALGORITHM, file_digest, recorded
from bonemerge.errors import OutputError, shown
from bonemerge.output.manifest import is_bonemerge_output
from bonemerge.run import interrupts
from bonemerge.units import format_size

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_SPACE_MARGIN = 64 << 20
_NAME_MAX = 255
_OLD = ".bonemerge-old-"
_SIBLING_EXTRA = len(f".{_OLD}") + 12  # the longest sibling name: `.NAME.bonemerge-old-<12 hex>`


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """Rename with Linux flags; False when the call is unavailable here."""
    try:
        call = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if call(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(target))


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Make every file and folder under `root` durable, deepest first."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def check_output(output: str | os.PathLike[str], inputs: list[Path], overwrite: bool) -> Path:
    """The output path, resolved, once it is known not to equal, hold or sit inside an input
    and not to be a symbolic link: writing through a link (dangling or not) would put the
    result somewhere the user never named."""
    given = expand_home(output)
    if given.is_symlink():
        raise OutputError(
            f"the output {given} is a symbolic link (to {shown(os.readlink(given), quote=False)}); "
            "bonemerge does not write through links: give the real path, or remove the link."
        )
    out = given.resolve()
    for given in inputs:
        source = expand_home(given).resolve()
        if out == source or source in out.parents:
            raise OutputError(f"the output {out} is inside the input {source}; choose an output elsewhere.")
        if out in source.parents:
            raise OutputError(
                f"the input {source} is inside the output {out}, which the result would replace; "
                "choose an output elsewhere."
            )
    if len(os.fsencode(out.name)) > _NAME_MAX - _SIBLING_EXTRA:
        raise OutputError(
            f"the output name {out.name[:32]}... is {len(os.fsencode(out.name))} bytes long, too long for "
            f"the staging folder and lock bonemerge keeps beside it; choose a name of at most "
            f"{_NAME_MAX - _SIBLING_EXTRA} bytes."
        )
    # What --overwrite would refuse is said first, so that the advice is never to pass it in vain.
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder; remove it or choose another output.")
    if out.exists() and any(out.iterdir()) and not is_bonemerge_output(out):
        raise OutputError(
            f"{out} is not empty and was not written by bonemerge (it has no valid bonemerge.json), so "
            "--overwrite will not delete it; remove it by hand or choose another output."
        )
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputError(f"{out} already exists; pass --overwrite to replace it, or choose another output.")
    return out


def check_free_space(output: Path, needed: int) -> None:
    """Refuse to start when the filesystem that will hold `output` cannot take `needed` bytes."""
    folder = output.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed + _SPACE_MARGIN:
        raise OutputError(
            f"{folder} has {format_size(free)} free but the output needs about "
            f"{format_size(needed + _SPACE_MARGIN)}; free some space or choose another output."
        )


def resumable_shards(output: Path, fingerprint: str) -> list[str]:
    """The shards a killed run of the same plan (`fingerprint`) left finished beside `output`,
    which `--resume` would reuse (by recorded size; `--resume` also checks their digests).
    A run without `--resume` discards them, so the caller says so instead of doing it silently."""
    staging = Staging(output, fingerprint)
    try:
        if (staging.path / Staging._PLAN).read_text(encoding="utf-8") != fingerprint:
            return []
        lines = (staging.path / Staging._PROGRESS).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    found = []
    for line in lines:
        with contextlib.suppress(ValueError, KeyError, TypeError, OSError):
            entry = json.loads(line)
            if (staging.path / entry["file"]).stat().st_size == int(entry["bytes"]):
                found.append(str(entry["file"]))
    return sorted(set(found))


class _Lock:
    """An exclusive `flock` on a file beside the output: the kernel drops it when the process
    dies, however it dies, so a crash never leaves the output locked."""

    def __init__(self, path: Path, output: Path) -> None:
        self.path = path
        self.output = output
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise OutputError(
                    f"cannot create {self.path}: {exc.strerror or exc}; check that the output's folder "
                    "is writable, or choose another output."
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(
                    f"another bonemerge run is writing {self.output} (it holds {self.path}); wait for it "
                    "to finish, or choose another output."
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file that its last holder unlinked while we waited
                self._fd = fd
                return
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlink and close; a second call does nothing."""
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            fd, self._fd = self._fd, None
            os.close(fd)


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and its ancestors that do not exist yet, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def remove_tree(path: Path) -> None:
    """Delete `path` even while another thread of this run still creates files in it (a
    listing that misses one makes the last `rmdir` fail, so it is retried)."""
    for _ in range(10):
        if not os.path.lexists(path):
            return
        shutil.rmtree(path, ignore_errors=True)


class Staging:
    """A hidden folder beside `output` that becomes `output` on `publish`, or vanishes.

    The folder's name is fixed (`.NAME.bonemerge-partial`) and it records a fingerprint of the
    plan and, as each shard becomes durable, its size and digest. A run started with `resume`
    finds the folder an interrupted or crashed run left, and if the fingerprint is the same
    keeps every shard whose bytes still match its record; anything else there is discarded.
    Without `resume`, a failed run removes the folder; with it, the finished shards stay.
    """

    _PLAN = ".bonemerge-plan"
    _PROGRESS = ".bonemerge-progress.jsonl"

    def __init__(self, output: Path, fingerprint: str = "", resume: bool = False) -> None:
        self.output = output
        self.path = output.parent / f".{output.name}.bonemerge-partial"
        self.fingerprint = fingerprint
        self.resume = resume
        self.finished: dict[str, tuple[int, str]] = {}
        self.reused: list[str] = []
        self.published = False
        self._lock = _Lock(output.parent / f".{output.name}.bonemerge-lock", output)
        self._created: list[Path] = []
        self._forget = lambda: None

    def __enter__(self) -> Staging:
        with interrupts.deferred():
            self._forget = interrupts.on_signal(self._discard)
            self._created = _missing_folders(self.output.parent)
            try:
                self.output.parent.mkdir(parents=True, exist_ok=True)
                self._lock.acquire()
            except BaseException as exc:
                self.__exit__(type(exc), exc, exc.__traceback__)
                if isinstance(exc, OSError):
                    raise OutputError(
                        f"cannot create {self.output.parent}: {exc.strerror or exc}; check the output "
                        "location."
                    ) from None
                raise
        try:
            if self.path.exists() and self.resume:
                self._reuse()
            elif self.path.exists():
                remove_tree(self.path)  # left by a crashed run; we hold the lock, so no one owns it
            self.path.mkdir(exist_ok=True)
            (self.path / self._PLAN).write_text(self.fingerprint, encoding="utf-8")
            fsync_path(self.path / self._PLAN)
            fsync_path(self.path)
        except BaseException as exc:
            # Also on Ctrl-C here: `with` never runs __exit__ when __enter__ fails.
            self.__exit__(type(exc), exc, exc.__traceback__)
            if isinstance(exc, OSError):
                raise OutputError(
                    f"cannot prepare {self.path}: {exc.strerror or exc}; check the output location."
                ) from None
            raise
        return self

    def _reuse(self) -> None:
        """Keep the shards a previous run of the same plan finished and fsynced, if intact."""

        plan = self.path / self._PLAN
        if not plan.is_file() or plan.read_text(encoding="utf-8") != self.fingerprint:
            remove_tree(self.path)
            return
        records: dict[str, tuple[int, str]] = {}
        progress = self.path / self._PROGRESS
        if progress.is_file():
            for line in progress.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    entry = json.loads(line)
                    found = recorded(entry)
                    if found and found[0] == ALGORITHM:
                        records[entry["file"]] = (int(entry["bytes"]), found[1])
        for file, (size, digest) in records.items():
            path = self.path / file
            if path.is_file() and path.stat().st_size == size and file_digest(path) == digest:
                self.finished[file] = (size, digest)
        for path in self.path.iterdir():
            if path.name not in self.finished and path.name not in (self._PLAN, self._PROGRESS):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.reused = sorted(self.finished)
        progress.write_text(
            "".join(
                json.dumps({"file": f, "bytes": n, ALGORITHM: d}) + "\n"
                for f, (n, d) in self.finished.items()
            ),
            encoding="utf-8",
        )

    def record(self, file: str, size: int, digest: str) -> None:
        """Note a shard as durable (it was fsynced before this is called)."""
        self.finished[file] = (size, digest)
        with open(self.path / self._PROGRESS, "a", encoding="utf-8") as progress:
            progress.write(json.dumps({"file": file, "bytes": size, ALGORITHM: digest}) + "\n")
            progress.flush()
            os.fsync(progress.fileno())

    def publish(self, overwrite: bool) -> None:
        """Drop the bookkeeping, fsync everything, then move the folder into place in one step."""
        for name in (self._PLAN, self._PROGRESS):
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()
        fsync_tree(self.path)
        with interrupts.deferred():
            self._swap_in(overwrite)
            interrupts.set_outcome(f"{self.output} was already complete and stays")

    def _swap_in(self, overwrite: bool) -> None:
        if self.output.exists() and overwrite:
            if not _renameat2(self.path, self.output, _RENAME_EXCHANGE):
                aside = self.output.parent / f".{self.output.name}{_OLD}{uuid.uuid4().hex[:12]}"
                os.rename(self.output, aside)
                os.rename(self.path, self.output)
                self.path = aside
            self.published = True
            remove_tree(self.path)
        else:
            try:
                if not _renameat2(self.path, self.output, _RENAME_NOREPLACE):
                    if self.output.exists():
                        raise FileExistsError(errno.EEXIST, "exists", str(self.output))
                    os.rename(self.path, self.output)
                self.published = True
            except FileExistsError:
                raise OutputError(
                    f"{self.output} appeared while bonemerge was writing; it was left alone, "
                    "pass --overwrite or choose another output."
                ) from None
        fsync_path(self.output.parent)

    def _discard(self) -> None:
        """Remove what this run made and did not publish: the staging folder (kept for
        `--resume`), the lock, and parent folders it created that are empty again. Run on
        failure and by the signal handler, possibly both, so each step may run twice."""
        if not self.published and not self.resume and self._lock.held:
            remove_tree(self.path)
        self._lock.release()
        if not self.published:
            for folder in reversed(self._created):
                with contextlib.suppress(OSError):
                    folder.rmdir()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with interrupts.deferred():
            self._discard()
            self._forget()
