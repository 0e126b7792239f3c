"""`inspect`: what a folder is and holds, from headers and configs only."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bonemerge.resolve.hub import locate
from bonemerge.resolve.inputs import PathLike

if TYPE_CHECKING:
    from bonemerge.report.inspect import InspectReport


def inspect(path: PathLike, base: PathLike | None = None) -> InspectReport:
    """What `path` is and holds, from headers only; with `base`, how its adapter fits that base
    (`report.ok` is False when it does not)."""
    from bonemerge.report.inspect import InspectReport, inspect_path

    located = locate(path, None, "PATH")
    return InspectReport(
        inspect_path(located.path, None if base is None else locate(base, None, "--base").path)
    )
