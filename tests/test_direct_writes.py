"""Shards written with O_DIRECT (`checkpoint/direct.py`): the same bytes as through the page
cache whatever the sizes, alignments and order of the pieces; buffers laid out as the file is
go to the disk from where they lie; a direct write refused midway goes on through the page
cache; a buffer is given back only once the disk has it; a failed write is one clear error."""

from __future__ import annotations

import errno
import os
import random
import threading
import time

import numpy as np
import pytest

from bonemerge.checkpoint import Entry, RangeReader, ShardWriter
from bonemerge.checkpoint import direct as direct_module
from bonemerge.checkpoint.digest import file_digest
from bonemerge.checkpoint.direct import UNIT, BlockStream, address
from bonemerge.checkpoint.writer import data_starts
from bonemerge.errors import OutputError

EDGES = [0, 1, 7, 100, UNIT - 1, UNIT, UNIT + 1, 3 * UNIT - 5, 70_000, 300_001, (1 << 20) + 13]


def laid_out(data: bytes, offset: int) -> memoryview:
    """`data` in memory whose address ≡ `offset` (mod UNIT), as the compute pool lays chunks."""
    room = np.empty(len(data) + 2 * UNIT, dtype=np.uint8)
    shift = (offset - room.ctypes.data) % UNIT
    room[shift : shift + len(data)] = np.frombuffer(data, dtype=np.uint8)
    return memoryview(room[shift : shift + len(data)])


def write_shard(tmp_path, seed: int, name: str = "w.safetensors"):
    """A shard of tensors of sizes around the block's edges, each written from memory (laid
    out as the file is, or not, in random pieces) or placed from a source file by another
    thread in random order; returns the writer and the bytes its data must hold."""
    rng = random.Random(seed)
    sizes = [rng.choice(EDGES) for _ in range(23)] + [(1 << 20) + 13]  # the last: one laid-out piece
    entries = [Entry(f"t{i}", "U8", (size,), size) for i, size in enumerate(sizes)]
    source = tmp_path / f"source-{seed}.bin"
    source.write_bytes(rng.randbytes(4 << 20))
    body = source.read_bytes()
    placed = {e.name: rng.randrange(0, len(body) - e.nbytes) for e in entries[:-1] if rng.random() < 0.4}
    written = {e.name: rng.randbytes(e.nbytes) for e in entries if e.name not in placed}
    starts = data_starts(entries, {})
    writer = ShardWriter(tmp_path / name, entries, {})
    released = []
    with RangeReader() as reader:
        fd = reader.fd(source)
        order = list(placed)
        rng.shuffle(order)
        ahead = threading.Thread(target=lambda: [writer.place(n, fd, placed[n]) for n in order])
        ahead.start()
        for entry in entries:
            if entry.name in placed:
                writer.skip(fd, placed[entry.name], entry.nbytes)
                continue
            data, done = written[entry.name], 0
            while done < len(data) or not data:
                last = entry is entries[-1]
                size = len(data) if last else rng.choice([len(data) - done, rng.randrange(1, 200_000)])
                piece = data[done : done + size]
                at = starts[entry.name] + done
                view = laid_out(piece, at) if last or rng.random() < 0.7 else memoryview(bytearray(piece))
                writer.write(view, lambda n=entry.name, d=done: released.append((n, d)))
                done += len(piece)
                if not data:
                    break
        ahead.join()
        writer.close()
    expected = b"".join(
        body[placed[e.name] : placed[e.name] + e.nbytes] if e.name in placed else written[e.name]
        for e in entries
    )
    return writer, expected, released


