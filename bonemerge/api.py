"""The public Python API: each function runs one command end to end and returns a report.

The order inside each command is the safety contract: resolve and validate every input (Hub
ids are downloaded first), check it against the input's merge history, check the push
target, plan, check adapter blocks and free space,
and only then start the long I/O into a staging folder that becomes the output in one rename
when everything has been written and fsynced. Only a published, re-validated output is pushed.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from bonemerge import __version__, history
from bonemerge.adapters import Adapter, load_adapter
from bonemerge.adapters.training import TrainingCheckpoint, is_training_checkpoint, read_training_checkpoint
from bonemerge.checkpoint import Checkpoint, RangeReader, Source, TensorRef, dtypes, layout, open_checkpoint
from bonemerge.dtype_names import parse_dtype
from bonemerge.errors import AdapterError, BonemergeError, shown
from bonemerge.hub import Location, Push, locate
from bonemerge.manifest import MANIFEST, write_manifest
from bonemerge.output import Staging, check_free_space, check_output, resumable_shards

if TYPE_CHECKING:
    from bonemerge.describe import InspectReport
    from bonemerge.plan import Plan

PRECISIONS = ("auto", "fp32", "fp64")

PathLike = str | os.PathLike[str]


# What each command did to the tensors it changed with adapter blocks: the summary's words
# and `--json`'s key (`tensors_merged` stays in unmerge's JSON too, for existing readers).
_BLOCK_VERBS = {"merge": "merged", "unmerge": "unmerged"}


@dataclass
class Report:
    """What a command wrote; `--json` prints exactly this. `tensors_merged` counts the tensors
    whose blocks were merged (or, for unmerge, taken out: `tensors_unmerged` in `to_dict`).
    `lossy` (unmerge only): how many elements of those tensors may not come back exactly."""

    operation: str
    output: str
    inputs: list[str]
    tensors_merged: int
    tensors_copied: int
    tensors_converted: int
    bytes_written: int
    seconds: float
    files: list[str]
    notes: list[str] = field(default_factory=list)
    pushed_to: str | None = None
    conversion: dict | None = None
    lossy: dict | None = None
    quantized: dict | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.operation != "unmerge":
            return data
        ordered = {}
        for key, value in data.items():
            if key == "tensors_merged":
                ordered["tensors_unmerged"] = value
            ordered[key] = value
        return ordered

    def counts(self) -> str:
        """`12 tensors merged, 40 copied, 0 converted`: what the summary line says was done,
        in the words of the command (strip and unload merge nothing, so they say nothing of it)."""
        verb = _BLOCK_VERBS.get(self.operation)
        if verb is None:
            return f"{self.tensors_copied} tensors copied, {self.tensors_converted} converted"
        return (
            f"{self.tensors_merged} tensors {verb}, {self.tensors_copied} copied, "
            f"{self.tensors_converted} converted"
        )


def _options(
    device: str, precision: str, safe_merge: bool, progress: bool, rounding: str = "nearest", seed: int = 0
):
    from bonemerge.codecs import ROUNDINGS
    from bonemerge.engine import EngineOptions

    if precision not in PRECISIONS:
        raise BonemergeError(f"unknown precision {shown(precision)}; choose one of {', '.join(PRECISIONS)}.")
    if rounding not in ROUNDINGS:
        raise BonemergeError(f"unknown rounding {shown(rounding)}; choose one of {', '.join(ROUNDINGS)}.")
    check_device(device)
    return EngineOptions(
        device=device,
        precision=precision,
        safe_merge=safe_merge,
        progress=progress,
        rounding=rounding,
        seed=seed,
    )


def check_device(device: str) -> None:
    """Only the CPU and CUDA devices run bonemerge's maths; anything else torch accepts (`meta`,
    `xpu`, `mps`...) would fail deep in a run, so it is refused before any work. Only a CUDA
    device waits for torch to load; the CPU needs no asking."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise BonemergeError(f"unknown or unsupported device {shown(device)}; use cpu, cuda or cuda:N.")
    if device == "cpu":
        return
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BonemergeError(f"--device {device} was asked for, but torch sees no CUDA device here.")
    if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise BonemergeError(
            f"--device {device} was asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)."
        )


