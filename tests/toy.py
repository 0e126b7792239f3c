"""Tiny hand-written checkpoints and adapters, for tests that need exact control of the files.

They follow the layouts transformers and PEFT write (names, index, config keys) but are made
with safetensors alone, so a test can break them in precise ways.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    "model.embed_tokens.weight": (100, 64),
    "model.layers.0.self_attn.q_proj.weight": (64, 64),
    "model.layers.0.self_attn.k_proj.weight": (32, 64),
    "model.layers.0.mlp.up_proj.weight": (96, 64),
    "model.layers.0.mlp.down_proj.weight": (64, 96),
    "model.layers.0.input_layernorm.weight": (64,),
    "model.layers.1.self_attn.q_proj.weight": (64, 64),
    "model.layers.1.self_attn.k_proj.weight": (32, 64),
    "model.layers.1.mlp.up_proj.weight": (96, 64),
    "model.layers.1.mlp.down_proj.weight": (64, 96),
    "model.layers.1.input_layernorm.weight": (64,),
    "model.norm.weight": (64,),
    "lm_head.weight": (100, 64),
}


def base_tensors(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(shape, generator=generator) * 0.05).to(dtype) for name, shape in SHAPES.items()
    }


def write_base(
    folder: Path, tensors: dict[str, torch.Tensor] | None = None, shards: int = 1, config: dict | None = None
) -> Path:
    """A model folder: one model.safetensors, or `shards` files with an index."""
    tensors = base_tensors() if tensors is None else tensors
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i::shards]}
            save_file(part, folder / file, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(part, file)
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"model_type": "llama", "tie_word_embeddings": False, "torch_dtype": "float32"} | (config or {})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def block_shape(variant: str, out_features: int, r: int, mini_r: int = 4) -> tuple[int, ...]:
    return {"default": (r, out_features), "bat": (out_features // r, r, r), "mini": (r, mini_r)}[variant]


def write_adapter(
    folder: Path,
    blocks: dict[str, torch.Tensor] | None = None,
    *,
    method: str = "BONE",
    variant: str = "default",
    r: int = 8,
    mini_r: int = 4,
    extra: dict[str, torch.Tensor] | None = None,
    config: dict | None = None,
    seed: int = 1,
) -> Path:
    """An adapter folder as PEFT saves it; `blocks` maps module paths to blocks."""
    if blocks is None:
        generator = torch.Generator().manual_seed(seed)
        blocks = {
            name.removesuffix(".weight"): torch.randn(
                block_shape(variant, SHAPES[name][0], r, mini_r), generator=generator
            )
            * 0.01
            for name in SHAPES
            if name.endswith(("q_proj.weight", "up_proj.weight"))
        }
    suffix = "bone_block" if method == "BONE" else "miss_block"
    tensors = {f"base_model.model.{module}.{suffix}": block for module, block in blocks.items()}
    tensors |= extra or {}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    init = {"default": True, "bat": "bat", "mini": "mini"}[variant]
    settings = {
        "peft_type": method,
        "r": r,
        "init_weights": init,
        "mini_r": mini_r,
        "target_modules": sorted({module.rsplit(".", 1)[-1] for module in blocks}),
    }
    (folder / "adapter_config.json").write_text(json.dumps(settings | (config or {})))
    return folder
