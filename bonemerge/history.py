"""Merge history: which adapters a model holds, identified by content, so that no command
silently applies an adapter twice, takes out one that was never merged, or unmerges in the
wrong order.

Every output's `bonemerge.json` carries a `history`: the history of its input plus the
operation that made it. Adapters are recorded by a **fingerprint** of what decides their
maths, not by path, so a renamed folder, a Hub round trip or a Bone → MiSS conversion keeps
its identity, while any change of a single byte, a cast or a filter makes a new adapter.

The fingerprint is SHA-256 over a canonical form, read in bounded pieces (adapters for large
models run to gigabytes): a version line, the maths-relevant config (what its method says
decides the maths: variant and sizes for Bone/MiSS, rank and scaling for LoRA) as canonical
JSON, then for every tensor in name order (block tensors by module path and part, full
tensors by the base tensor they replace) a JSON line `[kind, name, dtype, shape]` followed by
its raw little-endian bytes. The `peft_type` spelling (BONE/MISS), key suffixes and file
layout are left out because they do not change the maths.

Everything here is pure except `fingerprint` (reads tensor bytes) and `read_history`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from bonemerge.adapters import Adapter
from bonemerge.checkpoint import RangeReader, Source, TensorRef, read_json
from bonemerge.errors import AdapterError, CheckpointError
from bonemerge.manifest import MANIFEST

# Bumped whenever merge maths could change an output bit; verify owes bit identity only to
# merges made with the same maths version (and precision, device and torch version).
MATHS_VERSION = 1
_FORMAT = b"bonemerge-adapter-fingerprint-v1\n"


def _feed(digest: hashlib._Hash, source: Source, reader: RangeReader) -> None:
    """The tensor's raw bytes into `digest`, one bounded piece at a time; straight from the file
    when it has one, so that fingerprints are taken while torch is still loading."""
    if isinstance(source, TensorRef):
        for piece in reader.pieces(source.path, source.offset, source.nbytes):
            digest.update(piece)
        return
    import torch

    from bonemerge.checkpoint.tensors import pieces

    for piece in pieces(reader, source):
        digest.update(piece.contiguous().view(torch.uint8).numpy())


def fingerprint(adapter: Adapter) -> str:
    """SHA-256 of the adapter's canonical form (see the module docstring), as hex."""
    config = adapter.config
    items: list[tuple[str, str, Source]] = [
        ("block", module if part == "block" else f"{module}:{part}", source)
        for module, part, source in (
            (b.module, part, source) for b in adapter.blocks for part, source in b.parts.items()
        )
    ]
    items += [("full", name, source) for name, source in adapter.replacements.items()]
    digest = hashlib.sha256(_FORMAT)
    digest.update(json.dumps(config.method.identity(config), sort_keys=True).encode() + b"\n")
    with RangeReader() as reader:
        for kind, name, source in sorted(items, key=lambda item: (item[1], item[0])):
            digest.update(json.dumps([kind, name, source.dtype, list(source.shape)]).encode() + b"\n")
            _feed(digest, source, reader)
    return digest.hexdigest()


def record(adapter: Adapter, digest: str) -> dict:
    """How an operation lists an adapter: fingerprint, the name it had, and its kind."""
    return {"fingerprint": digest, "name": adapter.label, "kind": adapter.config.describe()}


def short(digest: str) -> str:
    """The first 12 hex digits, as reports show a fingerprint."""
    return digest[:12]


def read_history(folder: Path | None) -> list[dict] | None:
    """The history in `folder/bonemerge.json`, or None when there is none to read (no manifest,
    or one written before histories were recorded): the model's lineage is then unknown."""
    if folder is None or not (folder / MANIFEST).is_file():
        return None
    path = folder / MANIFEST
    history = read_json(path).get("history")
    if history is None:
        return None
    valid = isinstance(history, list) and all(
        isinstance(op, dict)
        and isinstance(op.get("operation"), str)
        and isinstance(op.get("adapters", []), list)
        and all(isinstance(a, dict) and isinstance(a.get("fingerprint"), str) for a in op.get("adapters", []))
        for op in history
    )
    if not valid:
        raise CheckpointError(f"{path} holds a malformed history; fix or remove the file.")
    return history


def merged_now(history: Sequence[dict]) -> list[dict]:
    """The adapters merged into the model now, in merge order: every merge adds its adapters,
    every unmerge removes its own (the most recent copy of each). Each item is the adapter's
    record plus `merged` (when) and `command` (the command that merged it)."""
    stack: list[dict] = []
    for op in history:
        adapters = op.get("adapters", [])
        if op["operation"] == "merge":
            stack += [a | {"merged": op.get("created"), "command": op.get("command")} for a in adapters]
        elif op["operation"] == "unmerge":
            for adapter in reversed(adapters):
                found = [i for i, a in enumerate(stack) if a["fingerprint"] == adapter["fingerprint"]]
                if found:
                    del stack[found[-1]]
    return stack


