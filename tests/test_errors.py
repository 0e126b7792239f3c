"""Bad input: one sentence naming the file and tensor, exit 1, no output left, inputs untouched."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from bonemerge.cli import main
from tests import toy
from tests.conftest import tree_digest


@pytest.fixture
def base(tmp_path) -> Path:
    return toy.write_base(tmp_path / "base")


@pytest.fixture
def adapter(tmp_path) -> Path:
    return toy.write_adapter(tmp_path / "adapter")


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def fails(tmp_path: Path, *args: object, expect: tuple[str, ...], code: int = 1) -> str:
    """Run, require the exit code and a one-line message holding every `expect` fragment,
    and require that neither the output nor a staging folder exists afterwards."""
    inputs = {p: tree_digest(p) for p in tmp_path.iterdir() if p.is_dir()}
    result = run(*args)
    assert result.exit_code == code, result.output
    message = result.stderr.strip()
    assert "Traceback" not in result.output
    if code == 1:
        assert message.startswith("error: ") and "\n" not in message, message
    for fragment in expect:
        assert fragment in message, message
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".*bonemerge*")), "a staging folder survived"
    for folder, digest in inputs.items():
        if folder.exists():
            assert tree_digest(folder) == digest, f"{folder} was modified"
    return message


def test_missing_base_folder(tmp_path, adapter):
    fails(
        tmp_path, "merge", tmp_path / "nope", adapter, "-o", tmp_path / "out", expect=("nope does not exist",)
    )


def test_folder_without_weights(tmp_path, adapter):
    (tmp_path / "empty").mkdir()
    fails(
        tmp_path, "merge", tmp_path / "empty", adapter, "-o", tmp_path / "out", expect=("no model weights",)
    )


def test_pytorch_bin_only_base(tmp_path, adapter):
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "pytorch_model.bin").write_bytes(b"not really")
    fails(
        tmp_path,
        "merge",
        tmp_path / "legacy",
        adapter,
        "-o",
        tmp_path / "out",
        expect=("pytorch_model.bin", "convert"),
    )


def test_adapter_passed_as_base(tmp_path, adapter, base):
    fails(
        tmp_path, "merge", adapter, base, "-o", tmp_path / "out", expect=("is a PEFT adapter, not a model",)
    )


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


def test_adapter_without_config(tmp_path, base, adapter):
    (adapter / "adapter_config.json").unlink()
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=("has no adapter_config.json",))


def test_adapter_folder_with_named_subfolders(tmp_path, base):
    toy.write_adapter(tmp_path / "run" / "bone_a")
    toy.write_adapter(tmp_path / "run" / "bone_b")
    fails(tmp_path, "merge", base, tmp_path / "run", "-o", tmp_path / "out", expect=("bone_a, bone_b",))


def test_lora_adapter_is_named(tmp_path, base, adapter):
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    fails(
        tmp_path,
        "merge",
        base,
        adapter,
        "-o",
        tmp_path / "out",
        expect=("is a LORA adapter", "Bone and MiSS"),
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


def test_non_finite_merged_tensor_removes_partial_output(tmp_path, adapter):
    tensors = toy.base_tensors()
    tensors["model.layers.1.mlp.up_proj.weight"][40, 2] = float("inf")
    base = toy.write_base(tmp_path / "base", tensors, shards=3)
    fails(
        tmp_path,
        "merge",
        base,
        adapter,
        "-o",
        tmp_path / "out",
        expect=("model.layers.1.mlp.up_proj.weight", "NaN or Inf", "--no-safe-merge"),
    )
    assert run("merge", base, adapter, "-o", tmp_path / "out", "--no-safe-merge").exit_code == 0


def test_float16_overflow_is_caught(tmp_path, base):
    blocks = {"model.layers.0.self_attn.q_proj": torch.full((8, 64), 70000.0)}
    adapter = toy.write_adapter(tmp_path / "adapter", blocks=blocks)
    fails(
        tmp_path,
        "merge",
        base,
        adapter,
        "-o",
        tmp_path / "out",
        "--dtype",
        "float16",
        expect=("q_proj.weight", "NaN or Inf"),
    )


def test_output_inside_input(tmp_path, base, adapter):
    message = fails(tmp_path, "merge", base, adapter, "-o", base / "merged", expect=("inside the input",))
    assert not (base / "merged").exists(), message


def test_input_inside_output(tmp_path, base, adapter):
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path, "--overwrite", expect=("is inside the output",))
    assert (base / "model.safetensors").is_file()


def test_output_exists_without_overwrite(tmp_path, base, adapter):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = run("merge", base, adapter, "-o", tmp_path / "out")
    assert result.exit_code == 1 and "--overwrite" in result.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_only_on_success(tmp_path, base, adapter):
    assert run("merge", base, adapter, "-o", tmp_path / "out").exit_code == 0
    first = (tmp_path / "out" / "model.safetensors").read_bytes()
    broken = toy.write_adapter(
        tmp_path / "broken", blocks={"model.layers.0.self_attn.q_proj": torch.zeros(8, 3)}
    )
    assert run("merge", base, broken, "-o", tmp_path / "out", "--overwrite").exit_code == 1
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == first
    other = toy.write_adapter(tmp_path / "other", seed=9)
    assert run("merge", base, other, "-o", tmp_path / "out", "--overwrite").exit_code == 0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() != first
    assert not list(tmp_path.glob(".*bonemerge*"))


def test_not_enough_free_disk(tmp_path, base, adapter, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=("GB free", "needs about"))


def test_cuda_requested_without_cuda(tmp_path, base, adapter):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error path cannot be reached")
    fails(
        tmp_path,
        "merge",
        base,
        adapter,
        "-o",
        tmp_path / "out",
        "--device",
        "cuda",
        expect=("no CUDA device",),
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--max-shard-size", "lots"], "cannot read 'lots' as a size"),
        (["--dtype", "int8"], "'int8' is not one of"),
        (["--precision", "fp16"], "'fp16' is not one of"),
    ],
)
def test_usage_errors_exit_2(tmp_path, base, adapter, args, fragment):
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", *args, expect=(fragment,), code=2)


def test_missing_output_option_is_a_usage_error(tmp_path, base, adapter):
    fails(tmp_path, "merge", base, adapter, expect=("--output",), code=2)


def test_unmerge_failing_midway_leaves_nothing(tmp_path, adapter):
    tensors = toy.base_tensors()
    tensors["model.layers.1.self_attn.q_proj.weight"][7, 7] = float("nan")
    merged = toy.write_base(tmp_path / "merged", tensors, shards=2)
    fails(
        tmp_path,
        "unmerge",
        merged,
        adapter,
        "-o",
        tmp_path / "out",
        expect=("unmerging adapter into model.layers.1.self_attn.q_proj.weight", "NaN or Inf"),
    )


def test_unmerge_with_adapter_for_another_model(tmp_path, base):
    blocks = {"model.layers.0.self_attn.q_proj": torch.zeros(8, 32)}
    adapter = toy.write_adapter(tmp_path / "adapter", blocks=blocks)
    fails(tmp_path, "unmerge", base, adapter, "-o", tmp_path / "out", expect=("needs [8, 64]",))


def test_unload_needs_a_training_checkpoint(tmp_path, base):
    fails(tmp_path, "unload", base, "-o", tmp_path / "out", expect=("is not a full PEFT checkpoint",))


def test_strip_errors(tmp_path, adapter):
    fails(
        tmp_path,
        "strip",
        adapter,
        "-o",
        tmp_path / "out",
        "--include",
        "(",
        expect=("--include '(' is not a valid",),
    )
    fails(
        tmp_path,
        "strip",
        adapter,
        "-o",
        tmp_path / "out",
        "--layers",
        "3-1",
        expect=("runs backwards",),
        code=2,
    )
    fails(tmp_path, "strip", adapter, "-o", adapter / "inner", expect=("inside the input",))


def test_verify_of_missing_model(tmp_path, base, adapter):
    result = run("verify", tmp_path / "nope", adapter, "--base", base)
    assert result.exit_code == 1 and "nope does not exist" in result.stderr
