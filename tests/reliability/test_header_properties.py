"""The header parser under random and mutated input: it accepts valid files, and anything it
is given either parses into a header that obeys every rule or raises CheckpointError, quickly
and without allocating far beyond the size of the input."""

from __future__ import annotations

import contextlib
import json
import math
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bonemerge.checkpoint import dtypes
from bonemerge.checkpoint.header import header_from_bytes
from bonemerge.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import fuzz_header  # noqa: E402

DTYPES = sorted(dtypes.BITS)


def assemble(entries: dict, data: bytes, pad: bool = True) -> bytes:
    text = json.dumps(entries).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


@st.composite
def valid_files(draw) -> bytes:
    """Well-formed files: contiguous tensors of random dtypes and shapes, whole bytes only."""
    entries, position = {}, 0
    for index in range(draw(st.integers(0, 6))):
        dtype = draw(st.sampled_from([d for d in DTYPES if dtypes.BITS[d] % 8 == 0]))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        size = dtypes.nbytes(dtype, math.prod(shape))
        entries[f"t{index}"] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + size]}
        position += size
    if draw(st.booleans()):
        entries["__metadata__"] = {"format": "pt"}
    return assemble(entries, draw(st.binary(min_size=position, max_size=position)))


@st.composite
def mutated_files(draw) -> bytes:
    data = bytearray(draw(valid_files()))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.integers(0, 3))
        if kind == 0 and data:
            data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
        elif kind == 1:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == 2:
            del data[at : at + draw(st.integers(1, 16))]
        else:
            data[0:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    return bytes(data)


def parse_checked(data: bytes) -> None:
    """What the fuzz target checks, plus a bound on memory in terms of the real input size."""
    tracemalloc.start()
    try:
        fuzz_header.check(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * len(data) + (1 << 20), f"{peak} bytes allocated for a {len(data)}-byte file"


@settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(valid_files())
def test_valid_files_are_accepted(data):
    header = header_from_bytes(data)
    assert header.data_start + sum(t.nbytes for t in header.tensors.values()) == len(data)


@settings(max_examples=1500, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated_files(), st.binary(max_size=256)))
def test_any_input_parses_by_the_rules_or_is_refused(data):
    parse_checked(data)


def test_a_lying_length_prefix_allocates_nothing_big():
    for length in (2**63, 100_000_000, 99_999_999, 10**7):
        data = struct.pack("<Q", length) + b'{"a":1}'
        tracemalloc.start()
        try:
            with contextlib.suppress(CheckpointError):
                header_from_bytes(data)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20


def test_the_fuzz_target_runs_clean():
    """The coverage-guided target (atheris when installed, else its mutation loop), briefly."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fuzz_header.py"), "-runs=20000", "-max_len=2048"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
