"""The checkpoint package: strict headers, folder discovery, the writer and shard layouts."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bonemerge.checkpoint import Entry, RangeReader, ShardWriter, dtypes, open_checkpoint, read_header
from bonemerge.checkpoint.layout import by_size, index_json, like_base, parse_size, write_order
from bonemerge.errors import BonemergeError, CheckpointError
from tests import toy


def write_raw(path: Path, header: object, data: bytes = b"", raw_header: bytes | None = None) -> Path:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    ("header", "data", "fragment"),
    [
        ({"a": entry(dtype="F31")}, b"\0" * 8, "unknown dtype"),
        ({"a": entry(shape=(-2,))}, b"\0" * 8, "invalid shape"),
        ({"a": entry(shape=(2.0,))}, b"\0" * 8, "invalid shape"),
        ({"a": entry(shape=(3,))}, b"\0" * 8, "needs 12 bytes"),
        ({"a": entry(offsets=(8, 0))}, b"\0" * 8, "invalid data_offsets"),
        ({"a": entry(), "b": entry(offsets=(4, 12))}, b"\0" * 12, "overlaps"),
        ({"a": entry(), "b": entry(offsets=(12, 20))}, b"\0" * 20, "hole"),
        ({"a": entry()}, b"\0" * 4, "truncated"),
        ({"a": entry()}, b"\0" * 9, "1 bytes follow"),
        ({"a": entry(dtype="F4", shape=(3,), offsets=(0, 1))}, b"\0", "whole bytes"),
        ({"a": [1, 2]}, b"", "not an object"),
        ({"a": entry() | {"extra": 1}}, b"\0" * 8, "unknown fields"),
        ({"__metadata__": {"format": 1}, "a": entry()}, b"\0" * 8, "__metadata__"),
        ([1, 2, 3], b"", "does not start with"),
    ],
)
def test_invalid_headers(tmp_path, header, data, fragment):
    path = write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors is not a valid safetensors file") as info:
        read_header(path)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {}}', "appears twice"),
        (b'{"a": NaN}', "non-JSON constant"),
        (b"{\xff}", "not valid UTF-8"),
        (b'{"a": ', "not valid JSON"),
        (b"{" + b"[" * 100_000, "not valid JSON"),
    ],
)
def test_invalid_header_text(tmp_path, raw, fragment):
    path = write_raw(tmp_path / "bad.safetensors", None, b"\0" * 8, raw_header=raw)
    with pytest.raises(CheckpointError, match=fragment):
        read_header(path)


def test_header_length_limits(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", 200_000_000) + b"{}")
    with pytest.raises(CheckpointError, match="exceeds the limit"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 5000) + b"{}")
    with pytest.raises(CheckpointError, match="runs past the end"):
        read_header(path)
    path.write_bytes(b"\1\2")
    with pytest.raises(CheckpointError, match="too short"):
        read_header(path)


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


def test_copy_from_copies_exact_ranges(tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(bytes(range(256)) * 1000)
    writer = ShardWriter(tmp_path / "w.safetensors", [Entry("a", "U8", (1000,), 1000)], {})
    with RangeReader() as reader:
        writer.copy_from(reader.fd(source), 300, 1000)
        writer.close()
    header = read_header(tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()[header.data_start :]
    assert data == source.read_bytes()[300:1300]


def test_range_reader_reports_truncation(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    with RangeReader() as reader, pytest.raises(CheckpointError, match="ended at byte 10"):
        reader.read(path, 5, 10)


def test_sharded_folder_and_index_checks(tmp_path):
    folder = toy.write_base(tmp_path / "m", shards=3)
    checkpoint = open_checkpoint(folder)
    assert len(checkpoint.shards) == 3 and set(checkpoint.tensors) == set(toy.SHAPES)
    assert checkpoint.file_prefix == "model"
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())

    norm_file = index["weight_map"]["model.norm.weight"]
    other = next(f for f in index["weight_map"].values() if f != norm_file)
    moved = dict(index, weight_map=dict(index["weight_map"], **{"model.norm.weight": other}))
    index_path.write_text(json.dumps(moved))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight"):
        open_checkpoint(folder)

    index_path.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="has no weight_map"):
        open_checkpoint(folder)

    extra = dict(index, weight_map=dict(index["weight_map"], ghost="model-00001-of-00003.safetensors"))
    index_path.write_text(json.dumps(extra))
    with pytest.raises(CheckpointError, match="maps tensor 'ghost'"):
        open_checkpoint(folder)

    index_path.write_text(json.dumps(index))
    first = sorted(n for n, f in index["weight_map"].items() if f.startswith("model-00001"))[0]
    save_file({first: torch.zeros(toy.SHAPES[first])}, folder / "model-00002-of-00003.safetensors")
    with pytest.raises(CheckpointError, match="stored in both"):
        open_checkpoint(folder)


def test_several_files_without_index(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"x": torch.zeros(1)}, folder / "a.safetensors")
    save_file({"y": torch.zeros(1)}, folder / "b.safetensors")
    with pytest.raises(CheckpointError, match="no index"):
        open_checkpoint(folder)


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
