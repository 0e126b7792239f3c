"""Start-up: torch loads on its own thread while a command plans, checks and starts copying,
which only works while nothing before the first tensor to compute needs torch."""

from __future__ import annotations

import subprocess
import sys

import torch

from tests import toy

FIRST_TORCH_IMPORT = """
import sys, traceback
import bonemerge.cli as cli

assert "torch" not in sys.modules, "importing the command line already loaded torch"
first = []


class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not first:
            first.append(traceback.extract_stack())
        return None


sys.meta_path.insert(0, Watch())
cli.runtime.TorchLoading = lambda: None  # no background import: the run imports torch where it needs it
sys.argv = ["bonemerge", *sys.argv[1:]]
try:
    cli.main()
except SystemExit as exc:
    assert not exc.code, exc.code
frames = [f for f in reversed(first[0][:-1]) if not f.filename.startswith("<frozen")]
print(" <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.name}" for f in frames))
"""


def test_only_computing_a_tensor_needs_torch(tmp_path):
    """Reading headers and adapters, planning, fingerprints, the NaN check of the blocks, the
    output folder and the copies all run before torch is needed; the first import comes from
    the compute engine."""
    base = toy.write_base(tmp_path / "base", toy.base_tensors(torch.bfloat16), shards=2)
    adapter = toy.write_adapter(tmp_path / "bone", seed=1)
    done = subprocess.run(
        [sys.executable, "-c", FIRST_TORCH_IMPORT, "merge", base, adapter, "-o", tmp_path / "out", "-q"],
        capture_output=True,
        text=True,
        check=True,
    )
    chain = done.stdout.strip()
    assert chain.split(" <- ")[0].startswith("compute.py:<module>"), chain
    assert "engine.py:_computing" in chain, chain
    assert (tmp_path / "out" / "bonemerge.json").is_file()
