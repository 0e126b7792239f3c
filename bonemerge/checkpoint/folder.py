"""A model checkpoint on disk: which files hold which tensors, validated before any data moves.

A `Checkpoint` is headers only. It answers "where are the bytes of tensor X" for a single
`model.safetensors`, a sharded folder with its index, or a lone `.safetensors` file, and it
refuses anything inconsistent (a shard missing, a tensor in two shards, an index that lies)
up front, so that no long copy starts on a checkpoint that cannot be completed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bonemerge.checkpoint import dtypes
from bonemerge.checkpoint.confine import kind_of, refusal, root_of
from bonemerge.checkpoint.header import Header, TensorInfo, read_header
from bonemerge.checkpoint.reader import mounted
from bonemerge.errors import CheckpointError, shown

if TYPE_CHECKING:
    import torch

    from bonemerge.checkpoint.reader import RangeReader

OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


@dataclass(frozen=True)
class TensorRef:
    """One tensor's bytes in one file: absolute offset, so a reader needs nothing else."""

    name: str
    path: Path
    offset: int
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    # The file's identity when its header was read (empty when unknown): what it must still be.
    identity: tuple[int, ...] = field(default=(), compare=False)

    @classmethod
    def of(cls, path: Path, header: Header, info: TensorInfo) -> TensorRef:
        begin = header.data_start + info.begin
        return cls(info.name, path, begin, info.dtype, info.shape, info.nbytes, header.identity)


