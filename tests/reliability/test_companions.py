"""Companion files come from inside the inputs and are regular files: a link that leaves its
folder, a FIFO or a device is left out with a note in the report (never read), a Hub cache
snapshot still works (its files are links into the repo's blobs), and the free-space check
counts the companions."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from bonemerge.checkpoint import open_checkpoint
from bonemerge.output.companions import plan_companions
from tests import toy
from tests.cliutil import fails, run
from tests.hub_cache import cache_repo


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "private" / "id_rsa"
    path.parent.mkdir()
    path.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    return path


def merged_json(*args: object) -> dict:
    result = run("merge", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_base_companion_linking_out_is_left_out(tmp_path, base, adapter, secret):
    os.symlink(secret, base / "notes.txt")
    os.symlink(os.path.relpath(secret, base / "1_Pooling"), _mkdir(base / "1_Pooling") / "config.json")
    report = merged_json(base, adapter, "-o", tmp_path / "out")
    out = tmp_path / "out"
    assert not (out / "notes.txt").exists() and not (out / "1_Pooling" / "config.json").exists()
    assert any(f"left out {base / 'notes.txt'}: it is a link to {secret}" in n for n in report["notes"])
    assert "notes.txt" not in json.loads((out / "bonemerge.json").read_text())["files"]
    assert not any("OPENSSH" in p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())


def test_adapter_tokenizer_linking_out_is_left_out(tmp_path, base, adapter, secret):
    (adapter / "tokenizer.json").write_text('{"model": {}}')
    os.symlink(secret, adapter / "tokenizer_config.json")
    report = merged_json(base, adapter, "-o", tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"model": {}}'
    assert not (tmp_path / "out" / "tokenizer_config.json").exists()
    assert any("tokenizer_config.json: it is a link to" in n for n in report["notes"])


def test_config_linking_out_is_left_out(tmp_path, base, adapter):
    outside = tmp_path / "other-config.json"
    outside.write_text(json.dumps({"model_type": "llama", "secret": "do not copy"}))
    (base / "config.json").unlink()
    os.symlink(outside, base / "config.json")
    report = merged_json(base, adapter, "-o", tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()
    assert any("config.json: it is a link to" in n for n in report["notes"])


def test_links_inside_the_folder_are_followed(tmp_path, base, adapter):
    _mkdir(base / "extra").joinpath("chat_template.jinja").write_text("{{ messages }}")
    os.symlink("extra/chat_template.jinja", base / "chat_template.jinja")
    merged_json(base, adapter, "-o", tmp_path / "out")
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == "{{ messages }}"
    assert not (tmp_path / "out" / "chat_template.jinja").is_symlink()


@pytest.mark.parametrize("special", ["fifo", "dev-zero", "dev-null", "folder-link"])
def test_special_files_are_left_out(tmp_path, base, adapter, special):
    target = base / "stream.txt"
    if special == "fifo":
        os.mkfifo(target)
    elif special == "dev-zero":
        os.symlink("/dev/zero", target)
    elif special == "dev-null":
        os.symlink("/dev/null", target)
    else:
        os.symlink(tmp_path / "private-folder", target)
        _mkdir(tmp_path / "private-folder").joinpath("data.txt").write_text("private")
    report = merged_json(base, adapter, "-o", tmp_path / "out")
    assert not (tmp_path / "out" / "stream.txt").exists()
    assert any(n.startswith(f"left out {target}: it is") for n in report["notes"]), report["notes"]


def test_hub_snapshot_companions_are_copied_and_confined(tmp_path, adapter, secret):
    source = toy.write_base(tmp_path / "src" / "base", shards=2)
    (source / "tokenizer_config.json").write_text('{"chat_template": "hub"}')
    commit = cache_repo(tmp_path / "hf", "org/base", source)
    repo = tmp_path / "hf" / "hub" / "models--org--base"
    snapshot = repo / "snapshots" / commit
    assert (snapshot / "tokenizer_config.json").is_symlink()
    os.symlink(secret, snapshot / "notes.txt")
    report = merged_json(snapshot, adapter, "-o", tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"chat_template": "hub"}'
    assert (tmp_path / "out" / "config.json").is_file()
    assert not (tmp_path / "out" / "notes.txt").exists()
    assert any(f"outside {repo}" in n for n in report["notes"])


def test_free_space_check_counts_companions(tmp_path, base, adapter, monkeypatch):
    (base / "big-notes.txt").write_bytes(b"x" * (8 << 20))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=(64 << 20) + (2 << 20)))
    fails(tmp_path, "merge", base, adapter, "-o", tmp_path / "out", expect=(" free but the output needs",))
    (base / "big-notes.txt").unlink()
    assert run("merge", base, adapter, "-o", tmp_path / "out").exit_code == 0


def test_companion_bytes_are_planned(tmp_path, base, adapter):
    (base / "notes.txt").write_bytes(b"n" * 1000)
    _mkdir(base / "2_Dense").joinpath("config.json").write_bytes(b"{}")
    checkpoint = open_checkpoint(base)
    planned = plan_companions(checkpoint, [], ["model.safetensors", "README.md", "bonemerge.json"])
    assert planned.bytes == 1002 and planned.config is not None and planned.notes == ()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
