"""Strict parsing of safetensors headers.

Checkpoints come from strangers, and bonemerge copies byte ranges straight from their files,
so a header is trusted only after every rule of the format holds: the reference reader's
rules, plus two it lets through (duplicate names, a header that is not a JSON object). The
parser never reads or allocates more than the file actually holds.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from bonemerge.checkpoint import dtypes
from bonemerge.checkpoint.reader import MountedFile, mounted, stat_identity
from bonemerge.errors import CheckpointError, shown

MAX_HEADER_BYTES = 100_000_000
_LENGTH = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie, relative to the start of the file's data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A validated header: tensors in data order, metadata, and where the data starts; read
    from a file, also the file's identity when it was opened (`stat_identity`), before a byte
    of it was read, so that any later change to the file is seen (`InputWatch`)."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int
    identity: tuple[int, ...] = ()


def _unicode(text: str) -> None:
    """JSON can escape a lone surrogate (`\\ud800`) that no UTF-8 file name or header can hold;
    the reference parser rejects it, and a name bonemerge cannot write back must not get in."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid(
            f"the string {shown(text)} holds an unpaired surrogate escape, not valid Unicode"
        ) from None


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        _unicode(key)
        if isinstance(value, str):
            _unicode(value)
        if key in result:
            raise _Invalid(f"the name {shown(key)} appears twice")
        result[key] = value
    return result


def _reject_constant(name: str) -> None:
    raise _Invalid(f"it contains the non-JSON constant {name}")


class _Invalid(Exception):
    """Internal: a rule broken, turned into one CheckpointError naming the file."""


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(name: str, raw: object) -> TensorInfo:
    if not isinstance(raw, dict):
        raise _Invalid(f"the entry for tensor {shown(name)} is not an object")
    extra = set(raw) - {"dtype", "shape", "data_offsets"}
    if extra:
        raise _Invalid(f"tensor {shown(name)} has unknown fields {shown(sorted(extra))}")
    dtype, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in dtypes.BITS:
        raise _Invalid(f"tensor {shown(name)} has unknown dtype {shown(dtype)}")
    if not isinstance(shape, list) or not all(_int(d) and d >= 0 for d in shape):
        raise _Invalid(f"tensor {shown(name)} has an invalid shape {shown(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_int(o) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _Invalid(f"tensor {shown(name)} has invalid data_offsets {shown(offsets)}")
    info = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
    expected = dtypes.nbytes(dtype, info.numel)
    if expected is None:
        raise _Invalid(f"tensor {shown(name)} of {dtype} does not fill whole bytes")
    if expected != info.nbytes:
        raise _Invalid(
            f"tensor {shown(name)} ({dtype} {list(shape)}) needs {expected} bytes "
            f"but its data_offsets span {info.nbytes}"
        )
    return info


def parse_header(raw: bytes, file_size: int) -> Header:
    """Validate the JSON header `raw` of a file of `file_size` bytes; raise `_Invalid`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Invalid("its header is not valid UTF-8") from exc
    if not text.startswith("{"):
        raise _Invalid("its header does not start with '{'")
    try:
        parsed = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except _Invalid:
        raise
    except (ValueError, RecursionError) as exc:
        raise _Invalid(f"its header is not valid JSON ({exc})") from exc
    if not isinstance(parsed, dict):
        raise _Invalid("its header is not a JSON object")

    metadata = parsed.pop("__metadata__", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _Invalid("its __metadata__ is not a map of strings to strings")

    entries = [_entry(name, value) for name, value in parsed.items()]
    data_start = _LENGTH.size + len(raw)
    data_size = file_size - data_start
    position = 0
    for info in sorted(entries, key=lambda t: (t.begin, t.end)):
        if info.begin != position:
            gap = "overlaps the previous tensor" if info.begin < position else "leaves a hole"
            raise _Invalid(f"tensor {shown(info.name)} {gap} (starts at {info.begin}, not {position})")
        position = info.end
    if position != data_size:
        if position > data_size:
            raise _Invalid(
                f"its tensors need {position} bytes of data but only {data_size} follow the "
                "header (the file is truncated)"
            )
        raise _Invalid(f"{data_size - position} bytes follow the last tensor")
    ordered = sorted(entries, key=lambda t: (t.begin, t.end))
    return Header({t.name: t for t in ordered}, metadata, data_start, file_size)


def _decode(read: Callable[[int], bytes], file_size: int) -> Header:
    """The length prefix, then the header it announces, read through `read(n)` only once the
    file is known to be that long: a lying prefix never makes the parser allocate more."""
    prefix = read(_LENGTH.size)
    if len(prefix) < _LENGTH.size:
        raise _Invalid(f"it is {file_size} bytes long, too short for a header")
    (length,) = _LENGTH.unpack(prefix)
    if length > MAX_HEADER_BYTES:
        raise _Invalid(f"its header length {length} exceeds the limit of 100,000,000")
    if length > file_size - _LENGTH.size:
        raise _Invalid(
            f"its header length {length} runs past the end of the file "
            f"({file_size} bytes; truncated or not safetensors)"
        )
    raw = read(length)
    if len(raw) != length:
        raise _Invalid("the file shrank while its header was read")
    return parse_header(raw, file_size)


def _invalid(where: object, exc: _Invalid) -> CheckpointError:
    return CheckpointError(f"{where} is not a valid safetensors file: {exc}; re-download or re-save it.")


def header_from_bytes(data: bytes, name: str = "<bytes>") -> Header:
    """Validate the header of a whole safetensors file held in memory (fuzzing, tests)."""
    view = memoryview(data)
    position = 0

    def read(size: int) -> bytes:
        nonlocal position
        chunk = bytes(view[position : position + size])
        position += len(chunk)
        return chunk

    try:
        return _decode(read, len(data))
    except _Invalid as exc:
        raise _invalid(name, exc) from None


def _reading(file: MountedFile) -> Callable[[int], bytes]:
    """`read(n)` over a mounted file, from its start: the length prefix, then the header."""
    position = 0

    def read(size: int) -> bytes:
        nonlocal position
        buffer = bytearray(max(0, min(size, file.size - position)))
        file.readinto(position, memoryview(buffer))
        position += len(buffer)
        return bytes(buffer)

    return read


def read_header(path: Path) -> Header:
    """Read and validate the header of the safetensors file at `path` (on disk or mounted)."""
    if (remote := mounted(path)) is not None:
        try:
            return replace(_decode(_reading(remote), remote.size), identity=remote.identity)
        except _Invalid as exc:
            raise _invalid(path, exc) from None
    try:
        with open(path, "rb") as f:
            identity = stat_identity(os.fstat(f.fileno()))
            return replace(_decode(f.read, identity[0]), identity=identity)
    except _Invalid as exc:
        raise _invalid(path, exc) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}.") from None
