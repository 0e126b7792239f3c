"""Dtypes bonemerge cannot compute on: complex blocks and weights would lose their imaginary
part, sub-byte and unknown dtypes have no torch type. Each is refused in one sentence naming
the file and the tensor when it would be transformed, and passes through untouched otherwise."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import toy
from tests.cliutil import fails, run


def write_raw(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> Path:
    """A safetensors file written by hand, for dtypes torch cannot produce (F4)."""
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


Q_PROJ = "model.layers.0.self_attn.q_proj"


def test_complex_block_is_refused(tmp_path, base):
    blocks = {Q_PROJ: torch.randn(8, 64, dtype=torch.complex64) * 0.01}
    adapter = toy.write_adapter(tmp_path / "adapter", blocks=blocks)
    key = f"base_model.model.{Q_PROJ}.bone_block"
    for command in (["merge", base, adapter], ["unmerge", base, adapter], ["strip", adapter]):
        fails(tmp_path, *command, "-o", tmp_path / "out", expect=(key, "adapter_model.safetensors", "C64"))


def test_complex_block_in_a_pickle_is_refused(tmp_path, base):
    adapter = toy.write_adapter(tmp_path / "adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].to(torch.complex128)
    torch.save(tensors, adapter / "adapter_model.bin")
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=(key, "adapter_model.bin"))


def test_complex_weight_under_a_block_is_refused(tmp_path, adapter):
    tensors = toy.base_tensors()
    tensors[f"{Q_PROJ}.weight"] = tensors[f"{Q_PROJ}.weight"].to(torch.complex64)
    base = toy.write_base(tmp_path / "base", tensors)
    fails(
        tmp_path,
        "merge",
        base,
        adapter,
        "-o",
        tmp_path / "out",
        expect=(f"{Q_PROJ}.weight in {base / 'model.safetensors'}", "C64"),
    )


def test_f4_block_is_refused(tmp_path, base, adapter):
    key = f"base_model.model.{Q_PROJ}.bone_block"
    write_raw(adapter / "adapter_model.safetensors", {key: ("F4", [8, 64], b"\x11" * 256)})
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=(key, "F4"))


@pytest.fixture
def f4_base(tmp_path) -> Path:
    """The toy base plus an untouched F4 tensor (a quantized layer that no block targets)."""
    folder = toy.write_base(tmp_path / "base")
    tensors = load_file(folder / "model.safetensors")
    raw = {n: ("F32", list(t.shape), t.numpy().tobytes()) for n, t in tensors.items()}
    raw["model.quantized.weight"] = ("F4", [4, 6], bytes(range(12)))
    write_raw(folder / "model.safetensors", raw)
    return folder


def test_f4_tensor_passes_through_merge_and_verify(tmp_path, f4_base, adapter):
    out = tmp_path / "merged"
    assert run("merge", f4_base, adapter, "-o", out).exit_code == 0
    for args in (["--checksums"], [adapter, "--base", f4_base]):
        result = run("verify", out, *args)
        assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "F4" in run("inspect", out).output


def test_verify_sees_a_changed_f4_tensor(tmp_path, f4_base, adapter):
    out = tmp_path / "merged"
    assert run("merge", f4_base, adapter, "-o", out).exit_code == 0
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # F4 is the smallest dtype, so it is written last
    (out / "model.safetensors").write_bytes(bytes(data))
    result = run("verify", out, adapter, "--base", f4_base)
    assert result.exit_code == 1 and "differs: model.quantized.weight" in result.output, result.output


def test_f4_weight_under_a_block_is_refused(tmp_path, f4_base):
    blocks = {"model.quantized": torch.zeros(2, 4)}
    adapter = toy.write_adapter(tmp_path / "adapter", blocks=blocks, r=2)
    fails(
        tmp_path, "merge", f4_base, adapter, "-o", tmp_path / "out", expect=("model.quantized.weight", "F4")
    )


def test_plain_float_blocks_still_merge(tmp_path, base):
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        blocks = {Q_PROJ: (torch.randn(8, 64) * 0.01).to(dtype)}
        adapter = toy.write_adapter(tmp_path / f"adapter-{dtype}", blocks=blocks)
        assert run("merge", base, adapter, "-o", tmp_path / f"out-{dtype}").exit_code == 0
