"""Untouched tensors are copied ahead of the writer, on a thread of their own: the bytes land
where the header says whichever copy path the filesystem allows, and a failure on that thread
is one clear error with nothing left behind."""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from bonemerge import merge
from bonemerge.checkpoint import direct as direct_module
from bonemerge.checkpoint import writer as writer_module
from bonemerge.errors import BonemergeError, OutputError
from bonemerge.run.engine import Engine
from tests import toy
from tests.conftest import tree_digest
from tests.reliability.test_faults import no_leftovers


@pytest.fixture(scope="module")
def mostly_untouched(tmp_path_factory) -> tuple[Path, Path]:
    """A base whose bytes are mostly tensors the adapter leaves alone (a large embedding and
    LM head around small targeted projections), in three shards."""
    root = tmp_path_factory.mktemp("untouched")
    tensors = toy.base_tensors(torch.bfloat16)
    generator = torch.Generator().manual_seed(5)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = torch.randn(20_000, 64, generator=generator).to(torch.bfloat16)
    return toy.write_base(root / "base", tensors, shards=3), toy.write_adapter(root / "bone", seed=2)


def weights(folder: Path) -> dict[str, str]:
    return {name: digest for name, digest in tree_digest(folder).items() if name.endswith(".safetensors")}


def refused(*args):
    raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))


def page_cache_only(monkeypatch):
    monkeypatch.setenv("BONEMERGE_NO_DIRECT_IO", "1")


def test_every_copy_path_writes_the_same_files(tmp_path, mostly_untouched, monkeypatch):
    """Direct (the tensors' whole blocks read into a buffer and written with O_DIRECT, their
    edges with the stream), in the kernel (`copy_file_range`, through the page cache), through
    a buffer when the kernel refuses (EXDEV, as across filesystems), and in pieces smaller than
    a tensor: identical outputs."""
    base, adapter = mostly_untouched
    merge(base, [adapter], tmp_path / "direct")
    monkeypatch.setattr(writer_module, "_COPY_PIECE", 4096)
    merge(base, [adapter], tmp_path / "direct-pieces")
    page_cache_only(monkeypatch)
    merge(base, [adapter], tmp_path / "pieces")
    monkeypatch.undo()
    page_cache_only(monkeypatch)
    merge(base, [adapter], tmp_path / "kernel")
    monkeypatch.setattr(os, "copy_file_range", refused)
    merge(base, [adapter], tmp_path / "buffered")
    expected = weights(tmp_path / "kernel")
    assert len(expected) == 3
    for other in ("direct", "direct-pieces", "pieces", "buffered"):
        assert weights(tmp_path / other) == expected, other


@pytest.mark.parametrize("path", ["direct", "copy_file_range", "pwrite"])
def test_a_full_disk_while_copying_ahead(tmp_path, mostly_untouched, monkeypatch, path):
    """ENOSPC on the copy-ahead thread, in a direct write, the kernel copy or the buffered one:
    the run fails with the one-sentence error of a full disk, and leaves nothing behind."""
    base, adapter = mostly_untouched
    out = tmp_path / "merged"
    calls = {"n": 0}
    monkeypatch.setattr(writer_module, "_COPY_PIECE", 64 << 10)

    def full(*args):
        if threading.current_thread().name == "bonemerge-copy-ahead":
            calls["n"] += 1
            if calls["n"] > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args)

    if path != "direct":
        page_cache_only(monkeypatch)
    if path == "pwrite":
        monkeypatch.setattr(os, "copy_file_range", refused)
    real = getattr(os, "pwrite" if path == "direct" else path)
    monkeypatch.setattr(os, "pwrite" if path == "direct" else path, full)
    with pytest.raises(OutputError, match="No space left on device; free some space") as caught:
        merge(base, [adapter], out)
    assert "\n" not in str(caught.value)
    assert calls["n"] > 3
    no_leftovers(out)


def test_an_interrupt_stops_the_copy_ahead_thread(tmp_path, mostly_untouched, monkeypatch, route):
    """Ctrl-C while untouched tensors are still being copied ahead (slowly, here): the copy
    stops within a piece, the thread is gone, and nothing is left behind."""
    base, adapter = mostly_untouched
    out = tmp_path / "merged"
    monkeypatch.setattr(writer_module, "_COPY_PIECE", 4096)
    owner, name = (direct_module.BlockStream, "copy_blocks") if route == "direct" else (os, "copy_file_range")
    real_copy = getattr(owner, name)
    copies = {"n": 0}

    def slow_copy(*args):
        copies["n"] += 1
        time.sleep(0.01)
        return real_copy(*args)

    monkeypatch.setattr(owner, name, slow_copy)
    real_stream = Engine.stream

    def interrupted(self):
        for number, chunk in enumerate(real_stream(self)):
            if number == 2:
                raise KeyboardInterrupt
            yield chunk

    monkeypatch.setattr(Engine, "stream", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge(base, [adapter], out)
    assert not any(t.name == "bonemerge-copy-ahead" for t in threading.enumerate())
    pieces = 2 * 20_000 * 64 * 2 // 4096
    assert 0 < copies["n"] < pieces, "the copy ran to the end instead of stopping"
    no_leftovers(out)


def test_an_input_truncated_under_the_copy_is_one_clear_error(tmp_path, mostly_untouched, monkeypatch, route):
    """An input shard cut short just before its untouched tensors are copied ahead: one
    sentence naming what happened, nothing written (never a shard with missing bytes)."""
    base, adapter = mostly_untouched
    copy = tmp_path / "base"
    shutil.copytree(base, copy)
    out = tmp_path / "merged"
    real_place = writer_module.ShardWriter.place

    def place(self, name, src_fd, offset, stop=lambda: False):
        fd = os.open(os.readlink(f"/proc/self/fd/{src_fd}"), os.O_WRONLY)
        os.ftruncate(fd, offset + 10)
        os.close(fd)
        return real_place(self, name, src_fd, offset, stop)

    monkeypatch.setattr(writer_module.ShardWriter, "place", place)
    with pytest.raises(BonemergeError) as caught:
        merge(copy, [adapter], out)
    message = str(caught.value)
    assert "\n" not in message and ("ended" in message or "changed" in message), message
    no_leftovers(out)
