"""`strip` says what it did (filtered, cast, converted), in its report and its card, and writes a
bonemerge.json with checksums and history, so `verify --checksums` works on its output."""

from __future__ import annotations

import json

import pytest

from bonemerge import strip
from bonemerge.adapters import load_adapter
from bonemerge.output.history import fingerprint
from tests.cliutil import run
from tests.test_new_user import training_checkpoint


def heading(folder) -> str:
    return next(line for line in (folder / "README.md").read_text().splitlines() if line.startswith("# "))


@pytest.mark.parametrize(
    ("options", "title", "converted", "notes"),
    [
        (
            {"to": "miss"},
            "# Converted adapter from adapter",
            4,
            ["converted Bone to MiSS: 4 block keys renamed"],
        ),
        ({"layers": "0"}, "# Reduced adapter from adapter", 0, ["kept 2 of 4 blocks"]),
        ({"dtype": "bf16"}, "# Copied adapter from adapter in bfloat16", 4, ["cast 4 tensors to bfloat16"]),
        (
            {"layers": "1", "to": "miss", "dtype": "fp16"},
            "# Reduced and converted adapter from adapter in float16",
            2,
            ["kept 2 of 4 blocks", "cast 2 tensors to float16", "converted Bone to MiSS: 2 block keys"],
        ),
    ],
    ids=["to-miss", "layers", "cast", "all"],
)
def test_report_and_card_say_what_was_done(tmp_path, adapter, options, title, converted, notes):
    report = strip(adapter, tmp_path / "out", **options)
    assert heading(tmp_path / "out") == title
    assert report.tensors_converted == converted
    card = (tmp_path / "out" / "README.md").read_text()
    for note in notes:
        assert any(line.startswith(note) for line in report.notes), report.notes
        assert f"- {note}" in card
    if "layers" not in options:
        assert "Reduced" not in card and "kept 4 of 4 blocks" in report.notes


def test_stripped_adapter_has_checksums_and_history(tmp_path, adapter):
    done = run("strip", adapter, "--layers", "0", "-o", tmp_path / "out", "--json")
    assert done.exit_code == 0, done.output
    assert "bonemerge.json" in json.loads(done.stdout)["files"]
    manifest = json.loads((tmp_path / "out" / "bonemerge.json").read_text())
    assert set(manifest["files"]) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    (entry,) = manifest["history"]
    assert entry["operation"] == "strip"
    assert entry["adapters"][0]["fingerprint"] == fingerprint(load_adapter(adapter))
    assert entry["result"]["fingerprint"] == fingerprint(load_adapter(tmp_path / "out"))
    intact = run("verify", tmp_path / "out", "--checksums")
    assert intact.exit_code == 0 and "3 files intact" in intact.stdout, intact.output
    weights = tmp_path / "out" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    broken = run("verify", tmp_path / "out", "--checksums")
    assert broken.exit_code == 1 and "differs: adapter_model.safetensors" in broken.stdout
    strip(tmp_path / "out", tmp_path / "again", to="miss")
    history = json.loads((tmp_path / "again" / "bonemerge.json").read_text())["history"]
    assert [op["operation"] for op in history] == ["strip", "strip"], "the input's history is kept"


def test_extracting_from_a_training_checkpoint_says_so(tmp_path):
    checkpoint = training_checkpoint(tmp_path / "checkpoint-500")
    report = strip(checkpoint, tmp_path / "out")
    assert heading(tmp_path / "out") == "# Extracted adapter from checkpoint-500"
    assert report.notes[0] == "extracted the adapter from a full PEFT training checkpoint"
