"""Deciding which output file holds which tensor, and in what order: pure planning, no I/O.

By default the output keeps the base's own file names and tensor-to-file map, so a merged
model diffs cleanly against its base. With a maximum shard size it is re-sharded under the
Hugging Face naming scheme. Inside a file, tensors are ordered by element size, largest first,
so every tensor stays aligned to its own element size (what the reference writer does too).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from bonemerge.checkpoint import dtypes
from bonemerge.checkpoint.writer import Entry
from bonemerge.errors import BonemergeError, CheckpointError, shown

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


@dataclass(frozen=True)
class ShardPlan:
    """One output file and its tensors in write order."""

    filename: str
    entries: tuple[Entry, ...]

    @property
    def data_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def parse_size(text: str) -> int:
    """`5GB` (10^9, as Hugging Face counts), `500MiB`, or plain bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text, re.IGNORECASE)
    if not match or match.group(2).upper() not in _UNITS:
        raise BonemergeError(f"cannot read {shown(text)} as a size; write it like 5GB, 500MB or 2GiB.")
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise BonemergeError(f"the size {shown(text)} must be positive.")
    return value


def write_order(entries: Sequence[Entry], last: Collection[str] = ()) -> tuple[Entry, ...]:
    """Largest elements first; the tensors named in `last` (computed from others) after all
    the rest, when every one of them still starts aligned to its element size there."""
    ordered = tuple(sorted(entries, key=lambda e: (-dtypes.BITS[e.dtype], e.name)))
    late = [e for e in ordered if e.name in last]
    if not late:
        return ordered
    early = [e for e in ordered if e.name not in last]
    offset = sum(e.nbytes for e in early)
    for entry in late:
        if offset % max(1, dtypes.BITS[entry.dtype] // 8):
            return ordered
        offset += entry.nbytes
    return (*early, *late)


def like_base(
    entries: Sequence[Entry],
    base_file_of: Mapping[str, str],
    base_files: Sequence[str],
    where: str = "the base",
    last: Collection[str] = (),
) -> list[ShardPlan]:
    """Keep each tensor in the base's file; tensors the base lacks join its last file.

    A base file name is kept only if it ends in `.safetensors`: an index may map tensors to
    any file, and an output shard called `README.md`, `config.json` or `notes.txt` would
    collide with the model card, the config or a copied companion file."""
    for name in base_files:
        if not name.endswith(".safetensors"):
            raise CheckpointError(
                f"{where} stores tensors in {shown(name)}, which is not a .safetensors file name and "
                "would collide with the files written beside the weights; rename the shard to end "
                "in .safetensors and update the index."
            )
    by_file: dict[str, list[Entry]] = {name: [] for name in base_files}
    for entry in entries:
        by_file[base_file_of.get(entry.name, base_files[-1])].append(entry)
    return [ShardPlan(name, write_order(group, last)) for name, group in by_file.items() if group]


def by_size(
    entries: Sequence[Entry], max_bytes: int, prefix: str, last: Collection[str] = ()
) -> list[ShardPlan]:
    """Fill files up to `max_bytes` in name order; a tensor larger than that gets a file alone."""
    groups: list[list[Entry]] = [[]]
    filled = 0
    for entry in sorted(entries, key=lambda e: e.name):
        if groups[-1] and filled + entry.nbytes > max_bytes:
            groups.append([])
            filled = 0
        groups[-1].append(entry)
        filled += entry.nbytes
    if len(groups) == 1:
        return [ShardPlan(f"{prefix}.safetensors", write_order(groups[0], last))]
    total = len(groups)
    return [
        ShardPlan(f"{prefix}-{i:05d}-of-{total:05d}.safetensors", write_order(group, last))
        for i, group in enumerate(groups, start=1)
    ]


def index_json(shards: Sequence[ShardPlan]) -> dict:
    """The `model.safetensors.index.json` contents for a sharded output."""
    weight_map = {e.name: s.filename for s in shards for e in s.entries}
    return {
        "metadata": {
            "total_size": sum(s.data_bytes for s in shards),
            "total_parameters": sum(math.prod(e.shape) for s in shards for e in s.entries),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