@pytest.mark.parametrize("seed", range(12))
def test_a_shard_holds_the_same_bytes_however_it_is_written(tmp_path, route, seed):
    writer, expected, released = write_shard(tmp_path, seed)
    assert writer.stream.unit == (UNIT if route == "direct" else 1)
    path = tmp_path / "w.safetensors"
    data = path.read_bytes()
    start = min(data_starts(writer_entries(path), {}).values(), default=len(data))
    assert data[start:] == expected
    assert len(released) == len(set(released)), "a buffer was given back twice"
    assert writer.stream.direct == (route == "direct")
    if route == "direct":
        assert writer.stream.from_place > 0, "no buffer laid out as the file went to the disk from memory"


def writer_entries(path):
    from bonemerge.checkpoint import read_header

    header = read_header(path)
    return [
        Entry(n, t.dtype, t.shape, t.nbytes)
        for n, t in sorted(header.tensors.items(), key=lambda x: x[1].begin)
    ]


def test_a_shard_written_direct_matches_one_written_through_the_page_cache(tmp_path, monkeypatch):
    """The same pieces, the two ways: identical files, digests included."""
    direct_dir, cached_dir = tmp_path / "direct", tmp_path / "cached"
    direct_dir.mkdir()
    cached_dir.mkdir()
    write_shard(direct_dir, 3)
    monkeypatch.setenv("BONEMERGE_NO_DIRECT_IO", "1")
    write_shard(cached_dir, 3)
    assert (direct_dir / "w.safetensors").read_bytes() == (cached_dir / "w.safetensors").read_bytes()
    assert file_digest(direct_dir / "w.safetensors") == file_digest(cached_dir / "w.safetensors")


def test_a_direct_write_refused_midway_goes_on_through_the_page_cache(tmp_path, monkeypatch):
    """EINVAL from the tenth direct write on (as where a file system's rules change under a
    file): the rest goes through the page cache, and the file is the same."""
    reference = tmp_path / "reference"
    reference.mkdir()
    write_shard(reference, 5)
    real = os.pwrite
    direct_fds: set[int] = set()
    calls = {"n": 0}
    real_open = direct_module._open_direct

    def opening(path):
        fd = real_open(path)
        direct_fds.add(fd)
        return fd

    def pwrite(fd, data, offset):
        if fd in direct_fds:
            calls["n"] += 1
            if calls["n"] >= 10:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, data, offset)

    monkeypatch.setattr(direct_module, "_open_direct", opening)
    monkeypatch.setattr(os, "pwrite", pwrite)
    refused = tmp_path / "refused"
    refused.mkdir()
    writer, _, _ = write_shard(refused, 5)
    if -1 in direct_fds:
        pytest.skip("this file system refuses O_DIRECT")
    assert calls["n"] >= 10 and not writer.stream.direct
    assert (refused / "w.safetensors").read_bytes() == (reference / "w.safetensors").read_bytes()


def test_a_buffer_is_given_back_only_once_the_disk_has_it(tmp_path, route, monkeypatch):
    """Hashing is done long before a slow disk write: the buffer still waits for the write."""
    gate = threading.Event()
    real = BlockStream.write_blocks

    def slow(self, view, at):
        gate.wait(5)
        real(self, view, at)

    monkeypatch.setattr(BlockStream, "write_blocks", slow)
    size = 4 * UNIT * 16
    entries = [Entry("a", "U8", (size,), size)]
    at = data_starts(entries, {})["a"]
    writer = ShardWriter(tmp_path / "w.safetensors", entries, {})
    given = threading.Event()
    if route == "page cache":
        gate.set()  # nothing is written on a disk thread: the buffer is copied into the cache
    writer.write(laid_out(b"\x5a" * size, at), given.set)
    time.sleep(0.2)
    if route == "direct":
        assert not given.is_set(), "the buffer was given back while the disk was still reading it"
        gate.set()
    assert given.wait(5)
    writer.close()
    assert (tmp_path / "w.safetensors").read_bytes()[at:] == b"\x5a" * size


