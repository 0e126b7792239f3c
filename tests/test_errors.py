"""Bad input: one sentence naming the file and tensor, exit 1, no output left, inputs untouched."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests import toy
from tests.cliutil import fails, run


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


def test_adapter_without_config(tmp_path, base, adapter):
    (adapter / "adapter_config.json").unlink()
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=("has no adapter_config.json",))


def test_adapter_folder_with_named_subfolders(tmp_path, base):
    toy.write_adapter(tmp_path / "run" / "bone_a")
    toy.write_adapter(tmp_path / "run" / "bone_b")
    fails(tmp_path, "merge", base, tmp_path / "run", "-o", tmp_path / "out", expect=("bone_a, bone_b",))


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
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=(" free but the output needs",))


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
        (["--dtype", "int8"], "unknown dtype 'int8'; choose auto, bf16, fp16 or fp32"),
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
    fails(tmp_path, "unload", base, "-o", tmp_path / "out", expect=("is a model, not a full PEFT",))


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
