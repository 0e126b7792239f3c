"""SIGINT and SIGTERM at several moments of a real merge process: the output path is left as it
was, the staging folder and lock are gone, and the exit code is 130 or 143."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("bonemerge")


def start(*args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def staging(output: Path) -> Path:
    return output.parent / f".{output.name}.bonemerge-partial"


def finished_shards(output: Path) -> int:
    progress = staging(output) / ".bonemerge-progress.jsonl"
    try:
        return len(progress.read_text().splitlines())
    except FileNotFoundError:
        return 0


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the moment to interrupt it"
        assert time.monotonic() < deadline, "the moment to interrupt never came"
        time.sleep(0.002)


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def after(seconds: float) -> Callable[[], bool]:
    began = time.monotonic()
    return lambda: time.monotonic() - began > seconds


MOMENTS: dict[str, Callable[[Path], Callable[[], bool]]] = {
    # torch is still being imported: nothing exists yet
    "importing": lambda out: after(0.4),
    # the staging folder exists, the first shard is being written
    "first-shard": lambda out: lambda: staging(out).exists(),
    # two shards are durable, four to go
    "mid-run": lambda out: lambda: finished_shards(out) >= 2,
}


@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
@pytest.mark.parametrize("moment", list(MOMENTS))
@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "overwrite"])
def test_signal_leaves_the_output_as_it_was(tmp_path, slow_inputs, sig, code, moment, previous):
    base, adapter = slow_inputs
    out = tmp_path / "merged"
    before = None
    if previous:
        assert start("merge", base, adapter, "-o", out, "-q").wait(120) == 0
        before = digest(out)
    process = start("merge", base, adapter, "-o", out, "-q", *(["--overwrite"] if previous else []))
    wait_for(MOMENTS[moment](out), process)
    process.send_signal(sig)
    assert process.wait(120) == code, process.stderr.read()
    message = process.stderr.read()
    assert ("terminated" if code == 143 else "interrupted") in message and "Traceback" not in message
    if previous:
        assert digest(out) == before, "the previous complete output was changed"
    else:
        assert not out.exists()
    assert not staging(out).exists(), "the staging folder survived"
    assert not (tmp_path / ".merged.bonemerge-lock").exists()
