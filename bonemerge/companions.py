"""The non-weight files that make a folder of tensors a usable model.

A merged model needs its config, generation config, tokenizer and chat template next to the
weights; PEFT's own route drops the tokenizer, and users notice. Everything small that is not
a weight file is carried over, except what would now be wrong: the base's README (a new model
card is written instead), `.gitattributes`, and weights in other formats (`.bin`, `.gguf`,
`original/*.pth`...) that would still hold the unmerged model. A tokenizer saved with an
adapter wins over the base's, since it is the one the adapter was trained with.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from bonemerge.checkpoint import Checkpoint
from bonemerge.checkpoint.folder import OTHER_WEIGHT_SUFFIXES

TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "chat_template.json",
    }
)
_SKIPPED = frozenset({"README.md", ".gitattributes", "config.json", "trainer_state.json", "bonemerge.json"})
_WEIGHT_SUFFIXES = (*OTHER_WEIGHT_SUFFIXES, ".safetensors", ".onnx_data", ".tflite", ".ot")


def is_tokenizer_file(relative: Path) -> bool:
    return (
        relative.name in TOKENIZER_FILES
        or relative.suffix == ".jinja"
        or (relative.parts[0] == "additional_chat_templates")
    )


def _walk(root: Path) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                found.append((Path(folder) / name).relative_to(root))
    return found


def base_companions(checkpoint: Checkpoint) -> list[Path]:
    """Files of the base folder to carry over, relative to it."""
    if not checkpoint.is_folder:
        return []
    keep = []
    for relative in _walk(checkpoint.root):
        top = len(relative.parts) == 1
        if top and (relative.name in _SKIPPED or relative.name.endswith(".safetensors.index.json")):
            continue
        if relative.name.startswith("adapter_model.") or relative.name == "adapter_config.json":
            continue
        if relative.suffix in _WEIGHT_SUFFIXES and (top or relative.suffix != ".safetensors"):
            continue
        keep.append(relative)
    return keep


def tokenizer_override(adapter_roots: Sequence[Path]) -> tuple[Path, list[Path]] | None:
    """The last adapter folder that carries a tokenizer, with its tokenizer files."""
    for root in reversed(adapter_roots):
        files = [p for p in _walk(root) if is_tokenizer_file(p)]
        if any(p.name in ("tokenizer.json", "tokenizer_config.json") for p in files):
            return root, files
    return None


def updated_config(config: dict, updates: dict[str, object]) -> dict:
    """`config` with the plan's updates; the dtype goes under whichever key the file uses."""
    config = dict(config)
    for key, value in updates.items():
        if key == "dtype":
            keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
            for name in keys:
                config[name] = value
        else:
            config[key] = value
    return config


def write_companions(
    checkpoint: Checkpoint,
    adapter_roots: Sequence[Path],
    config_updates: dict[str, object],
    destination: Path,
) -> list[str]:
    """Copy companions into `destination`; returns the relative paths written."""
    sources: dict[Path, Path] = {rel: checkpoint.root / rel for rel in base_companions(checkpoint)}
    override = tokenizer_override(adapter_roots)
    if override is not None:
        root, files = override
        sources = {rel: path for rel, path in sources.items() if not is_tokenizer_file(rel)}
        sources.update({rel: root / rel for rel in files})
    for relative, path in sources.items():
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    written = [str(p) for p in sources]
    config = checkpoint.config()
    if config is not None:
        text = json.dumps(updated_config(config, config_updates), indent=2, ensure_ascii=False)
        (destination / "config.json").write_text(text + "\n", encoding="utf-8")
        written.append("config.json")
    return sorted(written)
