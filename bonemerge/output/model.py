"""Writing a planned model: staging, shards, index, companions, card, manifest and history,
with every input watched for changes, then publishing (and pushing) it.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bonemerge import __version__
from bonemerge.adapters import Adapter
from bonemerge.checkpoint import Checkpoint, dtypes, layout, open_checkpoint
from bonemerge.output import history
from bonemerge.output.manifest import MANIFEST, write_manifest
from bonemerge.output.push import Push
from bonemerge.output.staging import Staging, check_free_space, resumable_shards
from bonemerge.report.summary import Report
from bonemerge.resolve.inputs import PathLike, input_path

if TYPE_CHECKING:
    from bonemerge.plan.build import Plan
    from bonemerge.run.work import EngineStats


def history_records(
    labels: Sequence[PathLike], adapters: Sequence[Adapter], plan: Plan | None = None
) -> list[tuple[str, dict]]:
    """(label as the user gave it, history record) for each adapter; with the `plan` that
    merges or unmerges them, the records carry the sketch of each adapter's update."""
    sketched = history.sketches(plan, adapters) if plan is not None else [None] * len(adapters)
    return [
        (str(label), history.record(a, history.fingerprint(a), found))
        for label, a, found in zip(labels, adapters, sketched, strict=True)
    ]


def history_entry(
    operation: str,
    records: Sequence[tuple[str, dict]],
    command: str | None,
    dtype: str | None = None,
    options=None,
) -> dict:
    """This run's history entry; merges and unmerges also record what decides their bits."""
    return history.operation(
        operation,
        [found for _, found in records],
        command=command,
        version=__version__,
        dtype=dtype,
        precision=None if options is None else options.precision,
        device=None if options is None else options.device.split(":")[0],
    )


def card_adapters(adapters: Sequence[Adapter]):
    from bonemerge.output.card import AppliedAdapter

    return [AppliedAdapter(a.label, a.config.describe(), a.config.tag) for a in adapters]


@dataclass(frozen=True)
class Target:
    """Where and how a command writes: the same for every command that makes a model."""

    path: Path | None
    overwrite: bool
    resume: bool
    options: object
    command: str | None
    began: float
    push: Push | None
    #: `--stream`: no local output; shards go to the Hub one at a time (`hub_stream`)
    stream: bool = False


def publish(
    staging: Staging, overwrite: bool, push: Push | None, check: Callable[[Path], object]
) -> str | None:
    """Rename the finished output into place, re-read it as a user would, then push it."""
    from bonemerge.output.push import push_folder

    staging.publish(overwrite)
    if push is None:
        return None
    check(staging.output)
    return push_folder(staging.output, push).url


@dataclass(frozen=True)
class Written:
    """What `write_output` did: the engine's counts, every file of the output, where it went."""

    stats: EngineStats
    files: list[str]
    pushed: str | None


def write_output(
    plan: Plan,
    target: Target,
    *,
    fill: Callable[[Staging, EngineStats], dict],
    check: Callable[[Path], object],
    notes: list[str],
    fingerprint: str = "",
    extra_bytes: int = 0,
) -> Written:
    """The one write path of every command that writes (merge, unmerge, unload, strip): free
    space checked, every input watched from here to the end, the plan streamed into a staging
    folder (with `--stream`, to the Hub a shard at a time), `fill(staging, stats)` adding the
    other files and returning the manifest's fields, the manifest written with every file's
    digest, and the output published whole, re-read by `check` before a push. `fingerprint`
    (the plan's, with everything that decides its bytes) lets `--resume` reuse finished shards;
    `notes` gains what the run did with those of an interrupted run."""
    from bonemerge.checkpoint.reader import InputWatch
    from bonemerge.run.engine import write_plan

    if not target.stream:
        check_free_space(target.path, plan.file_bytes + extra_bytes)
    # Every input as it was when opened, before its header was read: a file rewritten since
    # (an adapter after its fingerprint was taken, a shard after planning) fails the run.
    watch = InputWatch(inputs := plan.input_files(), inputs)
    watch.check()
    if target.stream:
        from bonemerge.output.hub_stream import streamed_output

        sink = streamed_output(target.push, fingerprint, target.resume, watch.check, plan, extra_bytes)
    else:
        if fingerprint and not target.resume and (left := resumable_shards(target.path, fingerprint)):
            discarded = (
                f"{len(left)} finished shard(s) of an interrupted run of the same command were found beside "
                f"{target.path} and are written again; --resume would have reused them"
            )
            warn(discarded)
            notes.append(discarded)
        sink = Staging(target.path, fingerprint, target.resume)
    with sink as staging:
        if target.stream and staging.discarded:
            discarded = (
                f"{staging.discarded} uploaded shard(s) of an interrupted run of the same command were "
                "found and are written again (the Hub skips uploading what it holds); --resume would have "
                "reused them"
            )
            warn(discarded)
            notes.append(discarded)
        if staging.reused:
            notes.append(f"reused {len(staging.reused)} finished shard(s) of an interrupted run (--resume)")

        def shard_done(file: str, size: int, digest: str) -> None:
            watch.check()
            staging.record(file, size, digest)

        stats = write_plan(
            plan,
            staging.path,
            target.options,
            skip=staging.finished,
            shard_done=shard_done,
            bounded=staging.bounded if target.stream else None,
        )
        manifest = fill(staging, stats)
        files = write_manifest(staging.path, manifest, staging.finished)
        watch.check()
        if target.stream:
            pushed = staging.commit().url
        else:
            pushed = publish(staging, target.overwrite, target.push, check)
    return Written(stats, sorted([*files, MANIFEST]), pushed)


