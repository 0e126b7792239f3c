"""Which files of an input folder may be read as part of it.

A folder from a stranger can hold symbolic links to anything the user can read (`notes.txt ->
~/.ssh/id_rsa`) and special files that never end (`/dev/zero`, a FIFO). Whatever bonemerge
copies from an input lands in the output, and from there maybe on the Hub, so it reads only
regular files that resolve inside the folder they belong to. A Hugging Face cache snapshot
is the one legitimate exception to "inside": its files are links into the repo's `blobs/`,
so its confinement root is the repo's cache folder (`models--org--name`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_HUB_KINDS = ("models--", "datasets--", "spaces--")
_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFREG: "a regular file",
}


def kind(mode: int) -> str:
    """`a FIFO (named pipe)` for a FIFO's `st_mode`: how messages name a file type."""
    return _KINDS.get(stat.S_IFMT(mode), "a special file")


def kind_of(path: Path) -> str:
    """What `path` is, following links: `a character device` for /dev/null."""
    try:
        return kind(os.stat(path).st_mode)
    except OSError:
        return "a broken link" if path.is_symlink() else "missing"


def expand_home(path: str | os.PathLike[str]) -> Path:
    """`path` with a leading `~` or `~user` expanded, or as written when there is no such home
    (`~0`): then it is just a name that does not exist, not a crash."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def root_of(folder: Path) -> Path:
    """The folder that the files of `folder` must resolve into: `folder` itself, or the repo's
    cache folder when `folder` lies in a Hub cache snapshot (`models--o--n/snapshots/<commit>`)."""
    folder = folder.resolve()
    for candidate in (folder, *folder.parents):
        parent = candidate.parent
        if parent.name == "snapshots" and parent.parent.name.startswith(_HUB_KINDS):
            return parent.parent
    return folder


def refusal(path: Path, root: Path) -> str | None:
    """Why `path` may not be read as a file of a folder confined to `root`; None when it may."""
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return "it is a broken or looping symbolic link"
    if resolved != root and root not in resolved.parents:
        return f"it is a link to {resolved}, outside {root}"
    mode = os.stat(resolved).st_mode
    if not stat.S_ISREG(mode):
        return f"it is {kind(mode)}, not a regular file"
    return None


def open_regular(path: Path) -> int:
    """A read-only descriptor of `path`, opened without blocking on a FIFO and checked to be a
    regular file once open (a file swapped for something else after `refusal` is caught)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path.resolve(strict=True), flags | os.O_NOFOLLOW)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise OSError(f"{path} became {kind(mode)} while bonemerge ran")
    os.set_blocking(fd, True)
    return fd