def _how(entry: dict) -> str:
    command = entry.get("command")
    when = entry.get("merged") or "an unrecorded time"
    return f"on {when} by {f'`{command}`' if command else 'the Python API'}"


def check_merge(
    history: Sequence[dict] | None,
    adapters: Sequence[tuple[str, str]],
    base: str,
    allow_remerge: bool,
) -> list[str]:
    """Refuse to merge an adapter (`(label, fingerprint)`) that `base` already holds, or the same
    adapter twice in one command, unless `allow_remerge`; then return notes saying so, for the
    report and the model card."""
    held = {entry["fingerprint"]: entry for entry in merged_now(history or [])}
    given: set[str] = set()
    notes = []
    for label, digest in adapters:
        if digest in held:
            entry = held[digest]
            if not allow_remerge:
                raise AdapterError(
                    f"{label} is already merged into {base}: its bonemerge.json records it (as "
                    f"{entry['name']}) merged {_how(entry)}; merging it again would apply it twice, pass "
                    "--allow-remerge if that is really wanted."
                )
            notes.append(f"{label} was already merged into {base} and is merged again (--allow-remerge)")
        elif digest in given:
            if not allow_remerge:
                raise AdapterError(
                    f"{label} is given twice; merging it twice applies it twice, pass --allow-remerge if "
                    "that is really wanted."
                )
            notes.append(f"{label} is merged twice (--allow-remerge)")
        given.add(digest)
    return notes


def check_unmerge(
    history: Sequence[dict] | None, adapters: Sequence[tuple[str, str]], merged: str
) -> list[str]:
    """Check that `adapters` (`(label, fingerprint)`, in merge order) are the most recently
    merged adapters of `merged`, in that order; a wrong order is refused, never reordered, so
    that the command line always states exactly what happens. Returns notes for the report."""
    if history is None:
        return [
            f"{merged} has no bonemerge history (it was merged by another tool), so whether these "
            "adapters were merged into it, and in which order, could not be checked"
        ]
    stack = merged_now(history)
    held = [entry["fingerprint"] for entry in stack]
    names = ", ".join(entry["name"] for entry in stack) or "none"
    for label, digest in adapters:
        if digest not in held:
            raise AdapterError(
                f"{label} was never merged into {merged} according to its bonemerge.json (adapters "
                f"merged now: {names}); unmerging it would corrupt the model."
            )
    wanted = [digest for _, digest in adapters]
    if held[-len(wanted) :] == wanted:
        return []
    labels = {digest: label for label, digest in adapters}
    tail = held[-len(wanted) :]
    if sorted(tail) == sorted(wanted):
        order = " ".join(labels[d] for d in tail)
        raise AdapterError(
            f"the adapters were merged into {merged} in the order {', '.join(labels[d] for d in tail)}; "
            f"list them in that order (bonemerge unmerge {merged} {order} ...), they come off last first."
        )
    raise AdapterError(
        f"the adapters given are not the most recently merged ones of {merged} (merged now, in "
        f"order: {names}); take out the later ones first, or list all of them in merge order."
    )


def operation(
    kind: str,
    adapters: Sequence[dict],
    *,
    command: str | None,
    version: str,
    dtype: str | None = None,
    precision: str | None = None,
    device: str | None = None,
) -> dict:
    """One history entry (the writer adds `created`, the time it was written). Merges and
    unmerges also record what decides their output bits (the maths version, precision, device
    type and torch version), which verify compares."""
    entry: dict = {
        "operation": kind,
        "adapters": list(adapters),
        "command": command,
        "bonemerge": version,
    }
    if dtype is not None:
        entry["dtype"] = dtype
    if precision is not None:
        entry |= {
            "maths": MATHS_VERSION,
            "precision": precision,
            "device": device,
            "torch": torch_version(),
        }
    return entry


def torch_version() -> str:
    """The installed torch's version, from its package metadata where it has some: asking
    torch itself would mean waiting for it to load."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        import torch

        return str(torch.__version__)


def reproducible_by(entry: dict, adapters: Sequence[str], precision: str, device: str) -> bool:
    """True when `entry` is a merge of exactly `adapters` (fingerprints, in order) that this
    installation would compute bit for bit with `precision` on `device`."""
    return (
        entry.get("operation") == "merge"
        and [a.get("fingerprint") for a in entry.get("adapters", [])] == list(adapters)
        and entry.get("maths") == MATHS_VERSION
        and entry.get("precision") == precision
        and entry.get("device") == device
        and entry.get("torch") == torch_version()
    )