def write_model(
    operation: str,
    plan,
    target: Target,
    *,
    source: Checkpoint,
    adapters: Sequence[Adapter],
    card: Callable[[list[str]], str],
    tokenizer_from_adapters: bool,
    lineage: Sequence[dict] | None,
    entry: dict,
    notes: Sequence[str],
) -> Report:
    """A model through `write_output`: its shards, index, companions, card (made from the notes,
    once the run has added its own) and a manifest with the history (`lineage`, the input's,
    plus this run's `entry`)."""
    from bonemerge.codecs import Rounding
    from bonemerge.codecs.report import summarize
    from bonemerge.output import companions

    roots = [a.root for a in adapters] if tokenizer_from_adapters else []
    own = [s.filename for s in plan.shards] + [plan.index_name] * plan.write_index + ["README.md", MANIFEST]
    extras = companions.plan_companions(source, roots, own)
    options = target.options
    fingerprint = plan.fingerprint(
        version=__version__,
        maths=history.MATHS_VERSION,
        torch=history.torch_version(),
        **options.decides_output(),
    )
    given_notes = list(notes)
    notes = given_notes + list(extras.notes)
    inputs = [str(input_path(source)), *(str(a.root) for a in adapters)]
    quantized = None

    def fill(staging: Staging, stats: EngineStats) -> dict:
        nonlocal quantized
        lossy = lossy_note(stats, dtype_name(plan), bool(staging.reused)) if operation == "unmerge" else None
        coded_notes, quantized = summarize(
            stats.encoded, Rounding(options.rounding, options.seed), operation == "merge"
        )
        card_notes = [*given_notes, *([lossy] if lossy else []), *coded_notes]
        notes.extend([lossy] if lossy else [])
        notes.extend(coded_notes)
        if plan.write_index:
            index = json.dumps(layout.index_json(plan.shards), indent=2)
            (staging.path / plan.index_name).write_text(index + "\n", encoding="utf-8")
        companions.write_companions(extras, plan.config_updates, staging.path)
        (staging.path / "README.md").write_text(card(card_notes), encoding="utf-8")
        created = now()
        return {
            "bonemerge": __version__,
            "operation": operation,
            "inputs": inputs,
            "adapters": [a.label for a in adapters],
            "dtype": dtypes.TORCH_NAME.get(plan.main_dtype, plan.main_dtype),
            "command": target.command,
            "created": created,
            "history": [*(lineage or []), entry | {"created": created}],
        }

    written = write_output(
        plan,
        target,
        fill=fill,
        check=open_checkpoint,
        notes=notes,
        fingerprint=fingerprint,
        extra_bytes=extras.bytes,
    )
    stats = written.stats
    return Report(
        operation=operation,
        output=target.push.repo_id if target.stream else str(target.path),
        inputs=inputs,
        tensors_merged=stats.merged,
        tensors_copied=stats.copied,
        tensors_converted=stats.converted,
        bytes_written=stats.bytes_written,
        seconds=round(time.perf_counter() - target.began, 3),
        files=written.files,
        notes=notes,
        pushed_to=written.pushed,
        lossy=(
            {"elements_unmerged": stats.unmerged_elements, "elements_that_may_differ": stats.may_differ}
            if operation == "unmerge"
            else None
        ),
        quantized=quantized,
    )


def lossy_note(stats, dtype: str, resumed: bool) -> str | None:
    """What an unmerge could not restore exactly, or None when every element came back exactly
    (the merge rounded each more finely than the base's own precision). Counted while writing,
    so with `resumed` (shards reused by --resume) it covers the shards this run wrote."""
    from bonemerge.units import format_count

    if not stats.may_differ:
        return None
    share = stats.may_differ / stats.unmerged_elements
    written = " of the shards this run wrote (not those reused)" if resumed else ""
    # quantized codes (kept FP8, MXFP4) are only as fine as their format, whatever the merge wrote
    remedy = (
        "the base's own files are the only exact copy of its codes"
        if stats.encoded
        else f"a merge written with --dtype float32 unmerges back to {dtype} almost exactly"
    )
    return (
        f"this unmerge is lossy: about {format_count(stats.may_differ)} of the "
        f"{format_count(stats.unmerged_elements)} elements taken out of{written} ({share:.1%}) may "
        "not come back exactly, because the merge rounded them to a coarser step than the base "
        "stored them with (one unit in the last place, or code step, of the merged value) and the "
        f"original bits are gone; {remedy}"
    )


def warn(message: str) -> None:
    """Say something on stderr at once, while the run goes on (the report's notes say it again
    at the end): for what the user may want to stop the run for."""
    sys.stderr.write(f"warning: {message}.\n")
    sys.stderr.flush()


def dtype_name(plan) -> str:
    return dtypes.TORCH_NAME.get(plan.main_dtype, plan.main_dtype)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
