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


def handlers_installed(pid: int) -> bool:
    """SIGTERM is caught (Python itself catches only SIGINT): bonemerge's handlers are in place.
    Before that, the interpreter is starting (~40 ms, far more on a loaded machine), and the
    system's default applies, as to any program."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


def after(seconds: float, pid: int) -> Callable[[], bool]:
    """`seconds` after the process installed its handlers."""
    began: list[float] = []

    def ready() -> bool:
        if not began and handlers_installed(pid):
            began.append(time.monotonic())
        return bool(began) and time.monotonic() - began[0] > seconds

    return ready


MOMENTS: dict[str, Callable[[Path, int], Callable[[], bool]]] = {
    # torch is still being imported: nothing exists yet
    "importing": lambda out, pid: after(0.4, pid),
    # the staging folder exists, the first shard is being written
    "first-shard": lambda out, pid: lambda: staging(out).exists(),
    # two shards are durable, four to go
    "mid-run": lambda out, pid: lambda: finished_shards(out) >= 2,
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
    wait_for(MOMENTS[moment](out, process.pid), process)
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
