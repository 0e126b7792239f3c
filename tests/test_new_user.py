"""What a new user trips over: a training checkpoint given as an adapter, mistyped paths, dtype
spellings, the names the README imports, shard sizes smaller than a tensor, and help texts."""

from __future__ import annotations

import importlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import bonemerge
from bonemerge import merge, strip
from bonemerge.checks.dtype_names import parse_dtype
from bonemerge.cli import main
from bonemerge.errors import BonemergeError
from tests import oracle, toy
from tests.cliutil import fails, run

README = Path(__file__).resolve().parents[1] / "README.md"
SCRIPT = Path(sys.executable).with_name("bonemerge")
PREFIX = "base_model.model."


def training_checkpoint(folder: Path) -> Path:
    """A PeftModel state dict as a trainer saves it, beside the adapter_config.json it also writes."""
    folder.mkdir(parents=True)
    tensors = {}
    for name, value in toy.base_tensors().items():
        module = name.removesuffix(".weight")
        if module.endswith("q_proj"):
            tensors[f"{PREFIX}{module}.base_layer.weight"] = value
            tensors[f"{PREFIX}{module}.bone_block.default"] = torch.randn(8, value.shape[0]) * 0.01
        else:
            tensors[PREFIX + name] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "BONE", "r": 8}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def test_a_training_checkpoint_given_as_adapter(tmp_path, base):
    checkpoint = training_checkpoint(tmp_path / "checkpoint-500")
    for command in ("merge", "unmerge"):
        fails(
            tmp_path,
            command, base, checkpoint, "-o", tmp_path / "out",
            expect=(
                f"{checkpoint} is a full PEFT training checkpoint",
                "not an adapter",
                f"`bonemerge merge {checkpoint} -o OUT`",
            ),
        )  # fmt: skip
    done = run("merge", checkpoint, "-o", tmp_path / "out")
    assert done.exit_code == 0, done.output


@pytest.mark.parametrize("typed", ["./foo/bar", "foo/bar/baz", "../models/llama", "/nowhere/x", "out/"])
@pytest.mark.parametrize("position", ["base", "adapter"])
def test_a_mistyped_local_path_is_reported_as_missing(tmp_path, base, adapter, monkeypatch, typed, position):
    monkeypatch.chdir(tmp_path)
    args = [typed, adapter] if position == "base" else [base, typed]
    message = fails(
        tmp_path,
        "merge",
        *args,
        "-o",
        tmp_path / "out",
        expect=(f"error: {typed} does not exist; check the path.",),
    )
    assert "Hub" not in message and "HF_HUB_OFFLINE" not in message


@pytest.mark.parametrize("typed", ["models/llama-3", "models/llama-3@main"])
def test_an_org_name_beside_a_local_folder_says_first_it_is_not_local(tmp_path, adapter, typed):
    (tmp_path / "models").mkdir()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    environment |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [str(SCRIPT), "merge", typed, str(adapter), "-o", "out"],
        capture_output=True, text=True, env=environment, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(
        f"error: {typed} does not exist: the local folder models has no llama-3, and as a Hub id it is "
        "not in the local Hub cache"
    ), done.stderr
    assert done.stderr.rstrip().endswith("while HF_HUB_OFFLINE is set; check the path."), done.stderr
    assert "is not a local path" not in done.stderr  # one consistent sentence, not two glued together
    assert not (tmp_path / "out").exists()


def test_an_unreachable_hub_id_does_not_blame_offline_mode(tmp_path, adapter):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    environment |= {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [str(SCRIPT), "merge", "org/name", str(adapter), "-o", "out"],
        capture_output=True, text=True, env=environment, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert (
        "org/name is not a local path" in done.stderr and f"127.0.0.1:{port} cannot be reached" in done.stderr
    )
    assert "HF_HUB_OFFLINE" not in done.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("bf16", "BF16"), ("bfloat16", "BF16"), ("torch.bfloat16", "BF16"), ("BF16", "BF16"),
        ("fp16", "F16"), ("float16", "F16"), ("torch.float16", "F16"),
        ("fp32", "F32"), ("float32", "F32"), ("torch.float32", "F32"),
        (torch.bfloat16, "BF16"), (torch.float32, "F32"), ("auto", None), (None, None),
    ],
)  # fmt: skip
def test_dtype_spellings(spelling, expected):
    assert parse_dtype(spelling) == expected


