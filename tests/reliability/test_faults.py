"""Faults during a run: a full disk, a second run on the same output, inputs that change."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bonemerge import merge
from bonemerge.errors import OutputError
from tests.conftest import tree_digest
from tests.reliability.test_interrupts import finished_shards, staging, start, wait_for

SCRIPT = Path(sys.executable).with_name("bonemerge")


def no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not staging(out).exists()
    assert not (out.parent / f".{out.name}.bonemerge-lock").exists()


def test_file_size_limit_gives_a_clear_error_and_no_output(tmp_path, slow_inputs):
    """RLIMIT_FSIZE makes the kernel refuse writes past 20 MB with EFBIG, as a full quota would."""
    base, adapter = slow_inputs
    before = tree_digest(base)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 << 20, 20 << 20))

    out = tmp_path / "merged"
    done = subprocess.run(
        [str(SCRIPT), "merge", str(base), str(adapter), "-o", str(out)],
        capture_output=True,
        text=True,
        preexec_fn=limit,
    )
    assert done.returncode == 1, done.stderr
    assert "File too large; free some space or choose another --output location." in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    no_leftovers(out)
    assert tree_digest(base) == before


def test_no_space_left_mid_write(tmp_path, slow_inputs, monkeypatch, route):
    """ENOSPC from a write deep into the run (os.pwrite fails once the staging folder holds
    60 MB, as a filling disk would), written direct or through the page cache: one clear
    error, nothing left behind."""
    base, adapter = slow_inputs
    out = tmp_path / "merged"
    real_write = os.pwrite
    written = {"bytes": 0}

    def filling_disk(fd: int, data, offset: int) -> int:
        target = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if str(staging(out)) in target:
            written["bytes"] += len(data)
            if written["bytes"] > 60 << 20:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", filling_disk)
    with pytest.raises(OutputError, match="No space left on device; free some space"):
        merge(base, [adapter], out)
    assert written["bytes"] > 60 << 20
    no_leftovers(out)


def test_a_second_run_on_the_same_output_is_refused(tmp_path, slow_inputs):
    base, adapter = slow_inputs
    out = tmp_path / "merged"
    first = start("merge", base, adapter, "-o", out, "-q")
    wait_for(lambda: staging(out).exists(), first)
    first.send_signal(signal.SIGSTOP)  # hold it mid-run while the second one tries
    try:
        second = subprocess.run(
            [str(SCRIPT), "merge", str(base), str(adapter), "-o", str(out)], capture_output=True, text=True
        )
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1
    assert "another bonemerge run is writing" in second.stderr and second.stderr.count("\n") == 1
    assert first.wait(120) == 0, first.stderr.read()
    assert (out / "model.safetensors.index.json").is_file()


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path, slow_inputs):
    base, adapter = slow_inputs
    out = tmp_path / "merged"
    first = start("merge", base, adapter, "-o", out, "-q")
    wait_for(lambda: staging(out).exists(), first)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    assert start("merge", base, adapter, "-o", out, "-q").wait(120) == 0


def test_an_input_changing_during_the_run_fails_it(tmp_path, slow_inputs):
    """A base shard whose modification time moves while the merge runs (it was rewritten)."""
    base, adapter = slow_inputs
    out = tmp_path / "merged"
    last = sorted(base.glob("model-*.safetensors"))[-1]
    stat = last.stat()
    process = start("merge", base, adapter, "-o", out)
    try:
        wait_for(lambda: finished_shards(out) >= 1, process)
        os.utime(last, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        assert process.wait(120) == 1
        message = process.stderr.read()
        assert f"{last} changed while bonemerge was reading it" in message and message.count("\n") == 1
        no_leftovers(out)
    finally:
        os.utime(last, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        time.sleep(0)
