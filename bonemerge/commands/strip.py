"""`strip`: reduce or convert an adapter, written as a new adapter folder."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from bonemerge import __version__
from bonemerge.adapters import load_adapter
from bonemerge.checks.dtype_names import parse_dtype
from bonemerge.checks.preflight import engine_options
from bonemerge.errors import BonemergeError, shown
from bonemerge.output import history
from bonemerge.output.model import Target, history_entry, history_records, now, write_output
from bonemerge.output.push import Push
from bonemerge.output.staging import Staging, check_output
from bonemerge.report.summary import Report
from bonemerge.resolve.hub import locate
from bonemerge.resolve.inputs import (
    PathLike,
    conversion_base,
    hub_id_of,
    input_path,
    is_adapter_folder,
    open_training,
)

if TYPE_CHECKING:
    from bonemerge.run.work import EngineStats


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
    from bonemerge.output.card import render_card
    from bonemerge.plan.reduction import StripOptions, build_strip_plan, needs_base, parse_layers

    began = time.perf_counter()
    location = locate(source, None, "SOURCE")
    path = location.path
    training = None
    if is_adapter_folder(path):
        adapter = load_adapter(path)
    else:
        _, training = open_training(location, "strip")
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
        base_checkpoint = training.base if training and base is None else conversion_base(adapter, base, to)
    elif base is not None:
        raise BonemergeError(
            "--base is only used when the strip needs the base model (converting to another method "
            "with --to lora, or filtering an adapter whose method sizes what it keeps from the base)."
        )
    inputs = [path] + ([input_path(base_checkpoint)] if base_checkpoint and not training else [])
    target = check_output(output, inputs, overwrite)
    if push is not None:
        push.check()
    extracted = training is not None
    plan, config, summary = build_strip_plan(adapter, strip_options, base_checkpoint, extracted, progress)
    lineage = history.read_history(path if path.is_dir() else None)
    records = history_records([source], [adapter])
    name = location.hub_id or path.name

    def fill(staging: Staging, stats: EngineStats) -> dict:
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
            base_hub_id=hub_id_of(adapter),
            relation="adapter",
            library="peft",
            tags=[config["peft_type"].lower(), "strip"],
        )
        (staging.path / "README.md").write_text(card, encoding="utf-8")
        entry = history_entry("strip", records, command)
        result = load_adapter(staging.path)
        entry["result"] = history.record(result, history.fingerprint(result))
        return adapter_manifest(lineage, entry, config)

    written = write_output(
        plan,
        Target(target, overwrite, False, engine_options("cpu", "auto", True, progress), command, began, push),
        fill=fill,
        check=load_adapter,
        notes=[],
    )
    stats, files, pushed = written.stats, written.files, written.pushed
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


def adapter_manifest(lineage: Sequence[dict] | None, entry: dict, config: dict) -> dict:
    """bonemerge.json's fields for an adapter bonemerge wrote: what made it and its history
    (`write_output` adds every file's size and digest, so that `verify --checksums` works)."""
    created = now()
    return {
        "bonemerge": __version__,
        "operation": entry["operation"],
        "adapter": config["peft_type"],
        "command": entry["command"],
        "created": created,
        "history": [*(lineage or []), entry | {"created": created}],
    }
