"""Full PeftModel state dicts, as training frameworks save them, read as a base plus adapters.

Trainers checkpoint `get_peft_model(...).state_dict()`: the frozen base under
`...q_proj.base_layer.weight`, each adapter's tensors with its name inside the key
(`...q_proj.bone_block.<adapter>`, `...q_proj.lora_A.<adapter>.weight`), and modules_to_save
twice, as `...classifier.original_module.weight` and
`...classifier.modules_to_save.<adapter>.weight`. Read as a plain base (original modules,
model names) and one `Adapter` per adapter name (blocks plus trained copies), such a file
needs no new maths: merging, unloading and stripping are the ordinary plans over this view.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from bonemerge.adapters.config import read_adapter_config
from bonemerge.adapters.loader import PREFIX, Adapter, check_real, make_blocks
from bonemerge.adapters.scope import check_scope
from bonemerge.checkpoint import Checkpoint, Source
from bonemerge.errors import AdapterError, shown
from bonemerge.methods import PEFT_TENSOR, Method, claim_training, supported

_SAVED = re.compile(r"^(?P<module>.+)\.modules_to_save\.(?P<name>[^.]+)\.(?P<rest>.+)$")
_ORIGINAL = ".original_module."
_WRAPPERS = re.compile(r"(?:\.base_layer)+\.")


@dataclass(frozen=True)
class TrainingCheckpoint:
    """A full PEFT checkpoint: the base it wraps and the adapters it carries, by name."""

    path: Path
    base: Checkpoint
    adapters: dict[str, Adapter]

    def adapter(self, name: str | None) -> Adapter:
        """The adapter called `name`, or the only one; several need a name to choose."""
        if name is None:
            if len(self.adapters) > 1:
                raise AdapterError(
                    f"{self.path} holds the adapters {', '.join(sorted(self.adapters))}; "
                    "choose one with --adapter-name."
                )
            return next(iter(self.adapters.values()))
        if name not in self.adapters:
            raise AdapterError(
                f"{self.path} holds no adapter named {shown(name)} "
                f"(it holds {', '.join(sorted(self.adapters))})."
            )
        return self.adapters[name]


def is_training_checkpoint(checkpoint: Checkpoint) -> bool:
    """True when tensor names are those of a PeftModel (adapter tensors or `base_layer` wrappers)."""
    return any(
        name.startswith(PREFIX) and (".base_layer." in name or claim_training(name[len(PREFIX) :]))
        for name in checkpoint.tensors
    )


def _where(checkpoint: Checkpoint) -> Path:
    return checkpoint.root / checkpoint.index_name if checkpoint.index_name else checkpoint.shards[0].path


def _config_file(root: Path, name: str, several: bool) -> Path | None:
    if (root / name / "adapter_config.json").is_file():
        return root / name
    if (root / "adapter_config.json").is_file() and (name == "default" or not several):
        return root
    return None


def read_training_checkpoint(checkpoint: Checkpoint, with_blocks: bool = True) -> TrainingCheckpoint:
    """Split a full PEFT checkpoint into its base and its adapters (headers only). With
    `with_blocks` False (for `unload`, which applies none) the adapters carry only their saved
    full tensors, so that a config the blocks would need (LoRA's lora_alpha) is not demanded."""
    where = _where(checkpoint)
    plain: dict[str, str] = {}
    found: dict[str, dict[str, dict[str, Source]]] = defaultdict(dict)
    keys: dict[str, dict[str, dict[str, str]]] = defaultdict(dict)
    saved: dict[str, dict[str, str]] = defaultdict(dict)
    shared: dict[str, dict[str, str]] = defaultdict(dict)
    methods: dict[str, set[tuple[Method, str]]] = defaultdict(set)
    for key in checkpoint.tensors:
        # tensors a tuner keeps for the whole adapter sit beside the model (`base_model.vera_A.<name>`)
        name = key.removeprefix(PREFIX)
        claimed = claim_training(name)
        if not key.startswith(PREFIX) and not (claimed and claimed[1].shared):
            raise AdapterError(
                f"{where} mixes PeftModel names with the plain name {shown(key)}; it is not a checkpoint "
                "PEFT wrote, re-save it from the PeftModel."
            )
        if claimed and claimed[1].shared:
            method, claim = claimed
            check_real(key, checkpoint.tensors[key], where)
            shared[str(claim.adapter_name)][claim.part] = key
            methods[str(claim.adapter_name)].add((method, str(claim.peft_type)))
            continue
        if claimed:
            method, claim = claimed
            check_real(key, checkpoint.tensors[key], where)
            adapter = str(claim.adapter_name)
            parts = found[adapter].setdefault(claim.module, {})
            if claim.part in parts:
                raise AdapterError(
                    f"{where} holds two {claim.part} tensors for {claim.module} of {shown(adapter)}."
                )
            parts[claim.part] = checkpoint.tensors[key]
            keys[adapter].setdefault(claim.module, {})[claim.part] = key
            methods[adapter].add((method, str(claim.peft_type)))
            continue
        if copy := _SAVED.match(name):
            saved[copy["name"]][f"{copy['module']}.{copy['rest']}"] = key
            continue
        if PEFT_TENSOR.search(name):
            raise AdapterError(
                f"{where} holds {key}, a tensor of a PEFT method bonemerge does not know; it works "
                f"with {supported()} only."
            )
        # a module with several targeted parameters is wrapped once per parameter
        target = _WRAPPERS.sub(".", name).replace(_ORIGINAL, ".")
        if target in plain:
            raise AdapterError(
                f"{where} holds both {plain[target]} and {key} for {target}; re-save the checkpoint."
            )
        plain[target] = key
    if not found:
        raise AdapterError(f"{where} is a PeftModel checkpoint without adapter tensors; nothing to do.")

    tensors = {name: checkpoint.tensors[key] for name, key in plain.items()}
    base = replace(
        checkpoint,
        tensors=tensors,
        shard_of={name: checkpoint.shard_of[key] for name, key in plain.items()},
    )
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    adapters = {}
    for adapter_name, modules in sorted(found.items()):
        if len(methods[adapter_name]) > 1:
            kinds = ", ".join(sorted(peft_type for _, peft_type in methods[adapter_name]))
            raise AdapterError(f"adapter {shown(adapter_name)} in {where} mixes tensors of {kinds}.")
        method, peft_type = methods[adapter_name].pop()
        folder = _config_file(checkpoint.root, adapter_name, len(found) > 1)
        copies = saved.get(adapter_name, {})
        if folder is not None:
            config = read_adapter_config(folder)
            if config.peft_type != peft_type:
                raise AdapterError(
                    f"{folder / 'adapter_config.json'} says {config.peft_type} but {where} holds "
                    f"{peft_type} tensors for adapter {shown(adapter_name)}."
                )
        else:
            config = method.infer_config(peft_type, list(modules.items()), shapes, list(copies), where)
        wide = shared.get(adapter_name, {})
        made = (
            make_blocks(
                config,
                modules,
                keys[adapter_name],
                {part: checkpoint.tensors[key] for part, key in wide.items()},
                wide,
                where,
            )
            if with_blocks
            else ()
        )
        if folder is not None:
            check_scope(made, config.raw, folder / "adapter_config.json", where)
        replacements = {name: checkpoint.tensors[key] for name, key in copies.items()}
        adapters[adapter_name] = Adapter(
            checkpoint.root, where, config, made, replacements, name=adapter_name
        )
    return TrainingCheckpoint(where, base, adapters)
