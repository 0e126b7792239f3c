"""A second signal while the first one's clean-up runs (Ctrl-C pressed twice, a supervisor
that sends SIGTERM after SIGINT): the clean-up still finishes, the exit code is the first
signal's, and the staging folder, the lock and the parent folders the run created are gone."""

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
from tests.reliability.test_interrupts import SCRIPT, finished_shards, staging, wait_for


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".bonemerge" in p.name)


def interrupted_twice(base: Path, adapter: Path, root: Path, second: int, delay: float) -> tuple:
    root.mkdir()
    out = root / "new" / "merged"
    process = subprocess.Popen(
        [str(SCRIPT), "merge", base, adapter, "-o", out, "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: finished_shards(out) >= 2, process)
    process.send_signal(signal.SIGINT)
    time.sleep(delay)
    process.send_signal(second)
    code = process.wait(60)
    return code, process.stderr.read(), leftovers(root), (root / "new").exists()


def test_a_second_signal_during_the_clean_up_of_a_large_output(tmp_path, slow_inputs):
    """The issue's case: 200 MB half written, Ctrl-C, then SIGINT or SIGTERM 0–0.3 s later."""
    cases = [(signal.SIGTERM, 0.0), (signal.SIGINT, 0.02), (signal.SIGTERM, 0.3)]
    with ThreadPoolExecutor(len(cases)) as pool:
        runs = list(
            pool.map(
                lambda case: interrupted_twice(*slow_inputs, tmp_path / f"run{case[0]}", *case[1]),
                enumerate(cases),
            )
        )
    for (second, delay), (code, message, left, parents) in zip(cases, runs, strict=True):
        where = f"second signal {signal.Signals(second).name} {delay} s later"
        assert code == 130, f"{where}: exit {code}: {message}"
        assert "interrupted" in message and "Traceback" not in message, f"{where}: {message}"
        assert not left and not parents, f"{where}: left {left}, parent folder kept: {parents}"


# The clean-up, made slow and hit by more signals while it runs: they must change nothing.
SLOW_CLEANUP = """
import os, signal, sys, time
sys.argv = ["bonemerge", *sys.argv[1:]]
import bonemerge.cli
from bonemerge.output import staging as output

real_remove, real_release = output.remove_tree, output._Lock.release
hit = set()


def more_signals(step):
    if step not in hit:
        hit.add(step)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)


def remove_tree(path):
    real_remove(path / "{victim}")  # half done when more signals arrive
    more_signals("remove")
    real_remove(path)


def release(lock):
    more_signals("release")
    real_release(lock)


output.remove_tree, output._Lock.release = remove_tree, release
bonemerge.cli.main()
"""


@pytest.mark.parametrize("resume", [False, True], ids=["plain", "resume"])
def test_signals_during_the_clean_up_change_nothing(tmp_path, resume):
    base = toy.write_base(tmp_path / "base", toy.base_tensors(torch.bfloat16), shards=2)
    adapter = toy.write_adapter(tmp_path / "bone", seed=1)
    out = tmp_path / "new" / "merged"
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLOW_CLEANUP.format(victim="model-00001-of-00002.safetensors"),
            "merge",
            base,
            adapter,
            "-o",
            out,
            "-q",
            *(["--resume"] if resume else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: staging(out).exists(), process)
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 130
    message = process.stderr.read()
    assert message.strip() == "interrupted; the output was left as it was.", message
    assert not out.exists()
    assert not (out.parent / ".merged.bonemerge-lock").exists()
    # --resume keeps the finished shards (and so their folder) for the next run
    assert staging(out).exists() == resume
    assert (tmp_path / "new").exists() == resume
