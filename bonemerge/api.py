"""The public Python API: one function per command, each returning a report whose
`to_dict()` is what `--json` prints. The commands live in `bonemerge.commands`.
"""

from bonemerge.commands.inspect import inspect
from bonemerge.commands.model import merge, unload, unmerge
from bonemerge.commands.push import push
from bonemerge.commands.strip import parse_rank, strip
from bonemerge.commands.verify import verify, verify_checksums
from bonemerge.report.summary import Report

__all__ = [
    "Report",
    "inspect",
    "merge",
    "parse_rank",
    "push",
    "strip",
    "unload",
    "unmerge",
    "verify",
    "verify_checksums",
]
