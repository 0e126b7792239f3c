"""The public Python API: each function runs one command end to end and returns a report.

The order inside each command is the safety contract: resolve and validate every input (Hub
ids are downloaded first), check the push target, plan, check adapter blocks and free space,
and only then start the long I/O into a staging folder that becomes the output in one rename
when everything has been written and fsynced. Only a published, re-validated output is pushed.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bonemerge import __version__
from bonemerge.adapters import Adapter, load_adapter
from bonemerge.adapters.training import TrainingCheckpoint, is_training_checkpoint, read_training_checkpoint
from bonemerge.checkpoint import Checkpoint, MemoryTensor, RangeReader, dtypes, layout, open_checkpoint
from bonemerge.errors import AdapterError, BonemergeError
from bonemerge.hub import Location, Push, locate
from bonemerge.manifest import MANIFEST, write_manifest
from bonemerge.output import Staging, check_free_space, check_output

PRECISIONS = ("auto", "fp32", "fp64")
DTYPES = ("auto", "bfloat16", "float16", "float32")

PathLike = str | os.PathLike[str]


@dataclass
class Report:
    """What a command wrote; `--json` prints exactly this. `tensors_merged` counts the tensors
    whose blocks were merged (or, for unmerge, taken out)."""

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

    def to_dict(self) -> dict:
        return asdict(self)


def parse_dtype(dtype: str | None) -> str | None:
    """`auto` (or None) -> None, keeping each tensor's dtype; `bfloat16` -> `BF16`."""
    if dtype in (None, "auto"):
        return None
    if dtype not in DTYPES:
        raise BonemergeError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    return dtypes.BY_TORCH_NAME[dtype]


def _options(device: str, precision: str, safe_merge: bool, progress: bool):
    from bonemerge.engine import EngineOptions

    if precision not in PRECISIONS:
        raise BonemergeError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    check_device(device)
    return EngineOptions(device=device, precision=precision, safe_merge=safe_merge, progress=progress)


