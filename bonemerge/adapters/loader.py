"""Turning a PEFT adapter folder into a typed `Adapter`: blocks plus tensors that replace base ones.

Tensor data stays on disk: an `Adapter` holds where each block is, not the block, so that a
70B adapter costs no memory until the engine needs one block. Every tensor in the file must
be understood (a block, or a full tensor that replaces a base tensor); anything else is an
error, because silently skipping part of an adapter is how merges go quietly wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from bonemerge.adapters.config import read_adapter_config
from bonemerge.adapters.scope import check_scope
from bonemerge.checkpoint import MemoryTensor, Source, TensorRef, dtypes, read_header
from bonemerge.checkpoint.confine import kind_of
from bonemerge.errors import AdapterError, shown
from bonemerge.methods import PEFT_TENSOR, PREFIX, AdapterConfig, Block

__all__ = [
    "PREFIX",
    "Adapter",
    "Block",
    "check_real",
    "load_adapter",
    "load_pickle",
    "make_blocks",
    "replaced_name",
]


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


def check_real(key: str, tensor: Source, where: Path) -> None:
    """Adapter tensors that enter the maths must be real floats: a complex block would lose its
    imaginary part, a quantized one would be read as numbers it does not mean."""
    if tensor.dtype not in dtypes.COMPUTABLE:
        raise AdapterError(
            f"adapter tensor {key} in {where} is stored as {tensor.dtype}; adapter tensors must be "
            "float16, bfloat16, float32 or float64 (complex or quantized ones cannot be merged)."
        )


def make_blocks(
    config: AdapterConfig,
    parts: dict[str, dict[str, Source]],
    keys: dict[str, dict[str, str]],
    shared: dict[str, Source],
    shared_keys: dict[str, str],
    where: Path,
) -> tuple[Block, ...]:
    """The adapter's blocks, by module, each with the adapter-wide tensors among its parts
    (named in `Block.shared`), once the method has checked those."""
    method = config.method
    method.check_shared(shared, config, where)
    names = frozenset(shared)
    blocks = (
        method.make_block(module, found | shared, keys[module] | shared_keys, config, where)
        for module, found in parts.items()
    )
    return tuple(replace(block, shared=names) if names else block for block in blocks)


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
                f"{path} holds the tensor {shown(key)} of {tensor.dtype}, a name or dtype that safetensors "
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
    method = config.method

    parts: dict[str, dict[str, Source]] = {}
    keys: dict[str, dict[str, str]] = {}
    shared: dict[str, Source] = {}
    shared_keys: dict[str, str] = {}
    replacements: dict[str, Source] = {}
    frozen: set[str] = set()
    saved_as: dict[str, str] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        try:
            claim = method.claim(name, config)
        except AdapterError as exc:
            raise AdapterError(f"{weights} {exc}") from None
        if claim is not None and claim.shared:
            check_real(key, tensor, weights)
            if claim.part in shared:
                raise AdapterError(f"{weights} holds two {claim.part} tensors; remove one.")
            shared[claim.part] = tensor
            shared_keys[claim.part] = key
        elif claim is not None:
            check_real(key, tensor, weights)
            if claim.part in parts.setdefault(claim.module, {}):
                raise AdapterError(
                    f"{weights} holds two {claim.part} tensors for {claim.module}; remove one."
                )
            parts[claim.module][claim.part] = tensor
            keys.setdefault(claim.module, {})[claim.part] = key
        elif PEFT_TENSOR.search(name) or ".modules_to_save." in name or ".original_module." in name:
            raise AdapterError(
                f"{weights} holds {key}, which is not part of a {config.peft_type} adapter file; "
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
    blocks = make_blocks(config, parts, keys, shared, shared_keys, weights)
    if not blocks:
        raise AdapterError(
            f"{weights} holds no {method.name} tensors; it is empty or not a {config.peft_type} adapter."
        )
    check_scope(blocks, config.raw, folder / "adapter_config.json", weights)
    return Adapter(folder, weights, config, blocks, replacements, frozenset(frozen), saved_as=saved_as)
