"""PEFT as the oracle: make real adapters with it and compute what its own merge gives.

Adapters are created exactly as a user's training run would leave them (`get_peft_model`,
then `save_pretrained`), with the blocks filled with random values instead of trained ones
(fresh blocks are zero, which would make every merge trivially equal to its base).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

ModelFactory = Callable[[], torch.nn.Module]


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning)


def train_adapter(
    factory: ModelFactory,
    config,
    path: Path,
    *,
    seed: int,
    scale: float = 0.01,
    head_scale: float = 0.05,
) -> Path:
    """Save a PEFT adapter whose blocks (and modules_to_save copies) hold random values."""
    from peft import get_peft_model

    model = get_peft_model(factory(), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "_block" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
            elif ".modules_to_save." in name:
                parameter.add_(
                    torch.randn(parameter.shape, generator=generator).to(parameter.dtype) * head_scale
                )
    model.save_pretrained(path)
    return path


def peft_model(factory: ModelFactory, adapters: Sequence[Path]):
    """The base with `adapters` loaded as a0, a1, ... (a0 active), unmerged."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(factory(), adapters[0], adapter_name="a0")
    for number, adapter in enumerate(adapters[1:], start=1):
        model.load_adapter(adapter, adapter_name=f"a{number}")
    model.eval()
    return model


def peft_merged(
    factory: ModelFactory, adapters: Sequence[Path], safe_merge: bool = False
) -> dict[str, torch.Tensor]:
    """State dict of PEFT's `merge_and_unload` of `adapters`, merged in the order given."""
    model = peft_model(factory, adapters)
    names = [f"a{i}" for i in range(len(adapters))]
    merged = model.merge_and_unload(progressbar=False, safe_merge=safe_merge, adapter_names=names)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in `folder`, read with the reference library."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                assert name not in tensors, f"{name} in two files"
                tensors[name] = f.get_tensor(name)
    return tensors


def adapter_blocks(adapter: Path) -> dict[str, torch.Tensor]:
    """module path -> block, as saved by PEFT."""
    out = {}
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        for key in f.keys():
            if key.endswith("_block"):
                module = key.removeprefix("base_model.model.").rsplit(".", 1)[0]
                out[module] = f.get_tensor(key)
    return out


def adapter_variant(adapter: Path) -> str:
    init = json.loads((adapter / "adapter_config.json").read_text()).get("init_weights", True)
    return init if init in ("bat", "mini") else "default"
