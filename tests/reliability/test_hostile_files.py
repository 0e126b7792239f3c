"""Hostile and broken input: every rule of the safetensors format, the index and the adapter
formats, each broken on purpose. One clear error, exit 1, no output, inputs untouched."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bonemerge.checkpoint import open_checkpoint, read_header
from bonemerge.errors import CheckpointError
from tests import toy
from tests.cliutil import fails


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
        ({"a": entry(dtype=["F32"])}, b"\0" * 8, "unknown dtype"),
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


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    if how == "truncated":
        path.write_bytes(data[:-100])
    elif how == "garbage":
        path.write_bytes(b"\x00" * 64)
    elif how == "duplicate":
        text = data[8 : 8 + length].decode()
        first = next(k for k in header if k != "__metadata__")
        entry = json.dumps(header[first], separators=(",", ":"))
        text = text[:-1].rstrip() + f',"{first}":{entry}' + "}"
        raw = text.encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])
    elif how == "trailing":
        path.write_bytes(data + b"\x00" * 16)


@pytest.mark.parametrize(
    ("how", "fragment"),
    [
        ("truncated", "truncated"),
        ("garbage", "does not start with"),
        ("duplicate", "appears twice"),
        ("trailing", "follow the last tensor"),
    ],
)
def test_broken_base_safetensors(tmp_path, base, adapter, how, fragment):
    corrupt(base / "model.safetensors", how)
    message = fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=(fragment,))
    assert "model.safetensors is not a valid safetensors file" in message


def test_index_names_missing_shard(tmp_path, adapter):
    base = toy.write_base(tmp_path / "sharded", shards=3)
    (base / "model-00002-of-00003.safetensors").unlink()
    fails(
        tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=("model-00002-of-00003", "missing")
    )


def test_unknown_method_is_named(tmp_path, base, adapter):
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "HRA", "r": 8}))
    fails(
        tmp_path,
        "merge",
        base,
        adapter,
        "-o",
        tmp_path / "out",
        expect=("is a HRA adapter", "Bone/MiSS, LoRA, IA³ and VeRA"),
    )


def test_config_of_other_method_than_weights(tmp_path, base):
    adapter = toy.write_adapter(tmp_path / "adapter", method="MISS")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"peft_type": "BONE"}))
    fails(
        tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=("miss_block", "different adapters")
    )


def test_lora_tensor_inside_bone_adapter(tmp_path, base):
    extra = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)}
    adapter = toy.write_adapter(tmp_path / "adapter", extra=extra)
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=("lora_A", "another PEFT method"))


def test_unmatched_adapter_tensor_lists_candidates(tmp_path, base):
    blocks = {"model.layers.7.self_attn.q_proj": torch.zeros(8, 64)}
    adapter = toy.write_adapter(tmp_path / "adapter", blocks=blocks)
    fails(
        tmp_path,
        "merge",
        base,
        adapter,
        "-o",
        tmp_path / "out",
        expect=("model.layers.7.self_attn.q_proj.bone_block", "no matching weight", "closest: model.layers."),
    )


def test_block_shape_contradicts_base(tmp_path, base):
    blocks = {"model.layers.0.self_attn.q_proj": torch.zeros(8, 48)}
    adapter = toy.write_adapter(tmp_path / "adapter", blocks=blocks)
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=("[8, 48]", "needs [8, 64]"))


def test_config_variant_contradicts_block_shape(tmp_path, base):
    adapter = toy.write_adapter(tmp_path / "adapter", variant="bat")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"init_weights": True}))
    fails(
        tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=("bat shape", "declares the default")
    )


def test_r_contradicts_block_shape(tmp_path, base):
    adapter = toy.write_adapter(tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"r": 16}))
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=("r=16", "disagree"))


def test_bat_on_weight_not_divisible_by_r(tmp_path, base):
    blocks = {"model.layers.0.mlp.down_proj": torch.zeros(64 // 32, 32, 32)}  # 96 inputs % 32 == 0 ...
    blocks = {"model.layers.0.mlp.up_proj": torch.zeros(96 // 48, 48, 48)}  # ... 64 inputs % 48 != 0
    adapter = toy.write_adapter(tmp_path / "adapter", blocks=blocks, variant="bat", r=48)
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=("Bat block with r=48", "64"))


def test_nan_in_adapter_block_is_caught_before_any_output(tmp_path, base, adapter):
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors[key][3, 5] = float("nan")
    save_file(tensors, adapter / "adapter_model.safetensors")
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=(key, "NaN or Inf"))


def test_overflowing_shapes_are_refused_without_allocating(tmp_path):
    huge = {"a": {"dtype": "F64", "shape": [2**40, 2**40, 2**40], "data_offsets": [0, 8]}}
    path = write_raw(tmp_path / "huge.safetensors", huge, b"\0" * 8)
    with pytest.raises(CheckpointError, match="needs 10633823966279326983230456482242756608 bytes"):
        read_header(path)


class _Payload:
    """Unpickling this would create a file: a stand-in for arbitrary code in a hostile pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("content", ["object", "list"])
def test_pickled_adapter_that_is_not_a_tensor_dict(tmp_path, base, content):
    adapter = toy.write_adapter(tmp_path / "adapter")
    blocks = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    payload = {**blocks, "evil": _Payload(marker)} if content == "object" else list(blocks.values())
    torch.save(payload, adapter / "adapter_model.bin")
    fails(
        tmp_path,
        "merge",
        base,
        adapter,
        "-o",
        tmp_path / "out",
        expect=("adapter_model.bin", "safe_serialization=True"),
    )
    assert not marker.exists(), "the pickle ran code"


def test_inf_in_adapter_block(tmp_path, base, adapter):
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = sorted(tensors)[-1]
    tensors[key][0, 0] = float("-inf")
    save_file(tensors, adapter / "adapter_model.safetensors")
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=(key, "NaN or Inf"))


def test_index_that_is_not_json(tmp_path, adapter):
    base = toy.write_base(tmp_path / "sharded", shards=2)
    (base / "model.safetensors.index.json").write_text("{not json")
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=("model.safetensors.index.json",))


def test_index_naming_a_file_outside_the_folder(tmp_path, adapter):
    base = toy.write_base(tmp_path / "sharded", shards=2)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(
        tmp_path,
        "merge",
        base,
        adapter,
        "-o",
        tmp_path / "out",
        expect=("not a file name in the same folder",),
    )
