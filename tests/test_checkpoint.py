"""The checkpoint package: strict headers, folder discovery, the writer and shard layouts."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bonemerge.checkpoint import Entry, RangeReader, ShardWriter, dtypes, read_header
from bonemerge.checkpoint import writer as writer_module
from bonemerge.checkpoint.digest import file_digest
from bonemerge.checkpoint.layout import by_size, index_json, like_base, parse_size, write_order
from bonemerge.errors import BonemergeError, CheckpointError


def test_zero_sized_tensors_and_metadata_are_accepted(tmp_path):
    tensors = {"empty": torch.zeros(0, 4), "scalar": torch.tensor(3.0), "x": torch.ones(3, dtype=torch.int64)}
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "pt", "note": "hi"})
    header = read_header(tmp_path / "m.safetensors")
    assert header.metadata == {"format": "pt", "note": "hi"}
    assert header.tensors["empty"].nbytes == 0 and header.tensors["scalar"].shape == ()


def test_writer_output_is_read_by_safetensors_and_aligned(tmp_path):
    tensors = {
        "b_half": torch.arange(3, dtype=torch.float16),
        "a_byte": torch.tensor([1, 2, 3], dtype=torch.uint8),
        "c_double": torch.arange(5, dtype=torch.float64),
        "d_long": torch.arange(2, dtype=torch.int64),
    }
    entries = write_order(
        [
            Entry(n, dtypes.from_torch(t.dtype), tuple(t.shape), t.numel() * t.element_size())
            for n, t in tensors.items()
        ]
    )
    writer = ShardWriter(tmp_path / "w.safetensors", entries, {"format": "pt"})
    for e in entries:
        writer.write(memoryview(tensors[e.name].numpy().tobytes()))
    writer.close()
    header = read_header(tmp_path / "w.safetensors")
    assert header.data_start % 8 == 0
    for info in header.tensors.values():
        assert info.begin % (dtypes.BITS[info.dtype] // 8) == 0
    with safe_open(tmp_path / "w.safetensors", "pt") as f:
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name), tensor)


def test_writer_refuses_wrong_byte_counts(tmp_path):
    entries = [Entry("a", "F32", (2,), 8), Entry("b", "F32", (1,), 4)]
    writer = ShardWriter(tmp_path / "w.safetensors", entries, {})
    with pytest.raises(AssertionError, match="past the end of a"):
        writer.write(memoryview(b"\0" * 12))
    writer.abort()
    writer = ShardWriter(tmp_path / "v.safetensors", entries, {})
    writer.write(memoryview(b"\0" * 8))
    with pytest.raises(AssertionError, match="before b was complete"):
        writer.close()


@pytest.mark.parametrize("kernel", [True, False], ids=["copy_file_range", "buffered"])
def test_placed_tensors_land_at_their_offsets(tmp_path, monkeypatch, kernel, route):
    """Tensors copied ahead of the sequential writing (in any order; written direct, or through
    the page cache by the kernel or a buffer) end up where the header says, and the file's
    digest covers them."""
    if not kernel:

        def unsupported(*args):
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", unsupported)
    source = tmp_path / "src.bin"
    source.write_bytes(bytes(range(256)) * 1000)
    entries = [Entry("a", "U8", (50_000,), 50_000), Entry("b", "U8", (8,), 8), Entry("c", "U8", (500,), 500)]
    digests = []
    writer = ShardWriter(tmp_path / "w.safetensors", entries, {})
    with RangeReader() as reader:
        fd = reader.fd(source)
        assert writer.place("c", fd, 7)
        assert writer.place("a", fd, 300)
        writer.skip(fd, 300, 50_000)
        writer.write(memoryview(b"12345678"))
        writer.skip(fd, 7, 500)
        writer.close(lambda size, digest: digests.append(digest))
    data = (tmp_path / "w.safetensors").read_bytes()
    header = read_header(tmp_path / "w.safetensors")
    body = source.read_bytes()
    assert data[header.data_start :] == body[300:50_300] + b"12345678" + body[7:507]
    assert digests == [file_digest(tmp_path / "w.safetensors")]


def test_place_stops_between_pieces(tmp_path, monkeypatch, route):
    monkeypatch.setattr(writer_module, "_COPY_PIECE", 4096)
    source = tmp_path / "src.bin"
    source.write_bytes(bytes(100_000))
    writer = ShardWriter(tmp_path / "w.safetensors", [Entry("a", "U8", (100_000,), 100_000)], {})
    calls = []
    with RangeReader() as reader:
        assert not writer.place("a", reader.fd(source), 0, lambda: calls.append(1) or len(calls) > 3)
    writer.abort()
    assert len(calls) == 4


def test_range_reader_reports_truncation(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    with RangeReader() as reader, pytest.raises(CheckpointError, match="ended at byte 10"):
        reader.read(path, 5, 10)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1.5 gb") == 1_500_000_000
    assert parse_size("4096") == 4096
    for bad in ("", "5 parsecs", "0GB", "-1MB"):
        with pytest.raises(BonemergeError):
            parse_size(bad)


def test_layouts():
    entries = [Entry(f"t{i}", "F32", (10,), 40) for i in range(5)] + [Entry("big", "BF16", (100,), 200)]
    shards = by_size(entries, 100, "model")
    assert shards[0].filename == "model-00001-of-00004.safetensors"
    assert all(s.data_bytes <= 100 or len(s.entries) == 1 for s in shards)
    assert sorted(e.name for s in shards for e in s.entries) == sorted(e.name for e in entries)
    assert [s.filename for s in by_size(entries, 10**9, "model")] == ["model.safetensors"]
    index = index_json(shards)
    assert index["metadata"]["total_size"] == 400 and index["metadata"]["total_parameters"] == 150
    kept = like_base(
        entries, {"t0": "a.safetensors", "big": "b.safetensors"}, ["a.safetensors", "b.safetensors"]
    )
    assert {e.name for e in kept[0].entries} == {"t0"}
    assert {e.name for e in kept[1].entries} == {"big", "t1", "t2", "t3", "t4"}
    assert [e.name for e in kept[1].entries][-1] == "big", "wider dtypes first keeps alignment"
