"""What a folder is and holds, from headers and configs only (no tensor data is read).

One function answers for any path bonemerge accepts: a base model, a PEFT adapter, a full PEFT
training checkpoint, or a model bonemerge made (recognised by its `bonemerge.json`). With a
base, an adapter is also planned against it, which shows the tensors it would touch, any
mismatch, and the size of the merged model, without merging anything.
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bonemerge.adapters import Adapter, load_adapter
from bonemerge.adapters.training import is_training_checkpoint, read_training_checkpoint
from bonemerge.checkpoint import Checkpoint, open_checkpoint
from bonemerge.codecs import describe_storage
from bonemerge.errors import BonemergeError
from bonemerge.methods import shared_tensors
from bonemerge.output.manifest import MANIFEST, read_manifest
from bonemerge.plan.reduction import layer_of

_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def ranges(numbers: set[int]) -> str:
    """{0, 1, 2, 5} -> `0-2,5`."""
    ordered = sorted(numbers)
    parts, start = [], None
    for i, n in enumerate(ordered):
        if start is None:
            start = n
        if i + 1 == len(ordered) or ordered[i + 1] != n + 1:
            parts.append(f"{start}-{n}" if n != start else f"{n}")
            start = None
    return ",".join(parts)


_NUMBER = re.compile(r"(?<=\.)\d+(?=\.)")
_EXPERT = re.compile(r"(?<=\.experts\.)\d+(?=\.)")


def _group(names: list[str], number: re.Pattern) -> list[str]:
    groups: dict[str, set[int]] = defaultdict(set)
    singles: list[str] = []
    for name in names:
        match = number.search(name)
        if match is None:
            singles.append(name)
            continue
        groups[name[: match.start()] + "{}" + name[match.end() :]].add(int(match.group()))
    grouped = [
        pattern.replace("{}", str(next(iter(numbers))) if len(numbers) == 1 else "{" + ranges(numbers) + "}")
        for pattern, numbers in groups.items()
    ]
    return sorted(grouped + singles)


def group_names(names: list[str]) -> list[str]:
    """Names that differ only in their expert number, then only in their first numbered
    segment, as one pattern each: `model.layers.{0-2,5}.mlp.experts.{0-127}.up_proj.weight`."""
    return _group(_group(names, _EXPERT), _NUMBER)


def _dtypes(sources) -> dict[str, int]:
    sizes: Counter[str] = Counter()
    for source in sources:
        sizes[source.dtype] += source.nbytes
    return dict(sizes.most_common())


def describe_adapter(adapter: Adapter) -> dict:
    """Method, its settings, sizes, and the targeted modules grouped by their leaf name."""
    groups: dict[str, set[int]] = defaultdict(set)
    counts: Counter[str] = Counter()
    layers: set[int] = set()
    for block in adapter.blocks:
        # PEFT nests the wrappers of several parameters of one module (`experts.base_layer`)
        leaf = re.sub(r"(\.base_layer)+$", "", block.module).rsplit(".", 1)[-1]
        counts[leaf] += 1
        found = layer_of(block.module)
        if found:
            groups[leaf].add(found[1])
            layers.add(found[1])
    config = adapter.config
    shared = shared_tensors(adapter.blocks)
    return {
        "method": config.peft_type,
        "adapter": config.describe(),
        **config.summary(),
        "base_model": config.base_model,
        "blocks": len(adapter.blocks),
        # tensors stored once for the whole adapter (VeRA's projections) are counted once
        "parameters": sum(b.parameters for b in adapter.blocks)
        + sum(math.prod(source.shape) for source in shared.values()),
        "modules": {
            leaf: {"count": counts[leaf], "layers": ranges(groups[leaf]) if groups[leaf] else None}
            for leaf in sorted(counts)
        },
        "layers": ranges(layers) if layers else None,
        "full_tensors": sorted(adapter.replacements),
        "modules_to_save": list(config.modules_to_save),
        "dtypes": _dtypes(
            [p for b in adapter.blocks for p in b.own.values()]
            + list(shared.values())
            + list(adapter.replacements.values())
        ),
    }


def describe_checkpoint(checkpoint: Checkpoint) -> dict:
    experts = group_names([name for name in checkpoint.tensors if ".experts." in name])
    return {
        "tensors": len(checkpoint.tensors),
        "parameters": sum(math.prod(t.shape) for t in checkpoint.tensors.values()),
        "dtypes": _dtypes(checkpoint.tensors.values()),
        "files": [{"name": s.name, "bytes": s.size} for s in checkpoint.shards],
        "bytes": sum(s.size for s in checkpoint.shards),
    } | ({"experts": experts} if experts else {})


def _against_base(adapters: list[Adapter], base_path: Path) -> dict:
    from bonemerge.plan.build import build_plan

    base = open_checkpoint(base_path)
    try:
        plan = build_plan(base, adapters)
    except BonemergeError as exc:
        return {"base": str(base_path), "ok": False, "mismatch": str(exc)}
    return {
        "base": str(base_path),
        "ok": True,
        "touched": sorted(s.name for s in plan.steps.values() if s.ops or s.name not in base.tensors),
        "replaced": sorted(
            s.name for s in plan.steps.values() if s.source is not base.tensors.get(s.name) and not s.ops
        ),
        "output_weight_bytes": plan.file_bytes,
        "notes": list(plan.notes),
    }


def _made_by_bonemerge(folder: Path) -> dict:
    """The folder's bonemerge.json and, from its history, the adapters merged now."""
    from bonemerge.output.history import merged_now, read_history

    if not (folder / MANIFEST).is_file():
        return {}
    try:
        found = read_manifest(folder)
    except BonemergeError:
        return {"made_by_bonemerge": None}
    try:
        lineage = read_history(folder)
    except BonemergeError as error:
        # Shown as unreadable, never rendered: its entries are what failed the checks.
        return {"made_by_bonemerge": found | {"history": None, "history_error": str(error)}}
    merged = None if lineage is None else [a["name"] for a in merged_now(lineage)]
    return {"made_by_bonemerge": found, "adapters_merged_now": merged}


