"""Full PeftModel state dicts, as training frameworks save them, read as a base plus adapters.

Trainers checkpoint `get_peft_model(...).state_dict()`: the frozen base under
`...q_proj.base_layer.weight`, blocks under `...q_proj.bone_block.<adapter>`, and
modules_to_save twice, as `...classifier.original_module.weight` and
`...classifier.modules_to_save.<adapter>.weight`. Read as a plain base (original modules,
model names) and one `Adapter` per adapter name (blocks plus trained copies), such a file
needs no new maths: merging, unloading and stripping are the ordinary plans over this view.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from bonemerge.adapters.config import METHODS, AdapterConfig, read_adapter_config
from bonemerge.adapters.loader import OTHER_METHOD, PREFIX, Adapter, Block, block_variant
from bonemerge.checkpoint import Checkpoint, TensorRef
from bonemerge.errors import AdapterError

_BLOCK = re.compile(r"^(?P<module>.+)\.(?P<method>bone|miss)_block\.(?P<name>[^.]+)$")
_SAVED = re.compile(r"^(?P<module>.+)\.modules_to_save\.(?P<name>[^.]+)\.(?P<rest>.+)$")
_ORIGINAL = ".original_module."


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
                f"{self.path} holds no adapter named {name!r} (it holds {', '.join(sorted(self.adapters))})."
            )
        return self.adapters[name]


def is_training_checkpoint(checkpoint: Checkpoint) -> bool:
    """True when tensor names are those of a PeftModel (blocks or `base_layer` wrappers)."""
    return any(
        name.startswith(PREFIX) and (_BLOCK.match(name) or ".base_layer." in name)
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


def _inferred_config(
    method: str, blocks: list[tuple[str, str, TensorRef]], base: Checkpoint, saved: list[str], where: Path
) -> AdapterConfig:
    """The config PEFT would have written, recovered from block shapes."""
    found = set()
    for module, key, ref in blocks:
        shape = ref.shape
        weight = base.tensors.get(module + ".weight")
        out_features = weight.shape[0] if weight is not None and weight.shape else None
        if len(shape) == 3:
            found.add(("bat", shape[-1], None))
        elif len(shape) == 2 and shape[1] == out_features:
            found.add(("default", shape[0], None))
        elif len(shape) == 2:
            found.add(("mini", shape[0], shape[1]))
        else:
            raise AdapterError(
                f"block {key} in {where} has shape {list(shape)}; Bone/MiSS blocks are 2-D or 3-D."
            )
    if len(found) != 1:
        raise AdapterError(
            f"the blocks in {where} do not share one variant and r ({sorted(map(str, found))}); "
            "put the adapter's adapter_config.json next to the checkpoint."
        )
    variant, r, mini_r = found.pop()
    raw = {
        "peft_type": method,
        "r": r,
        "init_weights": {"default": True, "bat": "bat", "mini": "mini"}[variant],
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m, _, _ in blocks}),
        "modules_to_save": sorted({m.rsplit(".", 1)[0] for m in saved}) or None,
        "bias": "none",
        "inference_mode": True,
        "base_model_name_or_path": None,
        "task_type": None,
    }
    if method == "MISS":
        raw |= {"mini_r": mini_r or 1, "miss_dropout": 0.0}
    return AdapterConfig(method, variant, r, mini_r, raw)


def read_training_checkpoint(checkpoint: Checkpoint) -> TrainingCheckpoint:
    """Split a full PEFT checkpoint into its base and its adapters (headers only)."""
    where = _where(checkpoint)
    plain: dict[str, str] = {}
    blocks: dict[str, list[tuple[str, str, TensorRef]]] = defaultdict(list)
    saved: dict[str, dict[str, str]] = defaultdict(dict)
    methods: dict[str, set[str]] = defaultdict(set)
    for key in checkpoint.tensors:
        if not key.startswith(PREFIX):
            raise AdapterError(
                f"{where} mixes PeftModel names with the plain name {key!r}; it is not a checkpoint "
                "PEFT wrote, re-save it from the PeftModel."
            )
        name = key[len(PREFIX) :]
        if block := _BLOCK.match(name):
            blocks[block["name"]].append((block["module"], key, checkpoint.tensors[key]))
            methods[block["name"]].add(block["method"].upper())
            continue
        if copy := _SAVED.match(name):
            saved[copy["name"]][f"{copy['module']}.{copy['rest']}"] = key
            continue
        if OTHER_METHOD.search(name):
            raise AdapterError(
                f"{where} holds {key}, a tensor of another PEFT method; bonemerge works with Bone "
                "and MiSS only."
            )
        target = name.replace(".base_layer.", ".").replace(_ORIGINAL, ".")
        if target in plain:
            raise AdapterError(
                f"{where} holds both {plain[target]} and {key} for {target}; re-save the checkpoint."
            )
        plain[target] = key
    if not blocks:
        raise AdapterError(f"{where} is a PeftModel checkpoint without Bone or MiSS blocks; nothing to do.")

    tensors = {name: checkpoint.tensors[key] for name, key in plain.items()}
    base = replace(
        checkpoint,
        tensors=tensors,
        shard_of={name: checkpoint.shard_of[key] for name, key in plain.items()},
    )
    adapters = {}
    for adapter_name, found in sorted(blocks.items()):
        if len(methods[adapter_name]) > 1:
            raise AdapterError(
                f"adapter {adapter_name!r} in {where} mixes bone_block and miss_block tensors."
            )
        method = methods[adapter_name].pop()
        folder = _config_file(checkpoint.root, adapter_name, len(blocks) > 1)
        copies = saved.get(adapter_name, {})
        if folder is not None:
            config = read_adapter_config(folder)
            if config.method != method:
                raise AdapterError(
                    f"{folder / 'adapter_config.json'} says {config.method} but {where} holds "
                    f"{METHODS[method]} tensors for adapter {adapter_name!r}."
                )
        else:
            config = _inferred_config(method, found, base, list(copies), where)
        adapter_blocks = tuple(
            Block(module, key, ref, block_variant(config, key, ref.shape, where), config.r, config.mini_r)
            for module, key, ref in found
        )
        replacements = {name: checkpoint.tensors[key] for name, key in copies.items()}
        adapters[adapter_name] = Adapter(
            checkpoint.root, where, config, adapter_blocks, replacements, name=adapter_name
        )
    return TrainingCheckpoint(where, base, adapters)