@dataclass(frozen=True, eq=False)
class MemoryTensor:
    """A tensor already in memory (from a torch pickle), standing in where a TensorRef would."""

    name: str
    tensor: torch.Tensor

    @property
    def dtype(self) -> str:
        return dtypes.from_torch(self.tensor.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


RowMaker = Callable[["RangeReader", int, int], "torch.Tensor"]


class ComputedTensor:
    """A tensor made on demand (a converted adapter's factors), standing in where a TensorRef
    would: its dtype and shape are promised up front so that headers can be planned, and
    `compute` runs only when the engine reaches it, so a thousand of them cost no memory.

    A tensor too large to hold whole (a dequantized expert parameter) also gives `rows`, which
    makes a row maker on first use: rows [start, stop) of the tensor seen as (rows, columns),
    made from the input alone. The maker lives until `release()`, so that what it keeps
    between calls (one expert's packed bytes) goes with it."""

    def __init__(
        self,
        name: str,
        dtype: str,
        shape: tuple[int, ...],
        compute: Callable[[], torch.Tensor],
        rows: Callable[[], RowMaker] | None = None,
    ):
        self.name = name
        self.dtype = dtype
        self.shape = tuple(shape)
        self._compute = compute
        self._cached: torch.Tensor | None = None
        self._rows = rows
        self._maker: RowMaker | None = None

    @property
    def nbytes(self) -> int:
        import math

        return dtypes.nbytes(self.dtype, math.prod(self.shape)) or 0

    @property
    def tensor(self) -> torch.Tensor:
        """The values, computed once and kept until `release()`."""
        if self._cached is None:
            value = self._compute()
            if tuple(value.shape) != self.shape or dtypes.from_torch(value.dtype) != self.dtype:
                raise AssertionError(f"{self.name} was computed as {value.dtype} {list(value.shape)}")
            self._cached = value
        return self._cached

    def read_rows(self, reader: RangeReader, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the tensor seen as (rows, columns): from the row maker where
        there is one, else cut from the whole tensor."""
        if self._rows is None:
            rows, cols = dtypes.rows_cols(self.shape)
            return self.tensor.reshape(rows, cols)[start:stop]
        if self._maker is None:
            self._maker = self._rows()
        return self._maker(reader, start, stop)

    def release(self) -> None:
        self._cached = None
        self._maker = None


Source = TensorRef | MemoryTensor | ComputedTensor


@dataclass(frozen=True)
class Shard:
    """One safetensors file of a checkpoint, with what was seen of it when it was opened."""

    path: Path
    header: Header
    size: int
    identity: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class Checkpoint:
    """Every tensor of a model, and the shard layout it came in."""

    root: Path
    shards: tuple[Shard, ...]
    tensors: dict[str, TensorRef]
    shard_of: dict[str, str]
    index_name: str | None
    is_folder: bool = True

    @property
    def file_prefix(self) -> str:
        """Stem for re-sharded output names: `model` for `model.safetensors[.index.json]`."""
        name = self.index_name or self.shards[0].name
        return name.split(".safetensors")[0].split("-0000")[0]

    def config(self) -> dict | None:
        """The folder's config.json, or None when there is none, a lone file was given, or it is
        not a regular file inside the folder (the companion writer notes why it was left out)."""
        path = self.root / "config.json"
        if not self.is_folder or not path.is_file() or refusal(path, root_of(self.root)):
            return None
        return read_json(path)


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}; fix or remove the file.") from None
    except RecursionError:
        raise CheckpointError(f"{path} is nested too deeply to be read; fix or remove the file.") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; fix or remove the file.")
    return value


def _present(path: Path) -> bool:
    """A weight file on disk, or one mounted in its place (a Hub shard read in place)."""
    return path.is_file() or mounted(path) is not None


def _open_shard(path: Path) -> Shard:
    header = read_header(path)
    return Shard(path, header, header.file_size, header.identity)


def _single(path: Path, is_folder: bool) -> Checkpoint:
    shard = _open_shard(path)
    tensors = {name: TensorRef.of(path, shard.header, info) for name, info in shard.header.tensors.items()}
    return Checkpoint(path.parent, (shard,), tensors, dict.fromkeys(tensors, path.name), None, is_folder)


def _indexed(index_path: Path) -> Checkpoint:
    root = index_path.parent
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index_path} has no weight_map; re-save the checkpoint or remove the broken index."
        )
    files: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or "/" in file or file.startswith("."):
            raise CheckpointError(
                f"{index_path} maps tensor {shown(name)} to {shown(file)}, which is not a file name in "
                "the same folder; fix the index."
            )
        files.setdefault(file, []).append(name)

    shards: list[Shard] = []
    tensors: dict[str, TensorRef] = {}
    shard_of: dict[str, str] = {}
    for file in sorted(files):
        path = root / file
        if not _present(path):
            raise CheckpointError(
                f"{index_path} names shard {file}, which is missing; download the complete checkpoint."
            )
        shard = _open_shard(path)
        shards.append(shard)
        for name, info in shard.header.tensors.items():
            if name in shard_of:
                raise CheckpointError(
                    f"tensor {shown(name)} is stored in both {shard_of[name]} and {file} in {root}; "
                    "remove the stale shard or re-save the checkpoint."
                )
            if weight_map.get(name) != file:
                where = f"maps it to {weight_map[name]}" if name in weight_map else "does not list it"
                raise CheckpointError(
                    f"tensor {shown(name)} is stored in {file} but {index_path.name} {where}; "
                    "the index and shards disagree, re-save the checkpoint."
                )
            tensors[name] = TensorRef.of(path, shard.header, info)
            shard_of[name] = file
        missing = sorted(set(files[file]) - set(shard.header.tensors))
        if missing:
            raise CheckpointError(
                f"{index_path.name} maps tensor {shown(missing[0])} to {file}, which does not contain "
                f"it ({len(missing)} such tensors); the index and shards disagree, re-save the "
                "checkpoint."
            )
    return Checkpoint(root, tuple(shards), tensors, shard_of, index_path.name)


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a model folder or a lone `.safetensors` file, reading and validating headers only."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; check the path.")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"{path} is not a .safetensors file; pass a model folder or a .safetensors file."
            )
        return _single(path, is_folder=False)
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is {kind_of(path)}, not a model folder or a .safetensors file; check the path."
        )
    if not os.access(path, os.R_OK | os.X_OK):
        raise CheckpointError(f"{path} cannot be read (permission denied); check its permissions.")

    indexes = sorted(path.glob("*.safetensors.index.json"))
    if (path / "model.safetensors.index.json").is_file():
        return _indexed(path / "model.safetensors.index.json")
    if len(indexes) == 1:
        return _indexed(indexes[0])
    if len(indexes) > 1:
        names = ", ".join(p.name for p in indexes)
        raise CheckpointError(f"{path} holds several indexes ({names}); pass one checkpoint at a time.")
    if _present(path / "model.safetensors"):
        return _single(path / "model.safetensors", is_folder=True)
    files = sorted(
        p for p in path.glob("*.safetensors") if p.is_file() and p.name != "adapter_model.safetensors"
    )
    if len(files) == 1:
        return _single(files[0], is_folder=True)
    if len(files) > 1:
        raise CheckpointError(
            f"{path} holds {len(files)} .safetensors files but no index to say how they fit "
            "together; pass one file, or restore model.safetensors.index.json."
        )
    if (path / "adapter_config.json").is_file():
        raise CheckpointError(
            f"{path} is a PEFT adapter, not a model; pass the base model first and the adapter after it."
        )
    others = sorted(p.name for p in path.iterdir() if p.suffix in OTHER_WEIGHT_SUFFIXES)
    if others:
        raise CheckpointError(
            f"{path} has no safetensors weights, only {others[0]}; convert the model to "
            "safetensors first (transformers: save_pretrained(..., safe_serialization=True))."
        )
    raise CheckpointError(f"{path} contains no model weights (*.safetensors); check the path.")


def loader_weights(folder: Path) -> set[str]:
    """Top-level files of `folder` that a model loader could take weights from: safetensors
    files and indexes, PyTorch pickles (`pytorch_model*.bin`, `*.pth`), `consolidated.*` and
    other formats. `verify` reports those that are not part of the checkpoint it checked,
    because transformers prefers a lone `model.safetensors` to an index beside it."""
    found = set()
    for path in folder.iterdir():
        name = path.name
        weight = path.suffix in (*OTHER_WEIGHT_SUFFIXES, ".safetensors") or name.startswith("consolidated.")
        if (weight or name.endswith(".index.json")) and (path.is_file() or path.is_symlink()):
            found.add(name)
    return found


def stray_weights(checkpoint: Checkpoint) -> list[str]:
    """Weight files beside `checkpoint` that are not part of it (see `loader_weights`)."""
    if not checkpoint.is_folder:
        return []
    own = {s.name for s in checkpoint.shards} | {checkpoint.index_name or ""}
    return sorted(loader_weights(checkpoint.root) - own)
