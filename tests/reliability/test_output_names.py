"""Output file names are planned once, before any I/O: a shard an index names like a file
bonemerge writes or copies beside the weights (the model card, the manifest, the config, a
companion such as notes.txt) is refused, for every command that writes a model."""

from __future__ import annotations

import pytest

from tests import toy
from tests.cliutil import fails, run
from tests.reliability.hostile import rename_shard, training_checkpoint

NAMES = ["notes.txt", "README.md", "bonemerge.json", "generation_config.json", "tokenizer.json", "model.bin"]


def _args(command: str, tmp_path, folder, adapter) -> list:
    if command == "merge":
        return ["merge", folder, adapter]
    if command == "unmerge":
        return ["unmerge", folder, adapter]
    return ["unload", folder]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("command", ["merge", "unmerge", "unload"])
def test_shard_named_like_a_companion_is_refused(tmp_path, command, name):
    if command == "unload":
        folder = training_checkpoint(tmp_path / "model")
    else:
        folder = toy.write_base(tmp_path / "model", shards=2)
    adapter = toy.write_adapter(tmp_path / "adapter")
    (folder / "notes.txt").write_text("the user's notes")
    if name == "notes.txt":
        (folder / "notes.txt").unlink()
    rename_shard(folder, "model-00002-of-00002.safetensors", name)
    args = _args(command, tmp_path, folder, adapter)
    fails(tmp_path, *args, "-o", tmp_path / "out", expect=(repr(name), "not a .safetensors file name"))


def test_companion_folder_named_like_an_output_shard_is_refused(tmp_path, adapter):
    """Re-sharding writes model.safetensors; a base sub-folder of that name would be copied over it."""
    folder = toy.write_base(tmp_path / "model", shards=2)
    (folder / "model.safetensors").mkdir()
    (folder / "model.safetensors" / "notes.txt").write_text("x")
    fails(
        tmp_path,
        "merge",
        folder,
        adapter,
        "-o",
        tmp_path / "out",
        "--max-shard-size",
        "10GB",
        expect=("would be copied over model.safetensors",),
    )


def test_a_shard_is_never_copied_as_a_companion(tmp_path, adapter):
    """Shards with ordinary names stay weights only: none of them is copied a second time."""
    folder = toy.write_base(tmp_path / "model", shards=2)
    rename_shard(folder, "model-00002-of-00002.safetensors", "weights-b.safetensors")
    result = run("merge", folder, adapter, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "README.md",
            "bonemerge.json",
            "config.json",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "weights-b.safetensors",
        ]
    )
