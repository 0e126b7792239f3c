"""`push`: publish a finished bonemerge output folder to the Hub."""

from __future__ import annotations

from pathlib import Path

from bonemerge.adapters import load_adapter
from bonemerge.checkpoint import open_checkpoint
from bonemerge.errors import BonemergeError
from bonemerge.output.push import Push
from bonemerge.resolve.inputs import PathLike, is_adapter_folder


def push(folder: PathLike, target: Push) -> str:
    """Publish a folder bonemerge wrote (a model or an adapter) to the Hub; returns the URL."""
    from bonemerge.output.push import push_folder

    path = Path(folder)
    if not path.is_dir():
        raise BonemergeError(f"{path} is not a folder; pass the output folder of a bonemerge command.")
    if is_adapter_folder(path):
        load_adapter(path)
    else:
        open_checkpoint(path)
    target.check()
    return push_folder(path, target).url
