"""Streaming holds for every command: peak memory stays far below the checkpoint's size.

Each command runs as its own process on a 400 MB bf16 checkpoint. Holding the weights would
need at least 400 MB on top of the ~250 MB that importing torch costs, so a peak under
LIMIT shows the data went through in bounded chunks. (Timing and the 135M/1B/7B figures
belong to scripts/bench.py, not to unit tests.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

SCRIPT = Path(sys.executable).with_name("bonemerge")
LIMIT = 500 * 2**20
LAYERS, SIZE, RANK = 12, 4096, 64

# The launcher is a fresh small process, so the measured command is not forked from pytest:
# a forked child starts with its parent's peak resident size, which would hide the figure.
LAUNCHER = (
    "import os, subprocess, sys\n"
    "child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(child.pid, 0)\n"
    "print(usage.ru_maxrss * 1024)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def peak_rss(*args: object, command: tuple[str, ...] = (str(SCRIPT),)) -> int:
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *command, *map(str, args)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("memory")
    generator = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.up_proj" for i in range(LAYERS)]
    weights = {n + ".weight": torch.randn(SIZE, SIZE, generator=generator).to(torch.bfloat16) for n in names}
    blocks = {n: torch.randn(RANK, SIZE, generator=generator) * 0.01 for n in names}
    (root / "base").mkdir()
    save_file(weights, root / "base" / "model.safetensors", metadata={"format": "pt"})
    (root / "adapter").mkdir()
    save_file(
        {f"base_model.model.{n}.bone_block": b for n, b in blocks.items()},
        root / "adapter" / "adapter_model.safetensors",
    )
    config = {"peft_type": "BONE", "r": RANK, "init_weights": True, "target_modules": ["up_proj"]}
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    full = {f"base_model.model.{n}.base_layer.weight": weights[n + ".weight"] for n in names}
    full |= {f"base_model.model.{n}.bone_block.default": b for n, b in blocks.items()}
    (root / "training").mkdir()
    save_file(full, root / "training" / "model.safetensors", metadata={"format": "pt"})
    return root


def test_every_command_streams(big, tmp_path):
    size = (big / "base" / "model.safetensors").stat().st_size
    assert size > 400e6
    peaks = {
        "merge": peak_rss("merge", big / "base", big / "adapter", "-o", tmp_path / "merged", "-q"),
        "unmerge": peak_rss("unmerge", tmp_path / "merged", big / "adapter", "-o", tmp_path / "back", "-q"),
        "verify": peak_rss("verify", tmp_path / "merged", big / "adapter", "--base", big / "base"),
        "merge-training": peak_rss("merge", big / "training", "-o", tmp_path / "merged2", "-q"),
        "unload": peak_rss("unload", big / "training", "-o", tmp_path / "unloaded", "-q"),
    }
    assert all(peak < LIMIT for peak in peaks.values()), {k: f"{v / 2**20:.0f} MiB" for k, v in peaks.items()}
    assert (tmp_path / "merged2" / "model.safetensors").read_bytes() == (
        tmp_path / "merged" / "model.safetensors"
    ).read_bytes()


def test_the_measure_would_see_a_non_streaming_process(big):
    """Control: a process that loads the checkpoint whole is measured above the limit."""
    path = str(big / "base" / "model.safetensors")
    load = f"import safetensors.torch as st; tensors = st.load(open({path!r}, 'rb').read())"
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER, sys.executable, "-c", load], capture_output=True, text=True
    )
    assert done.returncode == 0 and int(done.stdout) > LIMIT
