"""Inputs that used to end in a traceback: each gives one sentence and exit 1, writes nothing
and changes no input."""

from __future__ import annotations

import errno
import json
import os
import struct

import pytest

from tests import toy
from tests.cliutil import fails, run


def test_fifo_as_the_model_path(tmp_path, adapter):
    os.mkfifo(tmp_path / "pipe")
    fails(tmp_path, "merge", tmp_path / "pipe", adapter, "-o", tmp_path / "out", expect=("FIFO",))
    fails(tmp_path, "merge", tmp_path / "pipe", "-o", tmp_path / "out", expect=("FIFO",))
    fails(tmp_path, "inspect", tmp_path / "pipe", expect=("FIFO", "not a model folder"))


def test_inspect_dev_null_says_what_it_is(tmp_path):
    fails(tmp_path, "inspect", "/dev/null", expect=("/dev/null is a character device", "not a model folder"))


@pytest.mark.parametrize("manifest", ["[1, 2]", '"text"', '{"bonemerge": "0.1", "files": [1]}', "{}"])
def test_manifest_that_is_not_a_bonemerge_manifest(tmp_path, base, adapter, manifest):
    out = tmp_path / "merged"
    assert run("merge", base, adapter, "-o", out).exit_code == 0
    (out / "bonemerge.json").write_text(manifest)
    fails(tmp_path, "verify", out, "--checksums", expect=("bonemerge.json",))
    info = run("inspect", out, "--json")
    assert info.exit_code == 0 and json.loads(info.stdout)["kind"] == "model", info.output


@pytest.mark.parametrize("value", [5, "x", [], [5], None, {"a": 1}])
def test_config_with_odd_architectures(tmp_path, base, value):
    config = json.loads((base / "config.json").read_text()) | {"architectures": value}
    (base / "config.json").write_text(json.dumps(config))
    result = run("inspect", base, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["architecture"] in ("llama", "x")


@pytest.mark.parametrize("which", ["config.json", "model.safetensors.index.json", "adapter_config.json"])
def test_json_nested_200000_deep(tmp_path, adapter, which):
    base = toy.write_base(tmp_path / "base", shards=2)
    folder = adapter if which == "adapter_config.json" else base
    (folder / which).write_text("[" * 200_000 + "]" * 200_000)
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=(which,))


def test_nested_manifest(tmp_path, base, adapter):
    out = tmp_path / "merged"
    assert run("merge", base, adapter, "-o", out).exit_code == 0
    (out / "bonemerge.json").write_text('{"files": ' + "[" * 200_000 + "]" * 200_000 + "}")
    fails(tmp_path, "verify", out, "--checksums", expect=("bonemerge.json", "nested too deeply"))
    assert run("inspect", out).exit_code == 0


def test_tensor_name_with_a_lone_surrogate(tmp_path, adapter):
    base = toy.write_base(tmp_path / "base")
    data = (base / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + length].replace(b'"model.norm.weight"', b'"model.norm\\ud800"')
    (base / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data[8 + length :])
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=("surrogate",))
    fails(tmp_path, "inspect", base, expect=("surrogate",))


def test_output_name_too_long(tmp_path, base, adapter):
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / ("o" * 245), expect=("too long",))
    assert not list(tmp_path.glob("o*"))


def test_output_parent_not_writable(tmp_path, base, adapter, monkeypatch):
    """Simulated (tests may run as root, which ignores permissions): the lock cannot be created."""
    real_open = os.open

    def refusing_open(path, flags, *args):
        if str(path).endswith(".bonemerge-lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=("Permission denied", "writable"))


@pytest.mark.parametrize("reference", ["a--b/c", "org/name..x", "org/name-", "o/" + "n" * 100])
def test_hub_ids_the_hub_would_refuse(tmp_path, adapter, reference):
    fails(tmp_path, "merge", reference, adapter, "-o", tmp_path / "out", expect=(reference, "Hub repo id"))


def test_adapter_naming_an_invalid_hub_base(tmp_path):
    adapter = toy.write_adapter(tmp_path / "adapter", config={"base_model_name_or_path": "evil/x..y"})
    fails(tmp_path, "merge", adapter, "-o", tmp_path / "out", expect=("evil/x..y", "Hub repo id"))


def test_push_to_an_invalid_repo_id(tmp_path, base, adapter):
    fails(
        tmp_path,
        "merge",
        base,
        adapter,
        "-o",
        tmp_path / "out",
        "--push-to-hub",
        "a--b/c",
        expect=("a--b/c", "not a Hub repo id"),
    )


@pytest.mark.parametrize("device", ["meta", "xpu", "mps", "cuda:x", "cpu:0", "", "CPU"])
def test_devices_other_than_cpu_and_cuda(tmp_path, base, adapter, device):
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", "--device", device, expect=("device",))
    out = tmp_path / "merged"
    if not out.exists():
        assert run("merge", base, adapter, "-o", out).exit_code == 0
    fails(tmp_path, "verify", out, adapter, "--base", base, "--device", device, expect=("device",))
