"""Turning a PEFT adapter folder into a typed `Adapter`: blocks plus tensors that replace base ones.

Tensor data stays on disk: an `Adapter` holds where each block is, not the block, so that a
70B adapter costs no memory until the engine needs one block. Every tensor in the file must
be understood (a block, or a full tensor that replaces a base tensor); anything else is an
error, because silently skipping part of an adapter is how merges go quietly wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from bonemerge.adapters.config import METHODS, AdapterConfig, read_adapter_config
from bonemerge.checkpoint import MemoryTensor, Source, TensorRef, dtypes, read_header
from bonemerge.checkpoint.confine import kind_of
from bonemerge.errors import AdapterError

PREFIX = "base_model.model."
OTHER_METHOD = re.compile(
    r"(?:^|\.)(lora|ia3|oft|boft|vera|hra|bone|miss|fourierft|vblora|hada|lokr|randlora|c3a|"
    r"shira|road|delora|gralora|waveft|osf|adaption)_\w*(?:\.|$)"
)


@dataclass(frozen=True)
class Block:
    """One trained block and the module it belongs to (`model.layers.0.self_attn.q_proj`)."""

    module: str
    key: str
    tensor: Source
    variant: str
    r: int
    mini_r: int | None


@dataclass(frozen=True)
class Adapter:
    """A loaded adapter: its config, blocks, and full tensors that replace the base's.

    `frozen` names the replacements that are PEFT's saved copies of frozen base weights
    (`lm_head.base_layer.weight` for a resized vocabulary): unlike trained copies
    (modules_to_save, biases) they are exactly what the adapter was merged onto.
    """

    root: Path
    weights: Path
    config: AdapterConfig
    blocks: tuple[Block, ...]
    replacements: dict[str, Source]
    frozen: frozenset[str] = frozenset()
    name: str | None = None
    saved_as: dict[str, str] = field(default_factory=dict)

    def key_of(self, name: str) -> str:
        """The key a replacement has in an adapter file (`base_model.model.lm_head.base_layer.weight`)."""
        return self.saved_as.get(name, PREFIX + name)

    @property
    def label(self) -> str:
        if self.name:
            return f"{self.root.name} ({self.name})"
        return self.root.name or str(self.root)


def block_variant(config: AdapterConfig, key: str, shape: tuple[int, ...], where: Path) -> str:
    """The variant a block's shape implies, which must be the one its config declares."""
    r, mini_r = config.r, config.mini_r
    if len(shape) == 3:
        implied = "bat"
        fits = shape[1] == shape[2] == r
    elif len(shape) == 2:
        implied = config.variant if config.variant in ("default", "mini") else "default"
        fits = shape[0] == r and (implied != "mini" or shape[1] == mini_r)
    else:
        raise AdapterError(
            f"block {key} in {where} has shape {list(shape)}; Bone/MiSS blocks are 2-D or 3-D."
        )
    if implied != config.variant:
        raise AdapterError(
            f"block {key} in {where} has the {implied} shape {list(shape)} but adapter_config.json "
            f"declares the {config.variant} variant; the config and weights disagree."
        )
    if not fits:
        expected = {
            "bat": f"[out/{r}, {r}, {r}]",
            "default": f"[{r}, out]",
            "mini": f"[{r}, {mini_r}]",
        }[implied]
        raise AdapterError(
            f"block {key} in {where} has shape {list(shape)}, but r={r}"
            + (f" and mini_r={mini_r}" if implied == "mini" else "")
            + f" in adapter_config.json call for {expected}; the config and weights disagree."
        )
    return implied


def replaced_name(key: str) -> str:
    """Base tensor a saved full tensor stands for: PEFT's `base_layer.` wrapper removed."""
    return key.replace(".base_layer.", ".")


def _read_tensors(folder: Path) -> tuple[Path, dict[str, Source]]:
    safetensors = folder / "adapter_model.safetensors"
    if safetensors.is_file():
        header = read_header(safetensors)
        return safetensors, {
            name: TensorRef.of(safetensors, header, info) for name, info in header.tensors.items()
        }
    pickle = folder / "adapter_model.bin"
    if pickle.is_file():
        return pickle, {name: MemoryTensor(name, t) for name, t in load_pickle(pickle).items()}
    raise AdapterError(
        f"{folder} has adapter_config.json but no adapter_model.safetensors or adapter_model.bin; "
        "the adapter was not saved completely."
    )


def load_pickle(path: Path) -> dict:
    """A torch-pickled state dict, refusing anything but plain tensors (never arbitrary code)."""
    import pickle

    import torch

    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdapterError(
            f"{path} is not a plain PyTorch tensor file ({first}); re-save the adapter with "
            "safe_serialization=True."
        ) from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise AdapterError(
            f"{path} does not hold a dictionary of named tensors; re-save the adapter with "
            "safe_serialization=True."
        )
    for key, tensor in data.items():
        if not key.isprintable() or str(tensor.dtype).removeprefix("torch.") not in dtypes.BY_TORCH_NAME:
            raise AdapterError(
                f"{path} holds the tensor {key!r} of {tensor.dtype}, a name or dtype that safetensors "
                "cannot store; re-save the adapter with safe_serialization=True."
            )
    return data


def load_adapter(path: str | Path) -> Adapter:
    """Read an adapter folder's config and tensor index (headers only for safetensors)."""
    folder = Path(path)
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else f"is {kind_of(folder)}, not an adapter folder"
        raise AdapterError(f"{folder} {what}; pass the folder that PEFT's save_pretrained wrote.")
    config = read_adapter_config(folder)
    weights, tensors = _read_tensors(folder)
    suffix = "." + config.block_suffix
    other_suffix = {v for v in METHODS.values() if v != config.block_suffix}.pop()

    blocks: list[Block] = []
    replacements: dict[str, Source] = {}
    frozen: set[str] = set()
    saved_as: dict[str, str] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        if name.endswith(suffix):
            if tensor.dtype not in dtypes.COMPUTABLE:
                raise AdapterError(
                    f"block {key} in {weights} is stored as {tensor.dtype}; Bone/MiSS blocks must be "
                    "float16, bfloat16, float32 or float64 (complex or quantized blocks cannot be merged)."
                )
            module = name[: -len(suffix)]
            variant = block_variant(config, key, tensor.shape, weights)
            blocks.append(Block(module, key, tensor, variant, config.r, config.mini_r))
        elif name.endswith("." + other_suffix):
            raise AdapterError(
                f"{weights} holds {key}, a {other_suffix} of the other method, but its config says "
                f"{config.method}; the config and weights belong to different adapters."
            )
        elif OTHER_METHOD.search(name) or ".modules_to_save." in name or ".original_module." in name:
            raise AdapterError(
                f"{weights} holds {key}, which is not part of a {config.method} adapter file; "
                "this is another PEFT method's tensor or a full training checkpoint."
            )
        else:
            target = replaced_name(name)
            if target in replacements:
                raise AdapterError(f"{weights} holds two tensors for {target}; remove the duplicate.")
            replacements[target] = tensor
            saved_as[target] = key
            if name.endswith(".base_layer.weight"):
                frozen.add(target)
    if not blocks:
        raise AdapterError(
            f"{weights} holds no {config.block_suffix} tensors; it is empty or not a {config.method} adapter."
        )
    return Adapter(folder, weights, config, tuple(blocks), replacements, frozenset(frozen), saved_as=saved_as)
