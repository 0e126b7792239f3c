"""`--resume` and the input watch identify input files by what cannot be put back from user
space: a base shard rewritten with the same size and its modification time restored is a
different input, and the shards a previous run made from it are redone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bonemerge import api
from bonemerge.checkpoint.reader import InputWatch
from bonemerge.errors import BonemergeError, CheckpointError
from bonemerge.output import companions
from tests import toy


def rewrite_keeping_size_and_mtime(path: Path) -> None:
    """Other values of the same shape and dtype: same size; then the old times put back."""
    before = path.stat()
    tensors = {name: torch.full_like(t, 0.25) for name, t in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def interrupted_run(base: Path, adapter: Path, out: Path, monkeypatch) -> None:
    """A --resume run that fails after every shard is durable, keeping them for the next one."""

    def fail(*args: object, **kwargs: object) -> None:
        raise BonemergeError("stopped on purpose after the shards")

    with monkeypatch.context() as patch:
        patch.setattr(companions, "write_companions", fail)
        with pytest.raises(BonemergeError, match="on purpose"):
            api.merge(base, [adapter], out, resume=True)
    assert not out.exists() and (out.parent / f".{out.name}.bonemerge-partial").is_dir()


def test_resume_redoes_shards_of_an_input_rewritten_with_same_size_and_mtime(tmp_path, monkeypatch):
    base = toy.write_base(tmp_path / "base", shards=2)
    adapter = toy.write_adapter(tmp_path / "adapter")
    out = tmp_path / "out"
    interrupted_run(base, adapter, out, monkeypatch)
    first = base / "model-00001-of-00002.safetensors"
    rewrite_keeping_size_and_mtime(first)

    report = api.merge(base, [adapter], out, resume=True)
    assert not [n for n in report.notes if n.startswith("reused")], report.notes
    fresh = api.merge(base, [adapter], tmp_path / "fresh")
    assert report.files == fresh.files
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()


def test_resume_still_reuses_shards_of_unchanged_inputs(tmp_path, monkeypatch):
    base = toy.write_base(tmp_path / "base", shards=2)
    adapter = toy.write_adapter(tmp_path / "adapter")
    out = tmp_path / "out"
    interrupted_run(base, adapter, out, monkeypatch)
    report = api.merge(base, [adapter], out, resume=True)
    assert "reused 2 finished shard(s) of an interrupted run (--resume)" in report.notes


def test_input_watch_sees_a_rewrite_that_restored_size_and_mtime(tmp_path):
    path = toy.write_base(tmp_path / "base") / "model.safetensors"
    watch = InputWatch([path])
    watch.check()
    rewrite_keeping_size_and_mtime(path)
    with pytest.raises(CheckpointError, match="changed while bonemerge was reading it"):
        watch.check()