class InspectReport(Mapping[str, Any]):
    """What `inspect` found, as a report like every other command's: `to_dict()` is what
    `--json` prints, the facts read as attributes (`report.kind`, `report.against_base`), and,
    for code written when `inspect` returned a dict, as keys (`report["kind"]`)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._data)

    @property
    def ok(self) -> bool:
        """False only when a base was given and the adapter does not fit it."""
        return (self._data.get("against_base") or {}).get("ok") is not False

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_data"][name]
        except KeyError:
            raise AttributeError(f"this inspection has no {name!r}") from None

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"InspectReport(path={self._data.get('path')!r}, kind={self._data.get('kind')!r})"


def architecture(config: dict) -> str | None:
    """The model class a config names (`LlamaForCausalLM`), or its model type; None when the
    config says neither in a usable form."""
    named = config.get("architectures")
    if isinstance(named, list) and named and isinstance(named[0], str):
        return named[0]
    model_type = config.get("model_type")
    return model_type if isinstance(model_type, str) else None


def inspect_path(path: str | Path, base: str | Path | None = None) -> dict:
    """A JSON-ready description of `path`; with `base`, how an adapter fits that base. An
    adapter's weights file stands for its folder: without its config it is no model either."""
    path = Path(path)
    if path.is_file() and path.name in _ADAPTER_WEIGHTS:
        if not (path.parent / "adapter_config.json").is_file():
            raise BonemergeError(
                f"{path} is the weights file of a PEFT adapter, and {path.parent} has no adapter_config.json "
                "beside it; inspect the folder PEFT's save_pretrained wrote."
            )
        path = path.parent
    if (
        path.is_dir()
        and (path / "adapter_config.json").is_file()
        and ((path / "adapter_model.safetensors").is_file() or (path / "adapter_model.bin").is_file())
    ):
        adapter = load_adapter(path)
        info = {"path": str(path), "kind": "adapter"} | describe_adapter(adapter)
        info["bytes"] = adapter.weights.stat().st_size
        info |= {k: v for k, v in _made_by_bonemerge(path).items() if k == "made_by_bonemerge"}
        if base is not None:
            info["against_base"] = _against_base([adapter], Path(base))
        return info
    checkpoint = open_checkpoint(path)
    if is_training_checkpoint(checkpoint):
        training = read_training_checkpoint(checkpoint)
        info = {"path": str(path), "kind": "peft-checkpoint"} | describe_checkpoint(checkpoint)
        info["base_tensors"] = len(training.base.tensors)
        info["adapters"] = {name: describe_adapter(a) for name, a in training.adapters.items()}
        if base is not None:
            info["against_base"] = _against_base(list(training.adapters.values()), Path(base))
        return info
    info = {"path": str(path), "kind": "model"} | describe_checkpoint(checkpoint)
    info["architecture"] = architecture(checkpoint.config() or {})
    info["quantization"] = describe_storage(checkpoint)
    if checkpoint.is_folder:
        info |= _made_by_bonemerge(checkpoint.root)
        operation = (info.get("made_by_bonemerge") or {}).get("operation")
        info["kind"] = {
            "merge": "merged model",
            "unmerge": "unmerged model",
            "unload": "unloaded model",
        }.get(operation if isinstance(operation, str) else "", "model")
    if base is not None:
        raise BonemergeError(f"{path} is a model, not an adapter; --base applies to adapters only.")
    return info
