"""`verify`: check a merged model against its base and adapters, or its checksums."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

from bonemerge.adapters import Adapter
from bonemerge.checkpoint import Checkpoint
from bonemerge.checks.preflight import engine_options
from bonemerge.errors import BonemergeError
from bonemerge.output import history
from bonemerge.output.manifest import MANIFEST
from bonemerge.output.model import dtype_name
from bonemerge.resolve.hub import locate
from bonemerge.resolve.inputs import (
    PathLike,
    folder_of,
    input_path,
    named_base,
    open_adapter,
    open_merged,
    open_model,
)


def verify(
    merged: PathLike,
    base: PathLike | None,
    adapters: Sequence[PathLike] = (),
    *,
    adapter_name: str | None = None,
    base_revision: str | None = None,
    adapter_revision: str | None = None,
    device: str = "cpu",
    precision: str = "auto",
):
    """Recompute the merge of `adapters` into `base` and compare it with `merged`, tensor by tensor.
    With `base` None, the base is the one the first adapter's config names, as for `merge`."""
    from bonemerge.checkpoint.folder import stray_weights
    from bonemerge.plan.build import build_plan
    from bonemerge.verification.compare import stored_cast, verify_plan

    began = time.perf_counter()
    options = engine_options(device, precision, safe_merge=False, progress=False)
    merged_checkpoint = open_merged(merged)
    if base is None:
        if not adapters:
            raise BonemergeError(
                "pass the adapters merged into the model (and --base BASE, the model they "
                "were merged into, unless their config names it)."
            )
        first = open_adapter(adapters[0], adapter_revision, False)
        base = named_base(first, adapters[0], base_revision).path
        base_revision = None
    model = open_model(base, adapters, adapter_name, base_revision, adapter_revision)
    plan = build_plan(model.base, model.adapters)
    cast = stored_cast(plan, merged_checkpoint)
    if cast is not None:
        plan = build_plan(model.base, model.adapters, dtype=cast)
    exact, reason = verify_mode(merged_checkpoint, model.adapters, options, dtype_name(plan))
    last = (history.read_history(folder_of(merged_checkpoint)) or [{}])[-1]
    # quantized weights are re-encoded with the rounding the merge used
    options = replace(options, rounding=last.get("rounding", "nearest"), seed=last.get("seed", 0))
    report = verify_plan(plan, merged_checkpoint, options, exact)
    report.reason = reason
    report.base = str(input_path(model.base))
    report.stray = stray_weights(merged_checkpoint)
    report.seconds = round(time.perf_counter() - began, 3)
    return report


def verify_mode(merged: Checkpoint, adapters: Sequence[Adapter], options, dtype: str) -> tuple[bool, str]:
    """Exact when the merged model's last history entry is a merge of these adapters into the
    `dtype` its tensors hold that this installation reproduces bit for bit; else tolerance,
    with the reason."""
    lineage = history.read_history(folder_of(merged))
    if not lineage:
        return False, "it has no bonemerge history (merged by another tool), so rounding is allowed"
    last = lineage[-1]
    prints = [history.fingerprint(a) for a in adapters]
    if history.reproducible_by(last, prints, options.precision, options.device.split(":")[0], dtype):
        return True, (
            f"bonemerge {last.get('bonemerge')} merged it from these adapters with the same maths, "
            f"precision ({options.precision}) and device, so every bit must match"
        )
    return False, (
        "its history does not show a merge of these adapters into its dtype with the same maths, "
        "precision, device and torch version, so rounding is allowed"
    )


def verify_checksums(merged: PathLike):
    """Check every file of a bonemerge output against the digest its manifest recorded."""
    from bonemerge.checkpoint.folder import loader_weights
    from bonemerge.output.manifest import listed_files, read_manifest
    from bonemerge.verification.compare import verify_checksums as check

    folder = locate(merged, None, "MERGED").path
    if not (folder / MANIFEST).is_file():
        raise BonemergeError(
            f"{folder} has no {MANIFEST}, so there are no recorded checksums; it was not written by "
            "bonemerge (verify it against its base instead)."
        )
    files = listed_files(folder, read_manifest(folder))
    report = check(folder, {"files": files})
    report.stray = sorted(loader_weights(folder) - set(files))
    return report
