"""Fixtures for the reliability suite: a base big enough that a merge takes a few seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

SHARDS, ROWS, COLS, RANK = 6, 4096, 4096, 64


@pytest.fixture(scope="session")
def slow_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A 6-shard bf16 base of ~200 MB and a Bone adapter on every weight in it."""
    root = tmp_path_factory.mktemp("slow")
    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    adapter.mkdir()
    generator = torch.Generator().manual_seed(0)
    weight_map, blocks = {}, {}
    for shard in range(SHARDS):
        file = f"model-{shard + 1:05d}-of-{SHARDS:05d}.safetensors"
        name = f"model.layers.{shard}.mlp.up_proj"
        save_file(
            {name + ".weight": torch.randn(ROWS, COLS, generator=generator).to(torch.bfloat16)}, base / file
        )
        weight_map[name + ".weight"] = file
        blocks[f"base_model.model.{name}.bone_block"] = torch.randn(RANK, ROWS, generator=generator) * 0.01
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"}))
    save_file(blocks, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "BONE", "r": RANK, "init_weights": True, "target_modules": ["up_proj"]})
    )
    return base, adapter
