"""SIGINT and SIGTERM at every moment of a short merge, start-up included (torch loading on its
thread while the main thread imports and plans): every run ends within seconds with 130 or
143 and leaves nothing behind (no output, no staging folder, no lock, no parent folder it
created), or had finished before the signal arrived, or (a signal during the final rename)
says that the output it published is complete.

Start-up offsets count from the moment the process has installed its handlers (its SigCgt
mask in /proc): what comes before is the interpreter's own start-up, where the kernel's
default action applies (tested apart: the handlers come before anything else is imported).
Later offsets count from the moment the first shard is recorded as finished, to reach the
rest of the writing and the publishing of the output.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests import toy
from tests.reliability.test_interrupts import handlers_installed

SCRIPT = Path(sys.executable).with_name("bonemerge")
# (signal, moment, offset): 0.0–2.0 s of start-up in steps of 0.075 s, then 0–0.3 s after the
# first shard is finished in steps of 0.025 s; SIGINT and SIGTERM take turns.
_MOMENTS = [("handlers", i * 0.075) for i in range(27)] + [("shard", i * 0.025) for i in range(13)]
CASES = [(signal.SIGTERM if i % 2 else signal.SIGINT, *moment) for i, moment in enumerate(_MOMENTS)]
EXIT_WITHIN = 5.0  # seconds from the signal to the exit, whatever the process was doing
HANG = 60.0


@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("small")
    base = toy.write_base(root / "base", toy.base_tensors(torch.bfloat16), shards=2)
    return base, toy.write_adapter(root / "bone", seed=1)


def signal_run(base: Path, adapter: Path, root: Path, sig: int, moment: str, offset: float) -> dict:
    root.mkdir()
    out = root / "new" / "merged"
    staging = out.parent / f".{out.name}.bonemerge-partial"
    process = subprocess.Popen(
        [str(SCRIPT), "merge", base, adapter, "-o", out, "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not handlers_installed(process.pid) and process.poll() is None:
        time.sleep(0.001)
    progress = staging / ".bonemerge-progress.jsonl"
    while moment == "shard" and not (progress.exists() and progress.stat().st_size):
        if process.poll() is not None:
            break
        time.sleep(0.001)
    time.sleep(offset)
    sent = time.monotonic()
    process.send_signal(sig)
    try:
        code = process.wait(HANG)
    except subprocess.TimeoutExpired:
        process.kill()
        code = "hung"
    took = time.monotonic() - sent
    leftovers = sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".bonemerge" in p.name)
    return {
        "sig": sig,
        "moment": moment,
        "offset": offset,
        "code": code,
        "took": took,
        "stderr": process.stderr.read(),
        "published": (out / "bonemerge.json").is_file(),
        "out": out.exists(),
        "parents": (root / "new").exists(),
        "leftovers": leftovers,
    }


def check(run: dict) -> str | None:
    """What is wrong with one run, or None."""
    expected = 128 + run["sig"]
    word = "terminated" if run["sig"] == signal.SIGTERM else "interrupted"
    if run["code"] == 0:  # finished before the signal came
        return None if run["published"] and not run["leftovers"] else "exit 0 without a complete output"
    if run["code"] != expected:
        return f"exit {run['code']}, not {expected}"
    if run["took"] > EXIT_WITHIN:
        return f"took {run['took']:.1f} s to exit"
    if word not in run["stderr"] or "Traceback" in run["stderr"]:
        return f"said {run['stderr']!r}"
    if run["leftovers"]:
        return f"left {run['leftovers']}"
    if run["published"]:  # the signal came while or after the output was published
        return None if "already complete" in run["stderr"] else "published, but the message says otherwise"
    if run["out"] or run["parents"]:
        return "left the output or the parent folder it created"
    return None


def test_a_signal_at_any_moment_ends_the_run_cleanly(tmp_path, small_inputs):
    base, adapter = small_inputs
    with ThreadPoolExecutor(4) as pool:
        runs = list(
            pool.map(
                lambda case: signal_run(base, adapter, tmp_path / f"run{case[0]}", *case[1]),
                enumerate(CASES),
            )
        )
    failures = [
        f"{signal.Signals(r['sig']).name} {r['offset']:.2f} s after {r['moment']}: {problem}"
        for r in runs
        if (problem := check(r))
    ]
    assert not failures, "\n".join(failures)
    interrupted = [r for r in runs if r["code"] != 0]
    assert len(interrupted) >= len(runs) // 2, "most signals should reach a running merge"
    print(f"slowest exit after a signal: {max(r['took'] for r in interrupted):.2f} s")


PROBE = """
import runpy, signal, sys


class Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "click":
            handler = signal.getsignal(signal.SIGTERM)
            print("click imported with SIGTERM", "default" if handler in (signal.SIG_DFL, None) else "caught")
            sys.meta_path.remove(self)
        return None


sys.meta_path.insert(0, Probe())
sys.argv = [sys.argv[1], "--version"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_the_handlers_come_before_any_other_import():
    """The `bonemerge` script catches signals before it imports click and the rest of the
    command line, so a signal at start-up never meets Python's default (a traceback, or death
    by SIGTERM with exit -15)."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(SCRIPT)], capture_output=True, text=True, check=True
    )
    assert "click imported with SIGTERM caught" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_the_moment_the_handlers_are_in_place(tmp_path, small_inputs, sig, code):
    run = signal_run(*small_inputs, tmp_path / "run", sig, "handlers", 0.0)
    assert run["code"] == code and not check(run), run