def _shard_bytes(max_shard_size: str | int | None) -> int | None:
    return layout.parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size


def check_blocks_finite(adapters: Sequence[Adapter]) -> None:
    """Refuse NaN/Inf in any block before the output is even created, reading each block in
    bounded pieces: blocks of large adapters (or of a lying header) can be gigabytes."""
    with RangeReader() as reader:
        for adapter in adapters:
            checked: set[int] = set()  # an adapter-wide tensor is read once, not once per block
            for block in adapter.blocks:
                for part, source in block.parts.items():
                    if id(source) in checked:
                        continue
                    checked.add(id(source))
                    if not _finite(reader, source):
                        raise AdapterError(
                            f"block {block.keys.get(part, block.key)} of {adapter.root} holds NaN or Inf "
                            "values; the adapter is broken (its training diverged), nothing was written."
                        )


def _finite(reader: RangeReader, source: Source) -> bool:
    """No NaN or Inf in `source`: from its bits when it is in a file (no torch needed yet)."""
    if isinstance(source, TensorRef):
        pieces = reader.pieces(source.path, source.offset, source.nbytes)
        return all(dtypes.all_finite_bytes(piece, source.dtype) for piece in pieces)
    from bonemerge.checkpoint.tensors import pieces as values
    from bonemerge.compute import all_finite

    return all(all_finite(piece) for piece in values(reader, source))


def check_invertible(adapters: Sequence[Adapter], progress: bool = False) -> None:
    """Refuse, before any output exists, a block whose merge cannot be undone reliably (Bat's
    inverses take a while on a large model: `progress` shows a bar)."""
    import torch

    from bonemerge.checkpoint.tensors import load_whole
    from bonemerge.errors import MergeError
    from bonemerge.progress import counted

    blocks = [(adapter, block) for adapter in adapters for block in adapter.blocks]
    threads = torch.get_num_threads()
    # The checks are batches of r x r decompositions: more threads only spin on them (20x the
    # CPU time with two threads on a busy two-core machine), and nothing else runs yet.
    torch.set_num_threads(1)
    try:
        for adapter, block in counted(blocks, "checking inverses", progress):
            try:
                block.method.check_inverse(block, lambda part, b=block: load_whole(b.parts[part]))
            except MergeError as exc:
                raise MergeError(
                    f"block {block.key} of {adapter.root}: {exc}; nothing was written."
                ) from None
    finally:
        torch.set_num_threads(threads)


def _input_path(checkpoint: Checkpoint) -> Path:
    return checkpoint.root if checkpoint.is_folder else checkpoint.shards[0].path