def check_device(device: str) -> None:
    """Only the CPU and CUDA devices run bonemerge's maths; anything else torch accepts (`meta`,
    `xpu`, `mps`...) would fail deep in a run, so it is refused before any work."""
    import torch

    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise BonemergeError(f"unknown or unsupported device {device!r}; use cpu, cuda or cuda:N.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BonemergeError(f"--device {device} was asked for, but torch sees no CUDA device here.")
    if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise BonemergeError(
            f"--device {device} was asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)."
        )


def _shard_bytes(max_shard_size: str | int | None) -> int | None:
    return layout.parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size


def _blocks(adapters: Sequence[Adapter]):
    """Every block of `adapters` as a tensor, read one at a time."""
    import torch

    with RangeReader() as reader:
        for adapter in adapters:
            for block in adapter.blocks:
                source = block.tensor
                if isinstance(source, MemoryTensor):
                    yield adapter, block, source.tensor
                    continue
                raw = reader.read(source.path, source.offset, source.nbytes)
                if not raw:
                    yield adapter, block, torch.empty(source.shape, dtype=dtypes.to_torch(source.dtype))
                    continue
                yield (
                    adapter,
                    block,
                    torch.frombuffer(raw, dtype=dtypes.to_torch(source.dtype)).view(source.shape),
                )


def check_blocks_finite(adapters: Sequence[Adapter]) -> None:
    """Refuse NaN/Inf in any block before the output is even created, reading each block in
    bounded pieces: blocks of large adapters (or of a lying header) can be gigabytes."""
    from bonemerge.checkpoint.tensors import pieces
    from bonemerge.engine import all_finite

    with RangeReader() as reader:
        for adapter in adapters:
            for block in adapter.blocks:
                if not all(all_finite(values) for values in pieces(reader, block.tensor)):
                    raise AdapterError(
                        f"block {block.key} of {adapter.root} holds NaN or Inf values; the adapter "
                        "is broken (its training diverged), nothing was written."
                    )


def check_invertible(adapters: Sequence[Adapter]) -> None:
    """Refuse, before any output exists, a Bat block whose I + B cannot be inverted reliably."""
    import torch

    from bonemerge import maths
    from bonemerge.errors import MergeError

    for adapter, block, values in _blocks(adapters):
        if block.variant != "bat":
            continue
        r = values.shape[-1]
        try:
            maths.prepare("bat", values, (values.shape[0] * r, r), torch.float64, inverse=True)
        except MergeError as exc:
            raise MergeError(f"block {block.key} of {adapter.root}: {exc}; nothing was written.") from None


def _input_path(checkpoint: Checkpoint) -> Path:
    return checkpoint.root if checkpoint.is_folder else checkpoint.shards[0].path


def _is_adapter_folder(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and not any(path.glob("model*.safetensors"))


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
) -> _Model:
    """A plain base plus adapter folders, one full PEFT checkpoint standing for both, or one
    adapter whose config names its base (`base_model_name_or_path` and `revision`)."""
    if adapters:
        location = locate(reference, base_revision, "--base", progress)
        checkpoint = open_checkpoint(location.path)
        if is_training_checkpoint(checkpoint):
            raise BonemergeError(
                f"{reference} is a full PEFT checkpoint that carries its own adapter; pass it alone "
                "(bonemerge merge CHECKPOINT --output OUT)."
            )
        loaded = [load_adapter(locate(a, adapter_revision, "--adapter", progress).path) for a in adapters]
        return _Model(checkpoint, checkpoint, loaded, location.hub_id or _hub_id_of(loaded[0]))
    location = locate(reference, adapter_revision, "--adapter", progress)
    if _is_adapter_folder(location.path):
        adapter = load_adapter(location.path)
        named = adapter.config.base_model
        if not named:
            raise BonemergeError(
                f"{reference} is an adapter whose config does not name its base model; pass the base first."
            )
        revision = base_revision or adapter.config.raw.get("revision") or None
        base = locate(named, revision, "--base", progress, relative_to=adapter.root)
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


def _hub_id_of(adapter: Adapter) -> str | None:
    from bonemerge.modelcard import hub_id

    return hub_id(adapter.config.base_model)


def _card_adapters(adapters: Sequence[Adapter]):
    from bonemerge.modelcard import AppliedAdapter

    return [AppliedAdapter(a.label, a.config.describe(), a.config.tag) for a in adapters]


@dataclass(frozen=True)
class _Target:
    """Where and how a command writes: the same for every command that makes a model."""

    path: Path
    overwrite: bool
    resume: bool
    options: object
    command: str | None
    began: float
    push: Push | None


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
    card: str,
    tokenizer_from_adapters: bool,
) -> Report:
    """Stream `plan` into the staging folder with index, companions, card and a manifest of
    every file's SHA-256, checking that no input changes meanwhile; then publish."""
    from bonemerge import companions
    from bonemerge.checkpoint.reader import InputWatch
    from bonemerge.engine import write_plan

    roots = [a.root for a in adapters] if tokenizer_from_adapters else []
    own = [s.filename for s in plan.shards] + [plan.index_name] * plan.write_index + ["README.md", MANIFEST]
    extras = companions.plan_companions(source, roots, own)
    check_free_space(target.path, plan.file_bytes + extras.bytes)
    options = target.options
    fingerprint = plan.fingerprint(version=__version__, precision=options.precision, device=options.device)
    watch = InputWatch(plan.input_files(), {s.path: s.identity for s in source.shards})
    notes = list(plan.notes) + list(extras.notes)
    with Staging(target.path, fingerprint, target.resume) as staging:
        if staging.reused:
            notes.append(f"reused {len(staging.reused)} finished shard(s) of an interrupted run (--resume)")

        def shard_done(file: str, size: int, digest: str) -> None:
            watch.check()
            staging.record(file, size, digest)

        stats = write_plan(plan, staging.path, options, skip=staging.finished, shard_done=shard_done)
        if plan.write_index:
            index = json.dumps(layout.index_json(plan.shards), indent=2)
            (staging.path / plan.index_name).write_text(index + "\n", encoding="utf-8")
        companions.write_companions(extras, plan.config_updates, staging.path)
        (staging.path / "README.md").write_text(card, encoding="utf-8")
        manifest = {
            "bonemerge": __version__,
            "operation": operation,
            "inputs": [str(_input_path(source)), *(str(a.root) for a in adapters)],
            "adapters": [a.label for a in adapters],
            "dtype": dtypes.TORCH_NAME.get(plan.main_dtype, plan.main_dtype),
            "command": target.command,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        files = write_manifest(staging.path, manifest, staging.finished)
        watch.check()
        pushed = _publish(staging, target.overwrite, target.push, open_checkpoint)
    return Report(
        operation=operation,
        output=str(target.path),
        inputs=manifest["inputs"],
        tensors_merged=stats.merged,
        tensors_copied=stats.copied,
        tensors_converted=stats.converted,
        bytes_written=stats.bytes_written,
        seconds=round(time.perf_counter() - target.began, 3),
        files=sorted([*files, MANIFEST]),
        notes=notes,
        pushed_to=pushed,
    )


def merge(
    base: PathLike,
    adapters: Sequence[PathLike],
    output: PathLike,
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
) -> Report:
    """Merge `adapters`, in order, into the model at `base`, writing a new model at `output`.

    `base` and each adapter are local folders or Hub ids (`org/name`, `org/name@revision`).
    With `adapters` empty, `base` must be a full PEFT checkpoint, whose own blocks merge into its
    own base weights (`adapter_name` picks one adapter when it holds several), or an adapter,
    whose config names the base to merge into. `push` publishes the result once it is complete.
    """
    from bonemerge.modelcard import render_card
    from bonemerge.plan import build_plan

    began = time.perf_counter()
    options = _options(device, precision, safe_merge, progress)
    model = _open_model(base, adapters, adapter_name, base_revision, adapter_revision, progress)
    target = check_output(output, [_input_path(model.given), *(a.root for a in model.adapters)], overwrite)
    if push is not None:
        push.check()
    plan = build_plan(
        model.base, model.adapters, dtype=parse_dtype(dtype), max_shard_bytes=_shard_bytes(max_shard_size)
    )
    check_blocks_finite(model.adapters)
    name = model.base_hub_id or _input_path(model.given).name
    count = len(model.adapters)
    card = render_card(
        heading=f"{name} with {count} adapter{'s' if count != 1 else ''} merged",
        summary=f"This model is `{name}` with these adapters merged into its weights, in this order:",
        adapters=_card_adapters(model.adapters),
        closing=f"Weights are stored as {dtypes.TORCH_NAME.get(plan.main_dtype, plan.main_dtype)}. "
        "It loads like any `transformers` model; PEFT is not needed.",
        command=command,
        notes=plan.notes,
        base_hub_id=model.base_hub_id,
        relation="finetune",
        tags=["merge"],
    )
    return _write_model(
        "merge",
        plan,
        _Target(target, overwrite, resume, options, command, began, push),
        source=model.base,
        adapters=model.adapters,
        card=card,
        tokenizer_from_adapters=True,
    )


def unmerge(
    merged: PathLike,
    adapters: Sequence[PathLike],
    output: PathLike,
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
) -> Report:
    """Take `adapters` (given in the order they were merged) back out of the model at `merged`."""
    from bonemerge.modelcard import render_card
    from bonemerge.plan import build_plan

    began = time.perf_counter()
    options = _options(device, precision, safe_merge, progress)
    if not adapters:
        raise BonemergeError("no adapter was given; pass the adapters that were merged into the model.")
    checkpoint = open_checkpoint(locate(merged, None, "MERGED", progress).path)
    loaded = [load_adapter(locate(a, adapter_revision, "--adapter", progress).path) for a in adapters]
    target = check_output(output, [_input_path(checkpoint), *(a.root for a in loaded)], overwrite)
    if push is not None:
        push.check()
    plan = build_plan(
        checkpoint,
        loaded,
        operation="unmerge",
        dtype=parse_dtype(dtype),
        max_shard_bytes=_shard_bytes(max_shard_size),
        allow_lossy=allow_lossy,
    )
    check_blocks_finite(loaded)
    check_invertible(loaded)
    name = _input_path(checkpoint).name
    card = render_card(
        heading=f"{name} with {len(loaded)} adapter{'s' if len(loaded) != 1 else ''} taken out",
        summary=f"This model is `{name}` with these adapters unmerged from its weights, last first:",
        adapters=_card_adapters(list(reversed(loaded))),
        closing="Unmerging inverts the merge maths exactly; on 16-bit weights the result can differ "
        "from the original base by the rounding the merged model went through.",
        command=command,
        notes=plan.notes,
        base_hub_id=_hub_id_of(loaded[0]),
        tags=["unmerge"],
    )
    return _write_model(
        "unmerge",
        plan,
        _Target(target, overwrite, resume, options, command, began, push),
        source=checkpoint,
        adapters=loaded,
        card=card,
        tokenizer_from_adapters=False,
    )


def _training(location: Location) -> tuple[Checkpoint, TrainingCheckpoint]:
    checkpoint = open_checkpoint(location.path)
    if not is_training_checkpoint(checkpoint):
        raise BonemergeError(
            f"{location.hub_id or location.path} is not a full PEFT checkpoint (no base_layer or Bone/MiSS "
            "block tensors); unload works on checkpoints saved from a PeftModel's state_dict."
        )
    return checkpoint, read_training_checkpoint(checkpoint)


def unload(
    checkpoint: PathLike,
    output: PathLike,
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
) -> Report:
    """The plain base model inside a full PEFT checkpoint, without merging its blocks.

    Like PEFT's `unload()`, trained modules_to_save copies replace the originals, unless
    `original_modules` keeps the originals instead.
    """
    from bonemerge.modelcard import render_card
    from bonemerge.plan import build_plan

    began = time.perf_counter()
    options = _options("cpu", "auto", True, progress)
    location = locate(checkpoint, None, "CHECKPOINT", progress)
    given, training = _training(location)
    adapters = [] if original_modules else [training.adapter(adapter_name)]
    target = check_output(output, [_input_path(given)], overwrite)
    if push is not None:
        push.check()
    plan = build_plan(
        training.base,
        adapters,
        operation="unload",
        dtype=parse_dtype(dtype),
        max_shard_bytes=_shard_bytes(max_shard_size),
    )
    kept = (
        "the original modules_to_save modules" if original_modules else "the trained modules_to_save copies"
    )
    name = location.hub_id or _input_path(given).name
    card = render_card(
        heading=f"Base model of {name}",
        summary=f"This model is the base inside the PEFT training checkpoint `{name}`, "
        f"with its Bone/MiSS blocks left out (not merged) and {kept}.",
        adapters=[],
        closing="It loads like any `transformers` model.",
        command=command,
        notes=plan.notes,
        tags=["unload"],
    )
    return _write_model(
        "unload",
        plan,
        _Target(target, overwrite, resume, options, command, began, push),
        source=training.base,
        adapters=[],
        card=card,
        tokenizer_from_adapters=False,
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
    overwrite: bool = False,
    command: str | None = None,
    push: Push | None = None,
) -> Report:
    """Write a reduced adapter (adapter_config.json + adapter_model.safetensors) that PEFT loads."""
    from bonemerge.engine import write_plan
    from bonemerge.modelcard import render_card
    from bonemerge.strip import StripOptions, build_strip_plan, parse_layers

    began = time.perf_counter()
    location = locate(source, None, "SOURCE")
    path = location.path
    if _is_adapter_folder(path):
        adapter = load_adapter(path)
    else:
        _, training = _training(location)
        adapter = training.adapter(adapter_name)
    target = check_output(output, [path], overwrite)
    if push is not None:
        push.check()
    strip_options = StripOptions(
        include=include,
        exclude=exclude,
        layers=parse_layers(layers) if layers else None,
        dtype=parse_dtype(dtype),
        drop_modules_to_save=drop_modules_to_save,
        to=to,
    )
    plan, config = build_strip_plan(adapter, strip_options)
    check_free_space(target, plan.file_bytes)
    kept = sum(1 for name in plan.steps if name.endswith("_block"))
    name = location.hub_id or path.name
    with Staging(target) as staging:
        stats = write_plan(plan, staging.path, _options("cpu", "auto", True, False))
        (staging.path / "adapter_config.json").write_text(
            json.dumps(config, indent=2) + "\n", encoding="utf-8"
        )
        card = render_card(
            heading=f"Reduced adapter from {name}",
            summary=f"A {config['peft_type']} adapter with {kept} of the {len(adapter.blocks)} "
            f"blocks of `{name}`.",
            adapters=[],
            closing="Load it with `PeftModel.from_pretrained(base_model, this_folder)`.",
            command=command,
            base_hub_id=_hub_id_of(adapter),
            relation="adapter",
            library="peft",
            tags=[{"BONE": "bone", "MISS": "miss"}[config["peft_type"]]],
        )
        (staging.path / "README.md").write_text(card, encoding="utf-8")
        fields = {"bonemerge": __version__, "operation": "strip", "inputs": [str(path)], "command": command}
        files = write_manifest(staging.path, fields, {})
        pushed = _publish(staging, overwrite, push, load_adapter)
    return Report(
        operation="strip",
        output=str(target),
        inputs=[str(path)],
        tensors_merged=0,
        tensors_copied=stats.copied,
        tensors_converted=stats.converted,
        bytes_written=stats.bytes_written,
        seconds=round(time.perf_counter() - began, 3),
        files=sorted([*files, MANIFEST]),
        notes=[f"kept {kept} of {len(adapter.blocks)} blocks"],
        pushed_to=pushed,
    )


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


def inspect(path: PathLike, base: PathLike | None = None) -> dict:
    """What `path` is and holds, from headers only; with `base`, how its adapter fits that base."""
    from bonemerge.describe import inspect_path

    located = locate(path, None, "PATH")
    return inspect_path(located.path, None if base is None else locate(base, None, "--base").path)


def verify(
    merged: PathLike,
    base: PathLike,
    adapters: Sequence[PathLike] = (),
    *,
    adapter_name: str | None = None,
    base_revision: str | None = None,
    adapter_revision: str | None = None,
    device: str = "cpu",
    precision: str = "auto",
):
    """Recompute the merge of `adapters` into `base` and compare it with `merged`, tensor by tensor."""
    from bonemerge.checkpoint.folder import stray_weights
    from bonemerge.plan import build_plan
    from bonemerge.verify import verify_plan

    began = time.perf_counter()
    options = _options(device, precision, safe_merge=False, progress=False)
    merged_checkpoint = open_checkpoint(locate(merged, None, "MERGED").path)
    model = _open_model(base, adapters, adapter_name, base_revision, adapter_revision)
    plan = build_plan(model.base, model.adapters)
    report = verify_plan(plan, merged_checkpoint, options)
    report.stray = stray_weights(merged_checkpoint)
    report.seconds = round(time.perf_counter() - began, 3)
    return report


def verify_checksums(merged: PathLike):
    """Check every file of a bonemerge output against the SHA-256 its manifest recorded."""
    from bonemerge.checkpoint.folder import loader_weights
    from bonemerge.manifest import listed_files, read_manifest
    from bonemerge.verify import verify_checksums as check

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
