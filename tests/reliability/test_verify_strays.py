"""`verify` checks what a loader will load, not only what bonemerge wrote: weight files beside
the checked checkpoint are reported and fail the check, and the manifest cannot make verify
read anything outside the folder."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from tests import toy
from tests.cliutil import fails, run
from tests.reliability.hostile import save_single


@pytest.fixture
def merged(tmp_path, adapter):
    base = toy.write_base(tmp_path / "sharded", shards=2)
    out = tmp_path / "merged"
    assert run("merge", base, adapter, "-o", out).exit_code == 0
    assert run("verify", out, "--checksums").exit_code == 0
    assert run("verify", out, adapter, "--base", base).exit_code == 0
    return base, adapter, out


STRAYS = [
    "model.safetensors",
    "model-00001-of-00009.safetensors",
    "pytorch_model.bin",
    "pytorch_model-00001-of-00002.bin",
    "consolidated.00.pth",
    "weights.pth",
    "model.safetensors.index.json.bak.safetensors",
    "pytorch_model.bin.index.json",
]


@pytest.mark.parametrize("stray", STRAYS)
@pytest.mark.parametrize("mode", ["checksums", "base"])
def test_stray_weight_file_fails_verify(merged, mode, stray):
    base, adapter, out = merged
    if stray.endswith(".safetensors"):
        save_single(out / stray, toy.base_tensors())
    else:
        (out / stray).write_bytes(b"unmerged weights")
    args = ["--checksums"] if mode == "checksums" else [adapter, "--base", base]
    result = run("verify", out, *args, "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)["checksums" if mode == "checksums" else "tensors"]
    assert report["stray"] == [stray] and report["ok"] is False
    text = run("verify", out, *args)
    assert text.exit_code == 1 and f"stray: {stray}" in text.output and "Traceback" not in text.output


def test_other_files_are_not_strays(merged):
    """Only weight formats count: a note or tokenizer file added later does not fail verify."""
    base, adapter, out = merged
    (out / "notes.txt").write_text("fine")
    (out / "tokenizer.json").write_text("{}")
    (out / "original").mkdir()
    (out / "original" / "consolidated.00.pth").write_bytes(b"not loaded from a sub-folder")
    checksums = run("verify", out, "--checksums", "--json")
    assert checksums.exit_code == 0 and json.loads(checksums.stdout)["checksums"]["stray"] == []
    tensors = run("verify", out, adapter, "--base", base, "--json")
    assert tensors.exit_code == 0 and json.loads(tensors.stdout)["tensors"]["stray"] == []


@pytest.mark.parametrize(
    "name", ["../../../../etc/hostname", "/etc/hostname", "sub/../../outside.txt", "..\\outside.txt"]
)
def test_manifest_paths_outside_the_folder_are_refused(tmp_path, merged, name):
    _, _, out = merged
    (tmp_path / "outside.txt").write_text("secret")
    manifest = json.loads((out / "bonemerge.json").read_text())
    manifest["files"][name] = {"bytes": 6, "sha256": "0" * 64}
    (out / "bonemerge.json").write_text(json.dumps(manifest))
    fails(tmp_path, "verify", out, "--checksums", expect=("bonemerge.json", "outside the folder"))


def test_manifest_file_that_links_out_is_refused(tmp_path, merged):
    _, _, out = merged
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    manifest = json.loads((out / "bonemerge.json").read_text())
    (out / "README.md").unlink()
    os.symlink(secret, out / "README.md")
    manifest["files"]["README.md"] = {"bytes": 6, "sha256": hashlib.sha256(b"secret").hexdigest()}
    (out / "bonemerge.json").write_text(json.dumps(manifest))
    fails(tmp_path, "verify", out, "--checksums", expect=("README.md", "outside"))


def test_a_lone_file_beside_an_index_is_what_transformers_would_load(tmp_path, merged):
    """The case from the issue: unmerged weights dropped as model.safetensors beside the shards."""
    base, adapter, out = merged
    save_single(out / "model.safetensors", toy.base_tensors(torch.float32))
    for args in (["--checksums"], [adapter, "--base", base]):
        result = run("verify", out, *args)
        assert result.exit_code == 1 and "stray: model.safetensors" in result.output
