"""The non-weight files that make a folder of tensors a usable model.

A merged model needs its config, generation config, tokenizer and chat template next to the
weights; PEFT's own route drops the tokenizer, and users notice. Everything small that is not
a weight file is carried over, except what would now be wrong: the base's README (a new model
card is written instead), `.gitattributes`, and weights in other formats (`.bin`, `.gguf`,
`original/*.pth`...) that would still hold the unmerged model. A tokenizer saved with an
adapter wins over the base's, since it is the one the adapter was trained with.

Companions are planned before anything is written, together with every name bonemerge
writes itself, so that no two output files can share a name (a shard called `README.md` or
`notes.txt` would be overwritten by the model card or the copied file). Only regular files
that resolve inside their input folder are copied: a link to `~/.ssh/id_rsa` or `/dev/zero`,
a FIFO or a device is left out with a note in the report, never read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from bonemerge.checkpoint import Checkpoint
from bonemerge.checkpoint.confine import open_regular, refusal, root_of
from bonemerge.checkpoint.folder import OTHER_WEIGHT_SUFFIXES
from bonemerge.errors import CheckpointError
from bonemerge.output.manifest import MANIFEST

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
CONFIG = "config.json"
_SKIPPED = frozenset({"README.md", ".gitattributes", CONFIG, "trainer_state.json", MANIFEST})
_WEIGHT_SUFFIXES = (*OTHER_WEIGHT_SUFFIXES, ".safetensors", ".onnx_data", ".tflite", ".ot")
_PIECE = 1 << 20


@dataclass(frozen=True)
class Companion:
    """One file to copy: its name in the output and the input file it comes from."""

    relative: Path
    source: Path
    size: int


@dataclass(frozen=True)
class Companions:
    """Every non-weight file of an output, decided before any of them is written."""

    files: tuple[Companion, ...]
    config: dict | None
    notes: tuple[str, ...]

    @property
    def bytes(self) -> int:
        """What the copies take on disk (config.json is small and not counted)."""
        return sum(c.size for c in self.files)


def is_tokenizer_file(relative: Path) -> bool:
    return (
        relative.name in TOKENIZER_FILES
        or relative.suffix == ".jinja"
        or (relative.parts[0] == "additional_chat_templates")
    )


def _walk(root: Path) -> list[Path]:
    """Every file under `root` by relative path, hidden ones aside. Linked folders are listed
    as entries, not entered, so that the confinement check sees (and refuses) them."""
    found = []
    for folder, dirs, files in os.walk(root):
        linked = [d for d in dirs if (Path(folder) / d).is_symlink()]
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in linked)
        for name in sorted([*files, *linked]):
            if not name.startswith("."):
                found.append((Path(folder) / name).relative_to(root))
    return found


def base_companions(checkpoint: Checkpoint) -> list[Path]:
    """Files of the base folder to carry over, relative to it: never a shard of the checkpoint."""
    if not checkpoint.is_folder:
        return []
    shards = {Path(s.name) for s in checkpoint.shards}
    keep = []
    for relative in _walk(checkpoint.root):
        top = len(relative.parts) == 1
        if relative in shards:
            continue
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
    """`config` with the plan's updates; the dtype goes under whichever key the file uses, and
    a key updated to None is removed (a dequantized model's quantization_config)."""
    config = dict(config)
    for key, value in updates.items():
        if value is None:
            config.pop(key, None)
        elif key == "dtype":
            keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
            for name in keys:
                config[name] = value
        else:
            config[key] = value
    return config


def plan_companions(
    checkpoint: Checkpoint, adapter_roots: Sequence[Path], written: Collection[str]
) -> Companions:
    """Decide every companion of an output whose own files (weights, index, card, manifest) are
    `written`: refuse a name two output files would share, leave out (with a note) any file
    that is not a regular file inside its input folder."""
    sources: dict[Path, Path] = {rel: checkpoint.root for rel in base_companions(checkpoint)}
    override = tokenizer_override(adapter_roots)
    if override is not None:
        root, files = override
        sources = {rel: where for rel, where in sources.items() if not is_tokenizer_file(rel)}
        sources.update(dict.fromkeys(files, root))
    config_path = checkpoint.root / CONFIG
    if checkpoint.is_folder and (config_path.exists() or config_path.is_symlink()):
        sources[Path(CONFIG)] = checkpoint.root
    taken = set(written)
    files, notes, config = [], [], None
    for relative, folder in sorted(sources.items()):
        path = folder / relative
        problem = refusal(path, root_of(folder))
        if problem:
            notes.append(f"left out {path}: {problem}")
            continue
        if relative.parts[0] in taken:
            raise CheckpointError(
                f"{path} would be copied over {relative.parts[0]}, a file bonemerge writes itself "
                "(weights, index, model card or manifest); rename or remove it in the input."
            )
        if relative == Path(CONFIG):
            config = checkpoint.config()
        else:
            files.append(Companion(relative, path, path.stat().st_size))
    return Companions(tuple(files), config, tuple(notes))


def _copy(companion: Companion, target: Path) -> None:
    """Copy exactly the planned bytes from a descriptor opened as a regular file."""
    try:
        fd = open_regular(companion.source)
    except OSError as exc:
        raise CheckpointError(f"cannot read {companion.source}: {exc.strerror or exc}.") from None
    try:
        with open(target, "xb") as out:
            left = companion.size
            while left:
                piece = os.read(fd, min(left, _PIECE))
                if not piece:
                    break
                out.write(piece)
                left -= len(piece)
            if left or os.read(fd, 1):
                raise CheckpointError(
                    f"{companion.source} changed size while bonemerge copied it; rerun once it is stable."
                )
    finally:
        os.close(fd)


def write_companions(
    companions: Companions, config_updates: dict[str, object], destination: Path
) -> list[str]:
    """Copy the planned companions into `destination`; returns the relative paths written."""
    for companion in companions.files:
        target = destination / companion.relative
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy(companion, target)
    written = [str(c.relative) for c in companions.files]
    if companions.config is not None:
        text = json.dumps(updated_config(companions.config, config_updates), indent=2, ensure_ascii=False)
        (destination / CONFIG).write_text(text + "\n", encoding="utf-8")
        written.append(CONFIG)
    return sorted(written)
