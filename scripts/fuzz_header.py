#!/usr/bin/env python
"""Fuzz target for bonemerge's safetensors header parser.

    python scripts/fuzz_header.py                 # coverage-guided with atheris, until stopped
    python scripts/fuzz_header.py -runs=200000    # a fixed number of inputs (CI runs a short one)
    python scripts/fuzz_header.py CORPUS_DIR      # libFuzzer options and corpus folders pass through

With atheris installed (`pip install atheris`) inputs are mutated under coverage guidance from
valid seed files; without it, a built-in mutation loop runs `-runs` inputs (default 20000).
Each input is a whole file. The parser must either accept it, and then every rule of the
format holds for what it accepted, or raise `CheckpointError`; anything else is a crash.
"""

from __future__ import annotations

import contextlib
import json
import random
import struct
import sys
import tempfile
from pathlib import Path

with contextlib.suppress(ImportError):
    import atheris

    with atheris.instrument_imports():
        import bonemerge.checkpoint.header  # noqa: F401

from bonemerge.checkpoint import dtypes
from bonemerge.checkpoint.header import header_from_bytes
from bonemerge.errors import CheckpointError


def seeds() -> list[bytes]:
    """Small valid files: mixed dtypes, empty and scalar tensors, metadata, sub-byte F4."""

    def file(entries: dict, data: bytes, metadata: dict | None = None) -> bytes:
        header = dict(entries)
        if metadata is not None:
            header["__metadata__"] = metadata
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text + data

    return [
        file({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, bytes(16), {"format": "pt"}),
        file(
            {
                "w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]},
                "e": {"dtype": "I64", "shape": [0, 5], "data_offsets": [6, 6]},
                "s": {"dtype": "U8", "shape": [], "data_offsets": [6, 7]},
            },
            bytes(7),
        ),
        file({"f4": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, bytes(2)),
        struct.pack("<Q", 2) + b"{}",
    ]


def check(data: bytes) -> None:
    """One input: accepted with all invariants holding, or refused with CheckpointError."""
    try:
        header = header_from_bytes(data)
    except CheckpointError:
        return
    position = 0
    for info in header.tensors.values():
        assert info.dtype in dtypes.BITS and all(d >= 0 for d in info.shape)
        assert info.begin == position and info.nbytes == dtypes.nbytes(info.dtype, info.numel)
        position = info.end
    assert header.data_start + position == len(data) == header.file_size
    assert len(set(header.tensors)) == len(header.tensors)


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random edit: flip, insert, delete or overwrite bytes, or splice in JSON tokens."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(5)
        at = rng.randrange(len(buf) + 1)
        if kind == 0 and buf:
            buf[min(at, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1:
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif kind == 2:
            del buf[at : at + rng.randint(1, 16)]
        elif kind == 3:
            token = rng.choice([b"{", b"}", b'"', b",", b":", b"[", b"]", b"-1", b"1e999", b"NaN", b"\xff"])
            buf[at:at] = token
        else:
            buf[0:8] = struct.pack(
                "<Q", rng.choice([0, 1, len(buf), 2**63, 100_000_001, rng.randrange(2**16)])
            )
    return bytes(buf)


def builtin_loop(runs: int) -> None:
    rng = random.Random(0)
    pool = seeds()
    for _ in range(runs):
        candidate = mutate(rng.choice(pool), rng)
        check(candidate)
        if len(pool) < 256 and rng.random() < 0.05:
            pool.append(candidate)


def main() -> None:
    if "atheris" in sys.modules:
        arguments = list(sys.argv)
        if not any(not a.startswith("-") for a in arguments[1:]):
            corpus = Path(tempfile.mkdtemp(prefix="bonemerge-fuzz-"))
            for number, seed in enumerate(seeds()):
                (corpus / f"seed{number}").write_bytes(seed)
            arguments.append(str(corpus))
        atheris.Setup(arguments, check)
        atheris.Fuzz()
    else:
        runs = next((int(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("-runs=")), 20000)
        builtin_loop(runs)
        print(f"{runs} inputs, no crash")


if __name__ == "__main__":
    main()
