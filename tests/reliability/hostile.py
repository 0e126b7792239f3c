"""Small builders for the hostile-input tests: a base whose shard names an index chooses, a
full PEFT training checkpoint, and an index rewritten to point tensors elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests import toy


def rename_shard(folder: Path, old: str, new: str) -> None:
    """Move shard `old` of a sharded folder to `new` and point the index at it."""
    (folder / old).rename(folder / new)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: (new if v == old else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))


def training_checkpoint(folder: Path, shards: int = 2) -> Path:
    """A PeftModel state dict of the toy model with Bone blocks on q_proj, as trainers save it."""
    tensors = {}
    generator = torch.Generator().manual_seed(3)
    for name, value in toy.base_tensors().items():
        if name.endswith("q_proj.weight"):
            module = name.removesuffix(".weight")
            tensors[f"base_model.model.{module}.base_layer.weight"] = value
            tensors[f"base_model.model.{module}.bone_block.default"] = (
                torch.randn(8, value.shape[0], generator=generator) * 0.01
            )
        else:
            tensors[f"base_model.model.{name}"] = value
    toy.write_base(folder, tensors, shards=shards)
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "BONE", "r": 8, "init_weights": True, "target_modules": ["q_proj"]})
    )
    return folder


def save_single(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata={"format": "pt"})
    return path
