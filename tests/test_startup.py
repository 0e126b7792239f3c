"""Start-up: torch loads on its own thread while a command plans, checks and starts copying,
which only works while nothing before the first tensor to compute needs torch."""

from __future__ import annotations

import subprocess
import sys

import torch
from safetensors.torch import load_file

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


def test_computing_starts_while_the_untouched_tensors_before_it_are_copied(tmp_path, monkeypatch):
    """A dozen untouched tensors come before the first one to compute, and the writer is held
    on the first of them until computing has started: the main thread must go past the
    untouched ones (they wait in the writer's queue) and start computing, as it does while
    the disk copies them, instead of waiting for the writer; the output is then complete."""
    import threading

    from bonemerge.run import compute as compute_engine
    from bonemerge.run import engine
    from tests.cliutil import run

    tensors = toy.base_tensors(torch.bfloat16) | {
        f"model.a{i:02d}.weight": torch.ones(64, dtype=torch.bfloat16) * i for i in range(12)
    }
    base = toy.write_base(tmp_path / "base", tensors)
    adapter = toy.write_adapter(tmp_path / "bone", seed=1)
    computing = threading.Event()
    held = []
    copied, fill = engine._Shards.copied, compute_engine.Compute._fill

    def held_copy(self, *args):
        if not held:
            held.append(computing.wait(timeout=20))
        return copied(self, *args)

    def filling(self, *args):
        computing.set()
        return fill(self, *args)

    monkeypatch.setattr(engine._Shards, "copied", held_copy)
    monkeypatch.setattr(compute_engine.Compute, "_fill", filling)
    result = run("merge", base, adapter, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    assert held == [True], "the main thread waited for the writer before computing"
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert set(written) == set(tensors)
    for i in range(12):
        assert torch.equal(written[f"model.a{i:02d}.weight"], tensors[f"model.a{i:02d}.weight"])


def test_importing_the_command_line_loads_neither_torch_nor_numpy():
    """The signal handlers go in once the command line is imported: whatever that import
    loads widens the window in which Ctrl-C kills the process with a traceback (numpy alone
    is about 50 ms here, and came in once with the O_DIRECT writer)."""
    code = "import sys, bonemerge.cli; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
