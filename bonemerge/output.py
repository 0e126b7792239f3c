"""Where results are built and how they appear: all or nothing, never over an input.

An output is built in a hidden sibling folder of its final path and renamed into place only
when every file is written and fsynced. A previous output is swapped out atomically
(`renameat2(RENAME_EXCHANGE)` where the kernel has it) and only then deleted, so at every
instant the path holds either the old complete result or the new one.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import uuid
from pathlib import Path
from types import TracebackType

from bonemerge.errors import OutputError

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_SPACE_MARGIN = 64 << 20


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
    """The output path, resolved, once it is known not to equal, hold or sit inside an input."""
    out = Path(output).expanduser().resolve()
    for given in inputs:
        source = given.expanduser().resolve()
        if out == source or source in out.parents:
            raise OutputError(f"the output {out} is inside the input {source}; choose an output elsewhere.")
        if out in source.parents:
            raise OutputError(
                f"the input {source} is inside the output {out}, which the result would replace; "
                "choose an output elsewhere."
            )
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputError(f"{out} already exists; pass --overwrite to replace it, or choose another output.")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder; remove it or choose another output.")
    return out


def check_free_space(output: Path, needed: int) -> None:
    """Refuse to start when the filesystem that will hold `output` cannot take `needed` bytes."""
    folder = output.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed + _SPACE_MARGIN:
        raise OutputError(
            f"{folder} has {free / 1e9:.2f} GB free but the output needs about "
            f"{(needed + _SPACE_MARGIN) / 1e9:.2f} GB; free some space or choose another output."
        )


class Staging:
    """A hidden folder beside `output` that becomes `output` on `publish`, or vanishes."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.path = output.parent / f".{output.name}.bonemerge-{uuid.uuid4().hex[:12]}"
        self.published = False

    def __enter__(self) -> Staging:
        try:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self.path.mkdir()
        except OSError as exc:
            raise OutputError(
                f"cannot create {self.path}: {exc.strerror or exc}; check the output location."
            ) from None
        return self

    def publish(self, overwrite: bool) -> None:
        """fsync everything, then move the folder into place in one step."""
        fsync_tree(self.path)
        if self.output.exists() and overwrite:
            if not _renameat2(self.path, self.output, _RENAME_EXCHANGE):
                aside = self.output.parent / f".{self.output.name}.bonemerge-old-{uuid.uuid4().hex[:12]}"
                os.rename(self.output, aside)
                os.rename(self.path, self.output)
                self.path = aside
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            try:
                if not _renameat2(self.path, self.output, _RENAME_NOREPLACE):
                    if self.output.exists():
                        raise FileExistsError(errno.EEXIST, "exists", str(self.output))
                    os.rename(self.path, self.output)
            except FileExistsError:
                raise OutputError(
                    f"{self.output} appeared while bonemerge was writing; it was left alone, "
                    "pass --overwrite or choose another output."
                ) from None
        fsync_path(self.output.parent)
        self.published = True

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.published:
            shutil.rmtree(self.path, ignore_errors=True)