def test_a_full_disk_on_a_disk_thread_is_one_clear_error(tmp_path, route, monkeypatch):
    """ENOSPC from a write in flight: the next write or the close says so in one sentence,
    and closing afterwards waits for every write (no descriptor closed under a disk thread)."""
    real = os.pwrite
    calls = {"n": 0}

    def full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    size = 64 * UNIT
    entries = [Entry(f"t{i}", "U8", (size,), size) for i in range(8)]
    starts = data_starts(entries, {})
    writer = ShardWriter(tmp_path / "w.safetensors", entries, {})
    with pytest.raises(OutputError, match="No space left on device; free some space") as caught:
        for entry in entries:
            writer.write(laid_out(bytes(size), starts[entry.name]))
        writer.close()
    assert "\n" not in str(caught.value)
    writer.abort()
    assert not writer.stream._in_flight


def test_place_writes_only_the_whole_blocks_the_stream_leaves(tmp_path, route):
    """An untouched tensor's partial blocks come with the stream and its whole blocks from the
    copy: a tensor too small to hold a block is the stream's alone."""
    writer = ShardWriter(tmp_path / "w.safetensors", [Entry("a", "U8", (10 * UNIT,), 10 * UNIT)], {})
    start = data_starts([Entry("a", "U8", (10 * UNIT,), 10 * UNIT)], {})["a"]
    begin, end = writer.stream.interior(start, 10 * UNIT)
    if route == "direct":
        assert begin % UNIT == 0 and end % UNIT == 0 and begin >= start and end <= start + 10 * UNIT
        assert end - begin == 9 * UNIT
        assert writer.stream.interior(start, UNIT - 1)[0] >= writer.stream.interior(start, UNIT - 1)[1]
    else:
        assert (begin, end) == (start, start + 10 * UNIT)
    writer.abort()


def test_address_is_where_the_bytes_lie():
    data = np.arange(10, dtype=np.uint8)
    assert address(memoryview(data)[3:]) == data.ctypes.data + 3


def test_a_merge_hands_computed_chunks_to_the_disk_from_where_they_were_computed(tmp_path, monkeypatch):
    """The compute pool lays each chunk out as it lies in the file, so a merge's computed
    bytes go to the disk with no copy; the output is the page-cache route's, byte for byte."""
    import torch

    from bonemerge import merge
    from tests import toy
    from tests.conftest import tree_digest

    probe = direct_module._open_direct(_empty(tmp_path / "probe"))
    if probe < 0:
        pytest.skip("this file system refuses O_DIRECT")
    os.close(probe)
    tensors = toy.base_tensors()
    generator = torch.Generator().manual_seed(3)
    wide = {"q_proj": (512, 512), "up_proj": (768, 512)}
    for layer in (0, 1):
        for module, shape in wide.items():
            part = "self_attn" if module == "q_proj" else "mlp"
            tensors[f"model.layers.{layer}.{part}.{module}.weight"] = (
                torch.randn(shape, generator=generator) * 0.05
            )
    base = toy.write_base(tmp_path / "base", tensors, shards=2)
    blocks = {
        name.removesuffix(".weight"): torch.randn(8, tensors[name].shape[0], generator=generator) * 0.01
        for name in tensors
        if name.endswith(("q_proj.weight", "up_proj.weight"))
    }
    adapter = toy.write_adapter(tmp_path / "bone", blocks)
    computed = sum(tensors[f"{module}.weight"].numel() * 4 for module in blocks)
    from_place = []
    real_finish = BlockStream.finish

    def finish(self):
        from_place.append(self.from_place)
        real_finish(self)

    monkeypatch.setattr(BlockStream, "finish", finish)
    merge(base, [adapter], tmp_path / "direct")
    assert sum(from_place) >= 0.9 * computed, (sum(from_place), computed)
    monkeypatch.setenv("BONEMERGE_NO_DIRECT_IO", "1")
    merge(base, [adapter], tmp_path / "cached")
    assert tree_digest(tmp_path / "direct") == tree_digest(tmp_path / "cached")


def _empty(path):
    path.write_bytes(b"")
    return path
