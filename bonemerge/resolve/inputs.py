"""Resolving a command's inputs: a base plus adapters, one full PEFT checkpoint standing for
both, or an adapter whose config names its base; local paths or Hub ids.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bonemerge.adapters import Adapter, load_adapter
from bonemerge.adapters.training import TrainingCheckpoint, is_training_checkpoint, read_training_checkpoint
from bonemerge.checkpoint import Checkpoint, open_checkpoint
from bonemerge.errors import AdapterError, BonemergeError
from bonemerge.resolve.hub import Location, locate

PathLike = str | os.PathLike[str]


def input_path(checkpoint: Checkpoint) -> Path:
    return checkpoint.root if checkpoint.is_folder else checkpoint.shards[0].path


def is_adapter_folder(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and not any(path.glob("model*.safetensors"))


def open_adapter(reference: PathLike, revision: str | None, progress: bool) -> Adapter:
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


def folder_of(checkpoint: Checkpoint) -> Path | None:
    return checkpoint.root if checkpoint.is_folder else None


@dataclass(frozen=True)
class ModelInputs:
    """A command's inputs, resolved: the checkpoint given, the model to build on, the adapters."""

    given: Checkpoint
    base: Checkpoint
    adapters: list[Adapter]
    base_hub_id: str | None


def open_model(
    reference: PathLike,
    adapters: Sequence[PathLike],
    adapter_name: str | None,
    base_revision: str | None,
    adapter_revision: str | None,
    progress: bool = False,
    remote: bool = False,
) -> ModelInputs:
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
        loaded = [open_adapter(a, adapter_revision, progress) for a in adapters]
        return ModelInputs(checkpoint, checkpoint, loaded, location.hub_id or hub_id_of(loaded[0]))
    location = locate(reference, adapter_revision, "--adapter", progress, remote=remote)
    if is_adapter_folder(location.path):
        adapter = load_adapter(location.path)
        base = named_base(adapter, reference, base_revision, progress, remote)
        checkpoint = open_checkpoint(base.path)
        return ModelInputs(checkpoint, checkpoint, [adapter], base.hub_id or hub_id_of(adapter))
    checkpoint = open_checkpoint(location.path)
    if not is_training_checkpoint(checkpoint):
        raise BonemergeError(
            f"no adapter was given for {reference}; pass at least one adapter folder after it."
        )
    training = read_training_checkpoint(checkpoint)
    adapter = training.adapter(adapter_name)
    return ModelInputs(checkpoint, training.base, [adapter], location.hub_id or hub_id_of(adapter))


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


def hub_id_of(adapter: Adapter) -> str | None:
    from bonemerge.output.card import hub_id

    return hub_id(adapter.config.base_model)


def open_merged(reference: PathLike, progress: bool = False, remote: bool = False) -> Checkpoint:
    """The merged model unmerge and verify take first; an adapter given there (the arguments
    swapped) is named as such, not sent to the message about merge's base."""
    path = locate(reference, None, "MERGED", progress, remote=remote).path
    if is_adapter_folder(path):
        raise BonemergeError(
            f"{reference} is a PEFT adapter, not a merged model; pass the merged model first and the "
            "adapters after it."
        )
    return open_checkpoint(path)


def open_training(location: Location, command: str) -> tuple[Checkpoint, TrainingCheckpoint]:
    """The full PEFT checkpoint at `location`; anything else is named as what it is, with the
    command that takes it. `command` (unload, strip) is the one that asked."""
    name = location.hub_id or location.path
    unmerge = "to take merged adapters out of a model, use `bonemerge unmerge MERGED ADAPTER -o OUT`"
    if command == "unload" and is_adapter_folder(location.path):
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


def conversion_base(adapter: Adapter, base: PathLike | None, to: str | None) -> Checkpoint:
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