def _is_adapter_folder(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and not any(path.glob("model*.safetensors"))


def _load_adapter(reference: PathLike, revision: str | None, progress: bool) -> Adapter:
    """An adapter folder; a full PEFT training checkpoint given in its place is named as what
    it is, with the command that handles it, instead of failing as an incomplete adapter."""
    path = locate(reference, revision, "--adapter", progress).path
    weights = ("adapter_model.safetensors", "adapter_model.bin")
    if path.is_dir() and not any((path / name).is_file() for name in weights):
        try:
            is_checkpoint = is_training_checkpoint(open_checkpoint(path))
        except BonemergeError:
            is_checkpoint = False
        if is_checkpoint:
            raise AdapterError(
                f"{reference} is a full PEFT training checkpoint (a PeftModel state dict holding its own "
                f"base weights), not an adapter; merge it on its own with `bonemerge merge {reference} "
                f"-o OUT`, or extract its adapter with `bonemerge strip {reference} -o ADAPTER`."
            )
    return load_adapter(path)


def _folder(checkpoint: Checkpoint) -> Path | None:
    return checkpoint.root if checkpoint.is_folder else None


def _records(
    labels: Sequence[PathLike], adapters: Sequence[Adapter], plan: Plan | None = None
) -> list[tuple[str, dict]]:
    """(label as the user gave it, history record) for each adapter; with the `plan` that
    merges or unmerges them, the records carry the sketch of each adapter's update."""
    sketched = history.sketches(plan, adapters) if plan is not None else [None] * len(adapters)
    return [
        (str(label), history.record(a, history.fingerprint(a), found))
        for label, a, found in zip(labels, adapters, sketched, strict=True)
    ]


def _entry(
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


@dataclass(frozen=True)
class _Model:
    """A command's inputs, resolved: the checkpoint given, the model to build on, the adapters."""

    given: Checkpoint
    base: Checkpoint
    adapters: list[Adapter]
    base_hub_id: str | None


def _open_model(
    reference: PathLike,
    adapters: Sequence[PathLike],
    adapter_name: str | None,
    base_revision: str | None,
    adapter_revision: str | None,
    progress: bool = False,
    remote: bool = False,
) -> _Model:
    """A plain base plus adapter folders, one full PEFT checkpoint standing for both, or one
    adapter whose config names its base (`base_model_name_or_path` and `revision`)."""
    if adapters:
        location = locate(reference, base_revision, "--base", progress, remote=remote)
        checkpoint = open_checkpoint(location.path)
        if is_training_checkpoint(checkpoint):
            raise BonemergeError(
                f"{reference} is a full PEFT checkpoint that carries its own adapter; pass it alone "
                "(bonemerge merge CHECKPOINT --output OUT)."
            )
        loaded = [_load_adapter(a, adapter_revision, progress) for a in adapters]
        return _Model(checkpoint, checkpoint, loaded, location.hub_id or _hub_id_of(loaded[0]))
    location = locate(reference, adapter_revision, "--adapter", progress, remote=remote)
    if _is_adapter_folder(location.path):
        adapter = load_adapter(location.path)
        base = named_base(adapter, reference, base_revision, progress, remote)
        checkpoint = open_checkpoint(base.path)
        return _Model(checkpoint, checkpoint, [adapter], base.hub_id or _hub_id_of(adapter))
    checkpoint = open_checkpoint(location.path)
    if not is_training_checkpoint(checkpoint):
        raise BonemergeError(
            f"no adapter was given for {reference}; pass at least one adapter folder after it."
        )
    training = read_training_checkpoint(checkpoint)
    adapter = training.adapter(adapter_name)
    return _Model(checkpoint, training.base, [adapter], location.hub_id or _hub_id_of(adapter))


def named_base(
    adapter: Adapter,
    reference: PathLike,
    base_revision: str | None = None,
    progress: bool = False,
    remote: bool = False,
) -> Location:
    """The base model `adapter`'s config names (`base_model_name_or_path`, a path taken from the
    adapter folder, and `revision`): where merge and verify look when no base is given."""
    named = adapter.config.base_model
    if not named:
        raise BonemergeError(
            f"{reference} is an adapter whose config does not name its base model; pass the base "
            "model too (merge: BASE first; verify: --base BASE)."
        )
    revision = base_revision or adapter.config.raw.get("revision") or None
    return locate(named, revision, "--base", progress, relative_to=adapter.root, remote=remote)


def _hub_id_of(adapter: Adapter) -> str | None:
    from bonemerge.modelcard import hub_id

    return hub_id(adapter.config.base_model)


def _card_adapters(adapters: Sequence[Adapter]):
    from bonemerge.modelcard import AppliedAdapter

    return [AppliedAdapter(a.label, a.config.describe(), a.config.tag) for a in adapters]


def _check_stream(output: PathLike | None, push: Push | None, stream: bool, overwrite: bool) -> None:
    from bonemerge.hub_stream import check_stream

    check_stream(output, push, stream, overwrite)


@dataclass(frozen=True)
class _Target:
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


def _publish(
    staging: Staging, overwrite: bool, push: Push | None, check: Callable[[Path], object]
) -> str | None:
    """Rename the finished output into place, re-read it as a user would, then push it."""
    from bonemerge.hub import push_folder

    staging.publish(overwrite)
    if push is None:
        return None
    check(staging.output)
    return push_folder(staging.output, push).url


def _write_model(
    operation: str,
    plan,
    target: _Target,
    *,
    source: Checkpoint,
    adapters: Sequence[Adapter],
    card: Callable[[list[str]], str],
    tokenizer_from_adapters: bool,
    lineage: Sequence[dict] | None,
    entry: dict,
    notes: Sequence[str],
) -> Report:
    """Stream `plan` into the staging folder with index, companions, card (made from the notes,
    once the run has added its own) and a manifest of every file's digest and the history
    (`lineage`, the input's, plus this run's `entry`), checking that no input changes
    meanwhile; then publish."""
    from bonemerge import companions
    from bonemerge.checkpoint.reader import InputWatch
    from bonemerge.codecs import Rounding
    from bonemerge.codecs.report import summarize
    from bonemerge.engine import write_plan

    roots = [a.root for a in adapters] if tokenizer_from_adapters else []
    own = [s.filename for s in plan.shards] + [plan.index_name] * plan.write_index + ["README.md", MANIFEST]
    extras = companions.plan_companions(source, roots, own)
    if not target.stream:
        check_free_space(target.path, plan.file_bytes + extras.bytes)
    options = target.options
    fingerprint = plan.fingerprint(
        version=__version__,
        maths=history.MATHS_VERSION,
        torch=history.torch_version(),
        **options.decides_output(),
    )
    # Every input as it was when opened, before its header was read: a file rewritten since
    # (an adapter after its fingerprint was taken, a shard after planning) fails the run.
    watch = InputWatch(inputs := plan.input_files(), inputs)
    watch.check()
    given_notes = list(notes)
    notes = given_notes + list(extras.notes)
    if target.stream:
        from bonemerge.hub_stream import streamed_output

        sink = streamed_output(target.push, fingerprint, target.resume, watch.check, plan, extras.bytes)
    else:
        if not target.resume and (left := resumable_shards(target.path, fingerprint)):
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
            options,
            skip=staging.finished,
            shard_done=shard_done,
            bounded=staging.bounded if target.stream else None,
        )
        lossy = (
            _lossy_note(stats, _dtype_name(plan), bool(staging.reused)) if operation == "unmerge" else None
        )
        coded_notes, quantized = summarize(
            stats.encoded, Rounding(options.rounding, options.seed), operation == "merge"
        )
        card_notes = [*given_notes, *([lossy] if lossy else []), *coded_notes]
        notes += [lossy] if lossy else []
        notes += coded_notes
        if plan.write_index:
            index = json.dumps(layout.index_json(plan.shards), indent=2)
            (staging.path / plan.index_name).write_text(index + "\n", encoding="utf-8")
        companions.write_companions(extras, plan.config_updates, staging.path)
        (staging.path / "README.md").write_text(card(card_notes), encoding="utf-8")
        created = _now()
        manifest = {
            "bonemerge": __version__,
            "operation": operation,
            "inputs": [str(_input_path(source)), *(str(a.root) for a in adapters)],
            "adapters": [a.label for a in adapters],
            "dtype": dtypes.TORCH_NAME.get(plan.main_dtype, plan.main_dtype),
            "command": target.command,
            "created": created,
            "history": [*(lineage or []), entry | {"created": created}],
        }
        files = write_manifest(staging.path, manifest, staging.finished)
        watch.check()
        if target.stream:
            pushed = staging.commit().url
        else:
            pushed = _publish(staging, target.overwrite, target.push, open_checkpoint)
    return Report(
        operation=operation,
        output=target.push.repo_id if target.stream else str(target.path),
        inputs=manifest["inputs"],
        tensors_merged=stats.merged,
        tensors_copied=stats.copied,
        tensors_converted=stats.converted,
        bytes_written=stats.bytes_written,
        seconds=round(time.perf_counter() - target.began, 3),
        files=sorted([*files, MANIFEST]),
        notes=notes,
        pushed_to=pushed,
        lossy=(
            {"elements_unmerged": stats.unmerged_elements, "elements_that_may_differ": stats.may_differ}
            if operation == "unmerge"
            else None
        ),
        quantized=quantized,
    )


def _lossy_note(stats, dtype: str, resumed: bool) -> str | None:
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


def _dtype_name(plan) -> str:
    return dtypes.TORCH_NAME.get(plan.main_dtype, plan.main_dtype)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _oversized(plan, max_shard_bytes: int | None) -> list[str]:
    """Notes for tensors larger than --max-shard-size, which get a file of their own."""
    from bonemerge.units import format_size

    if max_shard_bytes is None:
        return []
    return [
        f"{step.name} ({format_size(step.nbytes)}) is larger than --max-shard-size "
        f"({format_size(max_shard_bytes)}); it was written to a file of its own, which exceeds that size"
        for step in plan.steps.values()
        if step.nbytes > max_shard_bytes
    ]


@dataclass(frozen=True)
class _ModelCommand:
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


def _run_model(
    job: _ModelCommand, output: PathLike | None, dtype: str, max_shard_size: str | int | None, target: _Target
) -> Report:
    """Every model-writing command in the order of the safety contract: the output and push
    target checked, the plan built (headers only), the adapters' values checked, the history
    guard, and only then the long I/O. Hub models read in place are let go of at the end."""
    try:
        return _checked_run(job, output, dtype, max_shard_size, target)
    finally:
        if target.stream:
            from bonemerge import hub_read

            hub_read.close_all()


def _checked_run(
    job: _ModelCommand, output: PathLike | None, dtype: str, max_shard_size: str | int | None, target: _Target
) -> Report:
    from bonemerge.plan import build_plan

    merging = job.operation != "unload"
    path = None
    if not target.stream:
        inputs = [_input_path(job.given), *(a.root for a in job.adapters)]
        path = check_output(output, inputs, target.overwrite)
    if target.push is not None:
        target.push.check()
    shard_bytes = _shard_bytes(max_shard_size)
    plan = build_plan(
        job.base,
        job.adapters,
        operation=job.operation,
        dtype=parse_dtype(dtype),
        max_shard_bytes=shard_bytes,
        allow_lossy=job.allow_lossy,
    )
    lineage = history.read_history(_folder(job.given))
    if merging:
        # before the sketches, which read whole blocks: a broken one is named by this check
        check_blocks_finite(job.adapters)
    records = _records(job.references, job.adapters, plan if merging else None)
    notes = [*job.guard(lineage, records), *plan.notes, *_oversized(plan, shard_bytes)]
    if job.operation == "unmerge":
        check_invertible(job.adapters, target.options.progress)
    entry = _entry(
        job.operation,
        records,
        target.command,
        _dtype_name(plan),
        target.options if merging else None,
    )
    if merging and target.options.rounding != "nearest":
        entry |= {"rounding": target.options.rounding, "seed": target.options.seed}
    return _write_model(
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
    from bonemerge.modelcard import render_card

    began = time.perf_counter()
    options = _options(device, precision, safe_merge, progress, rounding, seed)
    _check_stream(output, push, stream, overwrite)
    model = _open_model(base, adapters, adapter_name, base_revision, adapter_revision, progress, stream)
    name = model.base_hub_id or _input_path(model.given).name
    count = len(model.adapters)

    def card(plan: Plan, notes: list[str]) -> str:
        return render_card(
            heading=f"{name} with {count} adapter{'s' if count != 1 else ''} merged",
            summary=f"This model is `{name}` with these adapters merged into its weights, in this order:",
            adapters=_card_adapters(model.adapters),
            closing=f"Weights are stored as {_dtype_name(plan)}. "
            "It loads like any `transformers` model; PEFT is not needed.",
            command=command,
            notes=notes,
            base_hub_id=model.base_hub_id,
            relation="finetune",
            tags=["merge"],
        )

    job = _ModelCommand(
        "merge",
        model.given,
        model.base,
        model.adapters,
        references=adapters or [base],
        card=card,
        guard=lambda lineage, records: history.check_merge(lineage, records, str(base), allow_remerge),
    )
    return _run_model(
        job,
        output,
        dtype,
        max_shard_size,
        _Target(output and Path(output), overwrite, resume, options, command, began, push, stream),
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
    from bonemerge.modelcard import render_card

    began = time.perf_counter()
    options = _options(device, precision, safe_merge, progress)
    if not adapters:
        raise BonemergeError("no adapter was given; pass the adapters that were merged into the model.")
    _check_stream(output, push, stream, overwrite)
    checkpoint = _open_merged(merged, progress, stream)
    loaded = [_load_adapter(a, adapter_revision, progress) for a in adapters]
    name = _input_path(checkpoint).name

    def card(plan: Plan, notes: list[str]) -> str:
        return render_card(
            heading=f"{name} with {len(loaded)} adapter{'s' if len(loaded) != 1 else ''} taken out",
            summary=f"This model is `{name}` with these adapters unmerged from its weights, last first:",
            adapters=_card_adapters(list(reversed(loaded))),
            closing="Unmerging inverts the merge maths exactly; on 16-bit weights the result can differ "
            "from the original base by the rounding the merged model went through.",
            command=command,
            notes=notes,
            base_hub_id=_hub_id_of(loaded[0]),
            tags=["unmerge"],
        )

    job = _ModelCommand(
        "unmerge",
        checkpoint,
        checkpoint,
        loaded,
        references=adapters,
        card=card,
        guard=lambda lineage, records: history.check_unmerge(lineage, records, str(merged)),
        allow_lossy=allow_lossy,
    )
    return _run_model(
        job,
        output,
        dtype,
        max_shard_size,
        _Target(output and Path(output), overwrite, resume, options, command, began, push, stream),
    )


def _open_merged(reference: PathLike, progress: bool = False, remote: bool = False) -> Checkpoint:
    """The merged model unmerge and verify take first; an adapter given there (the arguments
    swapped) is named as such, not sent to the message about merge's base."""
    path = locate(reference, None, "MERGED", progress, remote=remote).path
    if _is_adapter_folder(path):
        raise BonemergeError(
            f"{reference} is a PEFT adapter, not a merged model; pass the merged model first and the "
            "adapters after it."
        )
    return open_checkpoint(path)


def _training(location: Location, command: str) -> tuple[Checkpoint, TrainingCheckpoint]:
    """The full PEFT checkpoint at `location`; anything else is named as what it is, with the
    command that takes it. `command` (unload, strip) is the one that asked."""
    name = location.hub_id or location.path
    unmerge = "to take merged adapters out of a model, use `bonemerge unmerge MERGED ADAPTER -o OUT`"
    if command == "unload" and _is_adapter_folder(location.path):
        raise BonemergeError(
            f"{name} is a PEFT adapter, not a full PEFT checkpoint: it holds no base weights to unload "
            f"(its base is the model its config names; {unmerge})."
        )
    checkpoint = open_checkpoint(location.path)
    if not is_training_checkpoint(checkpoint):
        if command == "strip":
            raise BonemergeError(
                f"{name} is a model, not an adapter (no adapter_config.json) or a full PEFT checkpoint (no "
                f"base_layer or adapter tensors); strip reads adapters and PeftModel checkpoints ({unmerge})."
            )
        raise BonemergeError(
            f"{name} is a model, not a full PEFT checkpoint (no base_layer or adapter tensors); unload "
            f"works on checkpoints saved from a PeftModel's state_dict ({unmerge})."
        )
    return checkpoint, read_training_checkpoint(checkpoint, with_blocks=command != "unload")


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
    from bonemerge.modelcard import render_card

    began = time.perf_counter()
    options = _options("cpu", "auto", True, progress)
    _check_stream(output, push, stream, overwrite)
    location = locate(checkpoint, None, "CHECKPOINT", progress, remote=stream)
    given, training = _training(location, "unload")
    adapters = [] if original_modules else [training.adapter(adapter_name)]
    kept = (
        "the original modules_to_save modules" if original_modules else "the trained modules_to_save copies"
    )
    name = location.hub_id or _input_path(given).name

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

    job = _ModelCommand(
        "unload", given, training.base, adapters, references=[checkpoint] * len(adapters), card=card
    )
    return _run_model(
        job,
        output,
        dtype,
        max_shard_size,
        _Target(output and Path(output), overwrite, resume, options, command, began, push, stream),
    )


def strip(
    source: PathLike,
    output: PathLike,
    *,
    adapter_name: str | None = None,
    include: str | None = None,
    exclude: str | None = None,
    layers: str | None = None,
    dtype: str = "auto",
    drop_modules_to_save: bool = False,
    to: str | None = None,
    base: PathLike | None = None,
    rank: int | str | None = None,
    max_error: float | None = None,
    overwrite: bool = False,
    progress: bool = False,
    command: str | None = None,
    push: Push | None = None,
) -> Report:
    """Write a reduced or converted adapter (adapter_config.json + adapter_model.safetensors)
    that PEFT loads. Converting to LoRA needs the base model (`base`, else the one the adapter's
    config names); an approximate conversion (Bat) needs `rank` (K, or "auto" with `max_error`)."""
    from bonemerge.adapter_reduction import StripOptions, build_strip_plan, needs_base, parse_layers
    from bonemerge.checkpoint.reader import InputWatch
    from bonemerge.engine import write_plan
    from bonemerge.modelcard import render_card

    began = time.perf_counter()
    location = locate(source, None, "SOURCE")
    path = location.path
    training = None
    if _is_adapter_folder(path):
        adapter = load_adapter(path)
    else:
        _, training = _training(location, "strip")
        adapter = training.adapter(adapter_name)
    strip_options = StripOptions(
        include=include,
        exclude=exclude,
        layers=parse_layers(layers) if layers else None,
        dtype=parse_dtype(dtype),
        drop_modules_to_save=drop_modules_to_save,
        to=to,
        rank=parse_rank(rank, max_error),
    )
    base_checkpoint = None
    if needs_base(adapter, strip_options):
        base_checkpoint = training.base if training and base is None else _conversion_base(adapter, base, to)
    elif base is not None:
        raise BonemergeError(
            "--base is only used when the strip needs the base model (converting to another method "
            "with --to lora, or filtering an adapter whose method sizes what it keeps from the base)."
        )
    inputs = [path] + ([_input_path(base_checkpoint)] if base_checkpoint and not training else [])
    target = check_output(output, inputs, overwrite)
    if push is not None:
        push.check()
    extracted = training is not None
    plan, config, summary = build_strip_plan(adapter, strip_options, base_checkpoint, extracted, progress)
    check_free_space(target, plan.file_bytes)
    lineage = history.read_history(path if path.is_dir() else None)
    records = _records([source], [adapter])
    watch = InputWatch(inputs := plan.input_files(), inputs)  # as opened, before the fingerprint
    watch.check()
    name = location.hub_id or path.name
    with Staging(target) as staging:
        stats = write_plan(plan, staging.path, _options("cpu", "auto", True, progress))
        (staging.path / "adapter_config.json").write_text(
            json.dumps(config, indent=2) + "\n", encoding="utf-8"
        )
        card = render_card(
            heading=summary.heading(name),
            summary=f"A {config['peft_type']} adapter made from `{name}`; the notes say what was done.",
            adapters=[],
            closing="Load it with `PeftModel.from_pretrained(base_model, this_folder)`.",
            command=command,
            notes=summary.actions(),
            base_hub_id=_hub_id_of(adapter),
            relation="adapter",
            library="peft",
            tags=[config["peft_type"].lower(), "strip"],
        )
        (staging.path / "README.md").write_text(card, encoding="utf-8")
        entry = _entry("strip", records, command)
        result = load_adapter(staging.path)
        entry["result"] = history.record(result, history.fingerprint(result))
        files = _write_adapter_manifest(staging.path, lineage, entry, config)
        watch.check()
        pushed = _publish(staging, overwrite, push, load_adapter)
    return Report(
        operation="strip",
        output=str(target),
        inputs=[str(path)],
        tensors_merged=0,
        tensors_copied=len(plan.steps) - summary.changed,
        tensors_converted=summary.changed,
        bytes_written=stats.bytes_written,
        seconds=round(time.perf_counter() - began, 3),
        files=files,
        notes=summary.actions(),
        pushed_to=pushed,
        conversion=summary.conversion.to_dict() if summary.conversion else None,
    )


def parse_rank(rank: int | str | None, max_error: float | None):
    """`--rank K` or `--rank auto --max-error E` as a `RankRequest`."""
    from bonemerge.methods import RankRequest

    if rank is None:
        if max_error is not None:
            raise BonemergeError("--max-error goes with --rank auto; pass both.")
        return RankRequest()
    if rank == "auto":
        if max_error is None or not 0 < max_error < 1:
            raise BonemergeError(
                "--rank auto needs --max-error E, a relative error between 0 and 1 (e.g. 0.01)."
            )
        return RankRequest(max_error=max_error)
    try:
        value = int(rank)
    except (TypeError, ValueError):
        raise BonemergeError(f"--rank {shown(rank)} is neither a positive integer nor auto.") from None
    if value <= 0:
        raise BonemergeError(f"--rank {shown(rank)} is neither a positive integer nor auto.")
    if max_error is not None:
        raise BonemergeError("--max-error goes with --rank auto, not with a fixed --rank.")
    return RankRequest(rank=value)


def _conversion_base(adapter: Adapter, base: PathLike | None, to: str | None) -> Checkpoint:
    """The model a conversion reads shapes (and, for Bat, weights) from: `base`, else the one
    the adapter's config names (a path is taken relative to the adapter folder)."""
    named = adapter.config.base_model
    if base is None and named and not Path(named).is_absolute() and (adapter.root / named).is_dir():
        base = adapter.root / named
    base = base or named
    if not base:
        raise BonemergeError(
            f"{f'converting {adapter.root} to {to}' if to else f'reducing {adapter.root}'} needs its base "
            "model, and its config names none; "
            "pass --base BASE."
        )
    revision = adapter.config.raw.get("revision") or None
    return open_checkpoint(locate(base, revision, "--base").path)


def _write_adapter_manifest(
    folder: Path, lineage: Sequence[dict] | None, entry: dict, config: dict
) -> list[str]:
    """bonemerge.json for an adapter bonemerge wrote: every file's size and digest (so that
    `verify --checksums` works on it) and its history. Returns every file name."""
    created = _now()
    fields = {
        "bonemerge": __version__,
        "operation": entry["operation"],
        "adapter": config["peft_type"],
        "command": entry["command"],
        "created": created,
        "history": [*(lineage or []), entry | {"created": created}],
    }
    return sorted([*write_manifest(folder, fields, {}), MANIFEST])


def push(folder: PathLike, target: Push) -> str:
    """Publish a folder bonemerge wrote (a model or an adapter) to the Hub; returns the URL."""
    from bonemerge.hub import push_folder

    path = Path(folder)
    if not path.is_dir():
        raise BonemergeError(f"{path} is not a folder; pass the output folder of a bonemerge command.")
    if _is_adapter_folder(path):
        load_adapter(path)
    else:
        open_checkpoint(path)
    target.check()
    return push_folder(path, target).url


def inspect(path: PathLike, base: PathLike | None = None) -> InspectReport:
    """What `path` is and holds, from headers only; with `base`, how its adapter fits that base
    (`report.ok` is False when it does not)."""
    from bonemerge.describe import InspectReport, inspect_path

    located = locate(path, None, "PATH")
    return InspectReport(
        inspect_path(located.path, None if base is None else locate(base, None, "--base").path)
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
    from bonemerge.plan import build_plan
    from bonemerge.verification import stored_cast, verify_plan

    began = time.perf_counter()
    options = _options(device, precision, safe_merge=False, progress=False)
    merged_checkpoint = _open_merged(merged)
    if base is None:
        if not adapters:
            raise BonemergeError(
                "pass the adapters merged into the model (and --base BASE, the model they "
                "were merged into, unless their config names it)."
            )
        first = _load_adapter(adapters[0], adapter_revision, False)
        base = named_base(first, adapters[0], base_revision).path
        base_revision = None
    model = _open_model(base, adapters, adapter_name, base_revision, adapter_revision)
    plan = build_plan(model.base, model.adapters)
    cast = stored_cast(plan, merged_checkpoint)
    if cast is not None:
        plan = build_plan(model.base, model.adapters, dtype=cast)
    exact, reason = _verify_mode(merged_checkpoint, model.adapters, options, _dtype_name(plan))
    last = (history.read_history(_folder(merged_checkpoint)) or [{}])[-1]
    # quantized weights are re-encoded with the rounding the merge used
    options = replace(options, rounding=last.get("rounding", "nearest"), seed=last.get("seed", 0))
    report = verify_plan(plan, merged_checkpoint, options, exact)
    report.reason = reason
    report.base = str(_input_path(model.base))
    report.stray = stray_weights(merged_checkpoint)
    report.seconds = round(time.perf_counter() - began, 3)
    return report


def _verify_mode(merged: Checkpoint, adapters: Sequence[Adapter], options, dtype: str) -> tuple[bool, str]:
    """Exact when the merged model's last history entry is a merge of these adapters into the
    `dtype` its tensors hold that this installation reproduces bit for bit; else tolerance,
    with the reason."""
    lineage = history.read_history(_folder(merged))
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
    from bonemerge.manifest import listed_files, read_manifest
    from bonemerge.verification import verify_checksums as check

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