def test_dtype_spellings_everywhere(tmp_path, base, adapter):
    done = run("merge", base, adapter, "-o", tmp_path / "m", "--dtype", "bf16")
    assert done.exit_code == 0, done.output
    assert {t.dtype for t in oracle.read_folder(tmp_path / "m").values()} == {torch.bfloat16}
    merge(base, [adapter], tmp_path / "m16", dtype=torch.float16)
    assert {t.dtype for t in oracle.read_folder(tmp_path / "m16").values()} == {torch.float16}
    done = run("strip", adapter, "-o", tmp_path / "s", "--dtype", "torch.bfloat16")
    assert done.exit_code == 0, done.output
    strip(adapter, tmp_path / "s32", dtype="fp16")
    assert {t.dtype for t in oracle.read_folder(tmp_path / "s32").values()} == {torch.float16}
    with pytest.raises(BonemergeError, match="unknown dtype 'int8'; choose auto, bf16, fp16 or fp32"):
        merge(base, [adapter], tmp_path / "never", dtype="int8")
    usage = run("merge", base, adapter, "-o", tmp_path / "never", "--dtype", "fp8")
    assert usage.exit_code == 2 and "unknown dtype 'fp8'" in usage.stderr
    assert not (tmp_path / "never").exists()


def test_every_name_the_readme_imports_exists():
    text = " ".join(README.read_text(encoding="utf-8").split())
    names = {
        name.strip()
        for found in re.findall(r"from bonemerge import (\w+(?: ?, ?\w+)*)", text)
        for name in found.split(",")
    }
    assert {"merge", "push", "verify"} <= names, names
    module = importlib.import_module("bonemerge")
    for name in sorted(names):
        assert getattr(module, name) is not None, name
    assert set(bonemerge.__all__) >= names


def test_a_tensor_larger_than_the_shard_size_is_noted(tmp_path, base, adapter):
    done = run("merge", base, adapter, "-o", tmp_path / "out", "--max-shard-size", "25kB")
    assert done.exit_code == 0, done.output
    notes = [line for line in done.stdout.splitlines() if "is larger than --max-shard-size" in line]
    # embed_tokens and lm_head are 100 x 64 fp32 = 25.6 kB each.
    assert notes == [
        f"note: {name} (25.6 kB) is larger than --max-shard-size (25.0 kB); it was written to a file of its "
        "own, which exceeds that size"
        for name in ("lm_head.weight", "model.embed_tokens.weight")
    ]
    assert "is larger than --max-shard-size" in (tmp_path / "out" / "README.md").read_text()


def test_summary_sizes_are_decimal_with_three_digits(tmp_path, base, adapter):
    done = run("merge", base, adapter, "-o", tmp_path / "out")
    assert done.exit_code == 0 and " 199 kB in " in done.stdout, done.stdout


def _commands() -> list[click.Command]:
    return [main, *main.commands.values()]


@pytest.mark.parametrize("command", _commands(), ids=lambda c: c.name)
def test_help_has_an_example_and_every_option_is_described(command):
    args = ["--help"] if command is main else [command.name, "--help"]
    shown = CliRunner().invoke(main, args)
    assert shown.exit_code == 0 and "Example" in shown.stdout, shown.stdout
    assert "bonemerge " + ("" if command is main else command.name) in shown.stdout.split("Example")[1]
    for option in command.params:
        if isinstance(option, click.Option):
            assert option.help, f"{command.name} {option.opts} has no help"
            if not option.is_flag and isinstance(option.default, str | int | float):
                assert option.show_default or "default" in option.help.lower(), option.opts


def test_help_says_what_sizes_and_regexes_mean():
    merge_help = " ".join(CliRunner().invoke(main, ["merge", "--help"]).stdout.split())
    assert "10⁹ bytes" in merge_help and "default: keep the base's files" in merge_help
    strip_help = " ".join(CliRunner().invoke(main, ["strip", "--help"]).stdout.split())
    assert "searched, not anchored" in strip_help
    verify_help = " ".join(CliRunner().invoke(main, ["verify", "--help"]).stdout.split())
    assert "--precision" in verify_help and "Compute dtype" in verify_help


def test_one_size_convention_everywhere():
    from tqdm import tqdm

    from bonemerge.units import PROGRESS_DIVISOR, format_count, format_size

    assert [format_size(n) for n in (512, 6_291_456, 1_070_000_000, 13_480_000_000, 99_960)] == [
        "512 B",
        "6.29 MB",
        "1.07 GB",
        "13.5 GB",
        "100 kB",
    ]
    assert format_count(124_439_808) == "124 M"
    # The progress bar divides by the same 1000, so it shows 1.07G where the summary shows 1.07 GB.
    assert tqdm.format_sizeof(1_070_000_000, divisor=PROGRESS_DIVISOR) == "1.07G"
