"""`bonemerge.json`: what bonemerge wrote into an output folder, read back without trusting it.

The manifest says how an output was made (inspect shows it) and records the size and checksum
(XXH3-128) of every file (`verify --checksums`); its presence is also what lets `--overwrite`
replace a folder. A folder can come from anyone, so a manifest is read as hostile input: it must be an
object written by bonemerge, its file list a map of relative names inside the folder to sizes
and digests, and no name may lead out of the folder, however it is spelled or linked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from bonemerge.checkpoint import read_json
from bonemerge.checkpoint.confine import refusal
from bonemerge.checkpoint.digest import ALGORITHM, file_digest, recorded
from bonemerge.errors import CheckpointError, shown

MANIFEST = "bonemerge.json"


def _file_entry(name: object, entry: object) -> str:
    """Why one `files` entry is malformed, or "" when it is fine."""
    if not isinstance(name, str) or not name or not name.isprintable():
        return f"the file name {shown(name)} is not a name"
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or "\\" in name:
        return f"the file {shown(name)} lies outside the folder"
    if not isinstance(entry, dict):
        return f"the entry for {shown(name)} is not an object"
    size = entry.get("bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return f"the size of {shown(name)} is not a byte count"
    if recorded(entry) is None:
        return f"the entry for {shown(name)} has no XXH3-128, BLAKE3 or SHA-256 digest"
    return ""


def read_manifest(folder: Path) -> dict:
    """The folder's manifest, checked: an object with bonemerge's version and a `files` map of
    relative names to `{"bytes": int, "xxh3_128": hex}` (or `"blake3"` or `"sha256"`, as
    earlier versions wrote). Raises CheckpointError otherwise."""
    path = folder / MANIFEST
    manifest = read_json(path)
    if not isinstance(manifest.get("bonemerge"), str):
        raise CheckpointError(f"{path} is not a bonemerge manifest (it has no bonemerge version).")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{path} has no map of files; it is damaged or was not written by bonemerge.")
    for name, entry in files.items():
        problem = _file_entry(name, entry)
        if problem:
            raise CheckpointError(f"{path} is not a valid bonemerge manifest: {problem}.")
    return manifest


def listed_files(folder: Path, manifest: Mapping) -> dict[str, dict]:
    """The manifest's files, each checked to be a regular file inside `folder` if it exists (a
    name that is a link out of the folder is refused, never read)."""
    root = folder.resolve()
    files = dict(manifest["files"])
    for name in files:
        path = folder / name
        if (path.exists() or path.is_symlink()) and (problem := refusal(path, root)):
            raise CheckpointError(
                f"{folder / MANIFEST} lists {name}, which cannot be checked: {problem}; "
                "the folder was tampered with."
            )
    return files


def is_bonemerge_output(folder: Path) -> bool:
    """True when `folder` holds a manifest that reads as one bonemerge wrote."""
    try:
        read_manifest(folder)
    except CheckpointError:
        return False
    return True


def write_manifest(folder: Path, fields: dict, known: Mapping[str, tuple[int, str]]) -> dict[str, dict]:
    """Write `fields` plus the size and digest of every file under `folder` (from `known`
    where the writer already hashed it, and of the files in `known` no longer there) as
    `folder/bonemerge.json`; returns the file map."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        name = str(path.relative_to(folder))
        size, digest = known.get(name) or (path.stat().st_size, file_digest(path))
        files[name] = {"bytes": size, ALGORITHM: digest}
    gone = {name: record for name, record in known.items() if name not in files}
    if gone:  # shards already uploaded and deleted (`--stream`): listed by what the writer hashed
        files |= {name: {"bytes": size, ALGORITHM: digest} for name, (size, digest) in gone.items()}
        files = dict(sorted(files.items(), key=lambda item: PurePosixPath(item[0]).parts))
    text = json.dumps(fields | {"files": files}, indent=2) + "\n"
    (folder / MANIFEST).write_text(text, encoding="utf-8")
    return files
