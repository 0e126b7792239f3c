"""Every output file's XXH3-128 digest is recorded in bonemerge.json; `verify --checksums` checks
them (and still checks the BLAKE3 and SHA-256 digests earlier versions recorded)."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest
from blake3 import blake3
from xxhash import xxh3_128

from tests import toy
from tests.reliability.test_interrupts import SCRIPT


def verify(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), "verify", *map(str, args)], capture_output=True, text=True)


def test_manifest_records_every_file(tmp_path):
    base = toy.write_base(tmp_path / "base", shards=3)
    (base / "tokenizer_config.json").write_text("{}")
    adapter = toy.write_adapter(tmp_path / "adapter")
    assert subprocess.run([str(SCRIPT), "merge", base, adapter, "-o", tmp_path / "out"]).returncode == 0
    out = tmp_path / "out"
    files = json.loads((out / "bonemerge.json").read_text())["files"]
    on_disk = {p.name for p in out.iterdir() if p.name != "bonemerge.json"}
    assert set(files) == on_disk and len(on_disk) == 7
    for name, record in files.items():
        content = (out / name).read_bytes()
        assert record == {"bytes": len(content), "xxh3_128": xxh3_128(content).hexdigest()}
    result = verify(out, "--checksums")
    assert result.returncode == 0 and "7 files intact" in result.stdout


@pytest.mark.parametrize(
    "algorithm,hexdigest",
    [
        ("blake3", lambda data: blake3(data).hexdigest()),
        ("sha256", lambda data: hashlib.sha256(data).hexdigest()),
    ],
)
def test_manifests_of_earlier_versions_still_verify(tmp_path, algorithm, hexdigest):
    base = toy.write_base(tmp_path / "base", shards=2)
    adapter = toy.write_adapter(tmp_path / "adapter")
    assert subprocess.run([str(SCRIPT), "merge", base, adapter, "-o", tmp_path / "out"]).returncode == 0
    out = tmp_path / "out"
    manifest = json.loads((out / "bonemerge.json").read_text())
    manifest["files"] = {
        name: {"bytes": record["bytes"], algorithm: hexdigest((out / name).read_bytes())}
        for name, record in manifest["files"].items()
    }
    (out / "bonemerge.json").write_text(json.dumps(manifest))
    assert verify(out, "--checksums").returncode == 0
    first = sorted(manifest["files"])[0]
    manifest["files"][first][algorithm] = "0" * 64
    (out / "bonemerge.json").write_text(json.dumps(manifest))
    damaged = verify(out, "--checksums")
    assert damaged.returncode == 1 and f"differs: {first}" in damaged.stdout, damaged.stdout


def test_checksums_catch_damage_and_loss(tmp_path):
    base = toy.write_base(tmp_path / "base", shards=2)
    adapter = toy.write_adapter(tmp_path / "adapter")
    subprocess.run([str(SCRIPT), "merge", base, adapter, "-o", tmp_path / "out"], check=True)
    out = tmp_path / "out"
    shard = out / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    (out / "config.json").unlink()
    result = verify(out, "--checksums", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)["checksums"]
    assert report["differing"] == ["model-00002-of-00002.safetensors"] and report["missing"] == [
        "config.json"
    ]
    both = verify(out, adapter, "--base", base, "--checksums")
    assert both.returncode == 1 and "differs: model-00002-of-00002.safetensors" in both.stdout


def test_checksums_need_a_manifest(tmp_path):
    base = toy.write_base(tmp_path / "base")
    result = verify(base, "--checksums")
    assert result.returncode == 1 and "has no bonemerge.json" in result.stderr
    usage = verify(base)
    assert usage.returncode == 2 and "--checksums" in usage.stderr
