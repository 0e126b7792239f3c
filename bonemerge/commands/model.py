"""`merge`, `unmerge` and `unload`: the commands that write a model, in the order of the
safety contract (inputs, output and push target checked, plan, checks, then the I/O).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from bonemerge.adapters import Adapter
from bonemerge.checkpoint import Checkpoint
from bonemerge.checks.dtype_names import parse_dtype
from bonemerge.checks.preflight import (
    check_blocks_finite,
    check_invertible,
    check_stream_options,
    engine_options,
    oversized_notes,
    shard_size_bytes,
)
from bonemerge.errors import BonemergeError
from bonemerge.output import history
from bonemerge.output.model import (
    Target,
    card_adapters,
    dtype_name,
    history_entry,
    history_records,
    write_model,
)
from bonemerge.output.push import Push
from bonemerge.output.staging import check_output
from bonemerge.report.summary import Report
from bonemerge.resolve.hub import locate
from bonemerge.resolve.inputs import (
    PathLike,
    folder_of,
    hub_id_of,
    input_path,
    open_adapter,
    open_merged,
    open_model,
    open_training,
)

if TYPE_CHECKING:
    from bonemerge.plan.build import Plan


@dataclass(frozen=True)
class ModelCommand:
    """A command that writes a model (merge, unmerge, unload), its inputs resolved: the
    checkpoint as given (its history and path), the model the plan builds on, the adapters
    and how they were named, its card, and the history guard that may refuse it."""

    operation: str
    given: Checkpoint
    base: Checkpoint
    adapters: Sequence[Adapter]
    references: Sequence[object]
    card: Callable[[Plan, list[str]], str]
    guard: Callable[[list[dict] | None, list], list[str]] = lambda lineage, records: []
    allow_lossy: bool = False


def run_model(
    job: ModelCommand, output: PathLike | None, dtype: str, max_shard_size: str | int | None, target: Target
) -> Report:
    """Every model-writing command in the order of the safety contract: the output and push
    target checked, the plan built (headers only), the adapters' values checked, the history
    guard, and only then the long I/O. Hub models read in place are let go of at the end."""
    try:
        return checked_run(job, output, dtype, max_shard_size, target)
    finally:
        if target.stream:
            from bonemerge.resolve import remote

            remote.close_all()


def checked_run(
    job: ModelCommand, output: PathLike | None, dtype: str, max_shard_size: str | int | None, target: Target
) -> Report:
    from bonemerge.plan.build import build_plan

    merging = job.operation != "unload"
    path = None
    if not target.stream:
        inputs = [input_path(job.given), *(a.root for a in job.adapters)]
        path = check_output(output, inputs, target.overwrite)
    if target.push is not None:
        target.push.check()
    shard_bytes = shard_size_bytes(max_shard_size)
    plan = build_plan(
        job.base,
        job.adapters,
        operation=job.operation,
        dtype=parse_dtype(dtype),
        max_shard_bytes=shard_bytes,
        allow_lossy=job.allow_lossy,
    )
    lineage = history.read_history(folder_of(job.given))
    if merging:
        # before the sketches, which read whole blocks: a broken one is named by this check
        check_blocks_finite(job.adapters)
    records = history_records(job.references, job.adapters, plan if merging else None)
    notes = [*job.guard(lineage, records), *plan.notes, *oversized_notes(plan, shard_bytes)]
    if job.operation == "unmerge":
        check_invertible(job.adapters, target.options.progress)
    entry = history_entry(
        job.operation,
        records,
        target.command,
        dtype_name(plan),
        target.options if merging else None,
    )
    if merging and target.options.rounding != "nearest":
        entry |= {"rounding": target.options.rounding, "seed": target.options.seed}
    return write_model(
        job.operation,
        plan,
        replace(target, path=path),
        source=job.base,
        adapters=job.adapters if merging else [],
        card=lambda final: job.card(plan, final),
        tokenizer_from_adapters=job.operation == "merge",
        lineage=lineage,
        entry=entry,
        notes=notes,
    )


def merge(
    base: PathLike,
    adapters: Sequence[PathLike],
    output: PathLike | None,
    *,
    adapter_name: str | None = None,
    base_revision: str | None = None,
    adapter_revision: str | None = None,
    dtype: str = "auto",
    max_shard_size: str | int | None = None,
    safe_merge: bool = True,
    device: str = "cpu",
    precision: str = "auto",
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    command: str | None = None,
    push: Push | None = None,
    allow_remerge: bool = False,
    rounding: str = "nearest",
    seed: int = 0,
    stream: bool = False,
) -> Report:
    """Merge `adapters`, in order, into the model at `base`, writing a new model at `output`.

    `base` and each adapter are local folders or Hub ids (`org/name`, `org/name@revision`).
    With `adapters` empty, `base` must be a full PEFT checkpoint, whose own blocks merge into its
    own base weights (`adapter_name` picks one adapter when it holds several), or an adapter,
    whose config names the base to merge into. `push` publishes the result once it is complete.
    An adapter that the base's history says is merged already is refused unless `allow_remerge`.
    Weights stored quantized (block FP8) stay so unless `dtype` is given; `rounding` (nearest,
    or stochastic seeded by `seed`) says how their merged values become codes again.
    With `stream`, `output` is None and `push` required: a Hub base is read in place and the
    result uploaded shard by shard, at most two on disk, in one commit (`hub_stream`).
    """
    from bonemerge.output.card import render_card

    began = time.perf_counter()
    options = engine_options(device, precision, safe_merge, progress, rounding, seed)
    check_stream_options(output, push, stream, overwrite)
    model = open_model(base, adapters, adapter_name, base_revision, adapter_revision, progress, stream)
    name = model.base_hub_id or input_path(model.given).name
    count = len(model.adapters)

    def card(plan: Plan, notes: list[str]) -> str:
        return render_card(
            heading=f"{name} with {count} adapter{'s' if count != 1 else ''} merged",
            summary=f"This model is `{name}` with these adapters merged into its weights, in this order:",
            adapters=card_adapters(model.adapters),
            closing=f"Weights are stored as {dtype_name(plan)}. "
            "It loads like any `transformers` model; PEFT is not needed.",
            command=command,
            notes=notes,
            base_hub_id=model.base_hub_id,
            relation="finetune",
            tags=["merge"],
        )

    job = ModelCommand(
        "merge",
        model.given,
        model.base,
        model.adapters,
        references=adapters or [base],
        card=card,
        guard=lambda lineage, records: history.check_merge(lineage, records, str(base), allow_remerge),
    )
    return run_model(
        job,
        output,
        dtype,
        max_shard_size,
        Target(output and Path(output), overwrite, resume, options, command, began, push, stream),
    )


def unmerge(
    merged: PathLike,
    adapters: Sequence[PathLike],
    output: PathLike | None,
    *,
    adapter_revision: str | None = None,
    allow_lossy: bool = False,
    dtype: str = "auto",
    max_shard_size: str | int | None = None,
    safe_merge: bool = True,
    device: str = "cpu",
    precision: str = "auto",
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    command: str | None = None,
    push: Push | None = None,
    stream: bool = False,
) -> Report:
    """Take `adapters` (given in the order they were merged) back out of the model at `merged`."""
    from bonemerge.output.card import render_card

    began = time.perf_counter()
    options = engine_options(device, precision, safe_merge, progress)
    if not adapters:
        raise BonemergeError("no adapter was given; pass the adapters that were merged into the model.")
    check_stream_options(output, push, stream, overwrite)
    checkpoint = open_merged(merged, progress, stream)
    loaded = [open_adapter(a, adapter_revision, progress) for a in adapters]
    name = input_path(checkpoint).name

    def card(plan: Plan, notes: list[str]) -> str:
        return render_card(
            heading=f"{name} with {len(loaded)} adapter{'s' if len(loaded) != 1 else ''} taken out",
            summary=f"This model is `{name}` with these adapters unmerged from its weights, last first:",
            adapters=card_adapters(list(reversed(loaded))),
            closing="Unmerging inverts the merge maths exactly; on 16-bit weights the result can differ "
            "from the original base by the rounding the merged model went through.",
            command=command,
            notes=notes,
            base_hub_id=hub_id_of(loaded[0]),
            tags=["unmerge"],
        )

    job = ModelCommand(
        "unmerge",
        checkpoint,
        checkpoint,
        loaded,
        references=adapters,
        card=card,
        guard=lambda lineage, records: history.check_unmerge(lineage, records, str(merged)),
        allow_lossy=allow_lossy,
    )
    return run_model(
        job,
        output,
        dtype,
        max_shard_size,
        Target(output and Path(output), overwrite, resume, options, command, began, push, stream),
    )


def unload(
    checkpoint: PathLike,
    output: PathLike | None,
    *,
    adapter_name: str | None = None,
    original_modules: bool = False,
    dtype: str = "auto",
    max_shard_size: str | int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    command: str | None = None,
    push: Push | None = None,
    stream: bool = False,
) -> Report:
    """The plain base model inside a full PEFT checkpoint, without merging its blocks.

    Like PEFT's `unload()`, trained modules_to_save copies replace the originals, unless
    `original_modules` keeps the originals instead.
    """
    from bonemerge.output.card import render_card

    began = time.perf_counter()
    options = engine_options("cpu", "auto", True, progress)
    check_stream_options(output, push, stream, overwrite)
    location = locate(checkpoint, None, "CHECKPOINT", progress, remote=stream)
    given, training = open_training(location, "unload")
    adapters = [] if original_modules else [training.adapter(adapter_name)]
    kept = (
        "the original modules_to_save modules" if original_modules else "the trained modules_to_save copies"
    )
    name = location.hub_id or input_path(given).name

    def card(plan: Plan, notes: list[str]) -> str:
        return render_card(
            heading=f"Base model of {name}",
            summary=f"This model is the base inside the PEFT training checkpoint `{name}`, "
            f"with its adapter blocks left out (not merged) and {kept}.",
            adapters=[],
            closing="It loads like any `transformers` model.",
            command=command,
            notes=notes,
            tags=["unload"],
        )

    job = ModelCommand(
        "unload", given, training.base, adapters, references=[checkpoint] * len(adapters), card=card
    )
    return run_model(
        job,
        output,
        dtype,
        max_shard_size,
        Target(output and Path(output), overwrite, resume, options, command, began, push, stream),
    )
