"""bonemerge: streaming checkpoint surgery for PEFT adapters ({methods}).

`from bonemerge import merge, unmerge, unload, strip, inspect, verify, verify_checksums, push`
gives the same operations as the command line (`Push` says where `push` publishes); each
returns a report object whose `to_dict()` is what `--json` prints. Heavy modules
(torch above all) load on first use, so importing the package and `bonemerge --help` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

from bonemerge.errors import AdapterError, BonemergeError, CheckpointError, MergeError, OutputError
from bonemerge.methods import method_names

# The methods named from the registry, so that the docstring never lags behind it.
__doc__ = (__doc__ or "").format(methods=method_names())

if TYPE_CHECKING:
    from bonemerge.api import Report, inspect, merge, push, strip, unload, unmerge, verify, verify_checksums
    from bonemerge.output.push import Push

_LAZY = dict.fromkeys(
    ["merge", "unmerge", "unload", "strip", "inspect", "verify", "verify_checksums", "push", "Report"],
    "bonemerge.api",
) | {"Push": "bonemerge.output.push"}

__all__ = [
    "AdapterError",
    "BonemergeError",
    "CheckpointError",
    "MergeError",
    "OutputError",
    "Push",
    "Report",
    "inspect",
    "merge",
    "push",
    "strip",
    "unload",
    "unmerge",
    "verify",
    "verify_checksums",
]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bonemerge' has no attribute {name!r}")
