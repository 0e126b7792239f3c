"""`--resume` after a crash: finished shards are reused only when the plan is the same and their
bytes still match the recorded SHA-256, and the result is bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.reliability.test_interrupts import SCRIPT, finished_shards, staging, start, wait_for


@pytest.fixture(scope="module")
def reference(tmp_path_factory, slow_inputs) -> Path:
    """The same merge, never interrupted."""
    base, adapter = slow_inputs
    out = tmp_path_factory.mktemp("reference") / "merged"
    assert start("merge", base, adapter, "-o", out, "-q").wait(120) == 0
    return out


def crash_midway(base: Path, adapter: Path, out: Path, shards: int = 2) -> None:
    """SIGKILL once `shards` shards are durable: no cleanup can run, as after a power cut."""
    process = start("merge", base, adapter, "-o", out, "-q")
    wait_for(lambda: finished_shards(out) >= shards, process)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    assert staging(out).is_dir() and not out.exists()


def run_json(*args: object) -> dict:
    done = subprocess.run([str(SCRIPT), *map(str, args), "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def same_weights(a: Path, b: Path) -> bool:
    files = sorted(p.name for p in a.glob("*.safetensors"))
    return len(files) == 6 and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_resume_after_a_crash_reuses_finished_shards(tmp_path, slow_inputs, reference):
    base, adapter = slow_inputs
    out = tmp_path / "merged"
    crash_midway(base, adapter, out)
    report = run_json("merge", base, adapter, "-o", out, "--resume")
    reused = [n for n in report["notes"] if n.startswith("reused")]
    assert reused and int(reused[0].split()[1]) >= 2
    assert report["tensors_merged"] <= 4, "reused shards are not computed again"
    assert same_weights(out, reference)
    assert not staging(out).exists()
    manifest = json.loads((out / "bonemerge.json").read_text())
    assert manifest["files"] == json.loads((reference / "bonemerge.json").read_text())["files"] | {
        "README.md": manifest["files"]["README.md"]
    }


def test_without_resume_a_crashed_run_is_redone_from_scratch(tmp_path, slow_inputs, reference):
    base, adapter = slow_inputs
    out = tmp_path / "merged"
    crash_midway(base, adapter, out)
    report = run_json("merge", base, adapter, "-o", out)
    assert not [n for n in report["notes"] if n.startswith("reused")] and report["tensors_merged"] == 6
    assert [n for n in report["notes"] if n.endswith("--resume would have reused them")], report["notes"]
    assert same_weights(out, reference)


def test_a_different_plan_never_reuses_shards(tmp_path, slow_inputs):
    base, adapter = slow_inputs
    out = tmp_path / "merged"
    crash_midway(base, adapter, out)
    other = tmp_path / "other-adapter"
    other.mkdir()
    blocks = {k: v * 2 for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    save_file(blocks, other / "adapter_model.safetensors")
    (other / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    report = run_json("merge", base, other, "-o", out, "--resume")
    assert not [n for n in report["notes"] if n.startswith("reused")] and report["tensors_merged"] == 6
    fresh = tmp_path / "fresh"
    assert start("merge", base, other, "-o", fresh, "-q").wait(120) == 0
    assert same_weights(out, fresh)


def test_a_damaged_finished_shard_is_redone(tmp_path, slow_inputs, reference):
    base, adapter = slow_inputs
    out = tmp_path / "merged"
    crash_midway(base, adapter, out)
    records = (staging(out) / ".bonemerge-progress.jsonl").read_text().splitlines()
    damaged = staging(out) / json.loads(records[0])["file"]
    data = bytearray(damaged.read_bytes())
    data[-10] ^= 0xFF
    damaged.write_bytes(bytes(data))
    report = run_json("merge", base, adapter, "-o", out, "--resume")
    kept = len(records) - 1
    assert report["tensors_merged"] == 6 - kept, "the damaged shard is computed again"
    assert same_weights(out, reference)


def test_resume_after_an_interrupted_resume_run(tmp_path, slow_inputs, reference):
    base, adapter = slow_inputs
    out = tmp_path / "merged"
    process = start("merge", base, adapter, "-o", out, "-q", "--resume")
    wait_for(lambda: finished_shards(out) >= 2, process)
    process.send_signal(signal.SIGINT)
    assert process.wait(120) == 130
    assert not out.exists() and finished_shards(out) >= 2, "an interrupted --resume run keeps its shards"
    report = run_json("merge", base, adapter, "-o", out, "--resume")
    assert [n for n in report["notes"] if n.startswith("reused")]
    assert same_weights(out, reference)
    assert torch.equal(
        load_file(out / "model-00006-of-00006.safetensors")["model.layers.5.mlp.up_proj.weight"],
        load_file(reference / "model-00006-of-00006.safetensors")["model.layers.5.mlp.up_proj.weight"],
    )
