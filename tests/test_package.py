"""The package's public names stay the operations, whatever has been imported before."""

from __future__ import annotations

import subprocess
import sys


def test_public_names_are_never_shadowed_by_modules():
    """A submodule named like an operation (`bonemerge/verify.py`) would replace the function
    `from bonemerge import verify` gives once anything imported it: every operation must still
    be the function after every module of the package is loaded."""
    code = """
import importlib, pkgutil, types
import bonemerge
for name in bonemerge.__all__:
    getattr(bonemerge, name)
for info in pkgutil.walk_packages(bonemerge.__path__, "bonemerge."):
    importlib.import_module(info.name)
shadowed = [n for n in bonemerge.__all__ if isinstance(getattr(bonemerge, n), types.ModuleType)]
assert not shadowed, shadowed
from bonemerge import inspect, merge, push, strip, unload, unmerge, verify, verify_checksums
assert all(callable(f) for f in (inspect, merge, push, strip, unload, unmerge, verify, verify_checksums))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
