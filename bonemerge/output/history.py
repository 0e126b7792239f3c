"""Merge history: which adapters a model holds, identified by content, so that no command
silently applies an adapter twice, takes out one that was never merged, or unmerges in the
wrong order.

Every output's `bonemerge.json` carries a `history`: the history of its input plus the
operation that made it. Adapters are recorded by a **fingerprint** of what decides their
maths, not by path, so a renamed folder, a Hub round trip or a Bone → MiSS conversion keeps
its identity, while any change of a single byte, a cast or a filter makes a new adapter.

The fingerprint is SHA-256 over a canonical form, read in bounded pieces (adapters for large
models run to gigabytes): a version line, the maths-relevant config (the settings its method
says decide the maths, `About.settings`) as canonical JSON, then for every tensor in name
order (block tensors as their method names them, `Method.record_name`; tensors shared by the
whole adapter once, by part; full tensors by the base tensor they replace) a JSON line
`[kind, name, dtype, shape]` followed by its raw little-endian bytes. The `peft_type`
spelling (BONE/MISS), key suffixes and file layout are left out because they do not change
the maths.

The fingerprint identifies a file, not an update: `lora_alpha` 8 vs 8.0, factors rescaled
(A·2, B/2) or a Bone block converted to LoRA make new bytes for the same ΔW. So merges and
unmerges also record each adapter's **sketch** (`bonemerge.output.sketch`: a few numbers per tensor it
changes, which any representation of the same update reproduces), and the guards take two
records for the same adapter when their fingerprints are equal or their sketches match. A
record without a sketch (histories written before sketches, commands without a base) is
matched by fingerprint alone; exact verification always goes by fingerprint.

Histories are validated when read: a malformed entry is refused in one sentence rather than
skipped, because a skipped merge record would let the guards pass the very double merge they
exist to stop.

Everything here is pure except `fingerprint`, `sketches` (read tensor bytes) and `read_history`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bonemerge.adapters import Adapter
from bonemerge.checkpoint import RangeReader, Source, TensorRef, read_json
from bonemerge.errors import AdapterError, CheckpointError, shown
from bonemerge.methods import shared_tensors
from bonemerge.output import sketch
from bonemerge.output.manifest import MANIFEST

if TYPE_CHECKING:
    from bonemerge.methods import BlockOp
    from bonemerge.output.sketch import Sketch
    from bonemerge.plan.build import Plan

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
        ("block", config.method.record_name(b.module, part), source)
        for b in adapter.blocks
        for part, source in b.own.items()
    ]
    items += [("shared", part, source) for part, source in shared_tensors(adapter.blocks).items()]
    items += [("full", name, source) for name, source in adapter.replacements.items()]
    digest = hashlib.sha256(_FORMAT)
    digest.update(json.dumps(config.summary(), sort_keys=True).encode() + b"\n")
    with RangeReader() as reader:
        for kind, name, source in sorted(items, key=lambda item: (item[1], item[0])):
            digest.update(json.dumps([kind, name, source.dtype, list(source.shape)]).encode() + b"\n")
            _feed(digest, source, reader)
    return digest.hexdigest()


def sketches(plan: Plan, adapters: Sequence[Adapter]) -> list[dict | None]:
    """Each adapter's sketch (as bonemerge.json records it) from the block operations `plan`
    makes with it; None when its method, or the dtype of one of its tensors, has none."""
    found: list[dict | None] = []
    with RangeReader() as reader:
        for adapter in adapters:
            # the plan's blocks are fitted to the base (`Method.fit`): copies sharing the parts
            mine = {id(block.parts) for block in adapter.blocks}
            parts: dict[str, tuple[Sketch, ...] | None] = {}
            for step in plan.steps.values():
                for op in step.ops:
                    if id(op.block.parts) in mine:
                        parts[step.name] = _sketch(op, step.shape, reader)
            complete = parts and all(p is not None for p in parts.values())
            found.append(
                sketch.to_json({n: p for n, p in parts.items() if p is not None}) if complete else None
            )
    return found


def _sketch(op: BlockOp, shape: tuple[int, ...], reader: RangeReader) -> tuple[Sketch, ...] | None:
    """The method's sketch of `op`, its tensors read as numpy arrays (torch may still be loading)."""
    from bonemerge.checkpoint import dtypes

    sources = op.block.parts
    if any(source.dtype not in dtypes.COMPUTABLE for source in sources.values()):
        return None

    def load(part: str):
        source = sources[part]
        if not isinstance(source, TensorRef):
            return source.tensor.double().numpy()
        raw = reader.read(source.path, source.offset, source.nbytes)
        return dtypes.float_values(raw, source.dtype).reshape(source.shape)

    return op.block.method.sketch(op, load, shape)


def record(adapter: Adapter, digest: str, sketched: dict | None = None) -> dict:
    """How an operation lists an adapter: fingerprint, the name it had, its kind and, for merges
    and unmerges, the sketch of its update."""
    found = {"fingerprint": digest, "name": adapter.label, "kind": adapter.config.describe()}
    return found if sketched is None else found | {"sketch": sketched}


def same_update(a: dict, b: dict) -> bool:
    """Two records name the same update: equal fingerprints, or matching sketches."""
    if a["fingerprint"] == b["fingerprint"]:
        return True
    first, second = sketch.from_json(a.get("sketch")), sketch.from_json(b.get("sketch"))
    return first is not None and second is not None and sketch.same_update(first, second)


def _shared(a: dict, b: dict) -> list[str]:
    """The tensors two records' sketches change the same way."""
    first, second = sketch.from_json(a.get("sketch")), sketch.from_json(b.get("sketch"))
    return [] if first is None or second is None else sketch.shared(first, second)


def short(digest: str) -> str:
    """The first 12 hex digits, as reports show a fingerprint."""
    return digest[:12]


def read_history(folder: Path | None) -> list[dict] | None:
    """The history in `folder/bonemerge.json`, or None when there is none to read (no manifest,
    or one written before histories were recorded): the model's lineage is then unknown. A
    malformed history is refused in one sentence (see the module docstring)."""
    if folder is None or not (folder / MANIFEST).is_file():
        return None
    path = folder / MANIFEST
    history = read_json(path).get("history")
    if history is None:
        return None
    problem = _malformed(history)
    if problem:
        raise CheckpointError(f"{path} holds a malformed history; fix or remove the file ({problem}).")
    return history


def _malformed(history: object) -> str | None:
    """What is wrong with a history, in a few words, or None."""
    if not isinstance(history, list):
        return "it is not a list"
    for number, op in enumerate(history, start=1):
        where = f"entry {number}"
        if not isinstance(op, dict):
            return f"{where} is not an object"
        if not isinstance(op.get("operation"), str):
            return f"{where} has no operation"
        for key in ("command", "created", "bonemerge"):
            if op.get(key) is not None and not isinstance(op[key], str):
                return f"{where} has a {key} that is not a string"
        adapters = op.get("adapters", [])
        if not isinstance(adapters, list):
            return f"{where} has adapters that are not a list"
        for count, adapter in enumerate(adapters, start=1):
            problem = _bad_record(adapter)
            if problem:
                return f"{where}, adapter {count} {problem}"
    return None


def _bad_record(adapter: object) -> str | None:
    if not isinstance(adapter, dict):
        return "is not an object"
    for key in ("fingerprint", "name"):
        if not isinstance(adapter.get(key), str):
            return f"has no {key} string"
    if adapter.get("kind") is not None and not isinstance(adapter["kind"], str):
        return "has a kind that is not a string"
    try:
        sketch.from_json(adapter.get("sketch"))
    except ValueError as error:
        return str(error)
    return None


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
                found = [i for i, a in enumerate(stack) if same_update(a, adapter)]
                if found:
                    del stack[found[-1]]
    return stack


def _name(entry: dict) -> str:
    """A recorded adapter's name as messages show it (a hostile history can make it long)."""
    return shown(entry["name"], quote=False)


def _how(entry: dict) -> str:
    command = entry.get("command")
    when = shown(entry.get("merged") or "an unrecorded time", quote=False)
    return f"on {when} by {f'`{shown(command, 300, quote=False)}`' if command else 'the Python API'}"


def check_merge(
    history: Sequence[dict] | None,
    adapters: Sequence[tuple[str, dict]],
    base: str,
    allow_remerge: bool,
) -> list[str]:
    """Refuse to merge an adapter (`(label, record)`) whose update `base` already holds, in whole
    or in part (a filtered copy shares some tensors' updates), or the same update twice in one
    command, unless `allow_remerge`; then return notes saying so, for the report and the card."""
    held = merged_now(history or [])
    given: list[tuple[str, dict]] = []
    notes = []
    for label, adapter in adapters:
        found = _conflict(label, adapter, held, given, base)
        if found is not None:
            refusal, note = found
            if not allow_remerge:
                raise AdapterError(f"{refusal}, pass --allow-remerge if that is really wanted.")
            notes.append(f"{note} (--allow-remerge)")
        given.append((label, adapter))
    return notes


def _conflict(
    label: str, adapter: dict, held: Sequence[dict], given: Sequence[tuple[str, dict]], base: str
) -> tuple[str, str] | None:
    """Why merging `adapter` would apply an update twice (a refusal and a note), or None."""
    entry = next((e for e in reversed(held) if same_update(e, adapter)), None)
    if entry is not None:
        return (
            f"{label} is already merged into {base}: its bonemerge.json records it (as {_name(entry)}) "
            f"merged {_how(entry)}; merging it again would apply it twice",
            f"{label} was already merged into {base} and is merged again",
        )
    for other, done in given:
        if same_update(done, adapter):
            if done["fingerprint"] == adapter["fingerprint"]:
                return (
                    f"{label} is given twice; merging it twice applies it twice",
                    f"{label} is merged twice",
                )
            return (
                f"{label} and {other} are the same update; merging both applies it twice",
                f"{label} and {other}, the same update, are both merged",
            )
    earlier = [(e, _name(e), f"already merged into {base} {_how(e)}") for e in reversed(held)]
    earlier += [(done, other, "given before it") for other, done in given]
    for previous, name, where in earlier:
        common = _shared(previous, adapter)
        if common:
            more = ", …" if len(common) > 1 else ""
            what = f"{len(common)} tensor{'s' if len(common) != 1 else ''} ({common[0]}{more})"
            return (
                f"{label} changes {what} the same way as {name}, {where}; merging it would apply "
                "those updates twice",
                f"{label} changes {what} the same way as {name} and is merged anyway",
            )
    return None


def check_unmerge(
    history: Sequence[dict] | None, adapters: Sequence[tuple[str, dict]], merged: str
) -> list[str]:
    """Check that `adapters` (`(label, record)`, in merge order) are the most recently merged
    adapters of `merged`, in that order; a wrong order is refused, never reordered, so that the
    command line always states exactly what happens. Returns notes for the report."""
    if history is None:
        return [
            f"{merged} has no bonemerge history (it was merged by another tool), so whether these "
            "adapters were merged into it, and in which order, could not be checked"
        ]
    stack = merged_now(history)
    names = ", ".join(_name(entry) for entry in stack) or "none"
    for label, adapter in adapters:
        if not any(same_update(entry, adapter) for entry in stack):
            raise AdapterError(
                f"{label} was never merged into {merged} according to its bonemerge.json (adapters "
                f"merged now: {names}); unmerging it would corrupt the model."
            )
    tail = stack[-len(adapters) :]
    if len(tail) == len(adapters) and all(
        same_update(entry, adapter) for entry, (_, adapter) in zip(tail, adapters, strict=True)
    ):
        return []
    order = _order(tail, adapters)
    if order is not None:
        raise AdapterError(
            f"the adapters were merged into {merged} in the order {', '.join(order)}; "
            f"list them in that order (bonemerge unmerge {merged} {' '.join(order)} ...), "
            "they come off last first."
        )
    raise AdapterError(
        f"the adapters given are not the most recently merged ones of {merged} (merged now, in "
        f"order: {names}); take out the later ones first, or list all of them in merge order."
    )


def _order(tail: Sequence[dict], adapters: Sequence[tuple[str, dict]]) -> list[str] | None:
    """The labels of `adapters` in the order of `tail`, when they are its adapters in another order."""
    left = list(adapters)
    order = []
    for entry in tail:
        found = next((i for i, (_, adapter) in enumerate(left) if same_update(entry, adapter)), None)
        if found is None:
            return None
        order.append(left.pop(found)[0])
    return order if not left else None


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


def reproducible_by(
    entry: dict, adapters: Sequence[str], precision: str, device: str, dtype: str | None = None
) -> bool:
    """True when `entry` is a merge of exactly `adapters` (fingerprints, in order) into `dtype`
    (as the entry names it, when it records one) that this installation would compute bit for
    bit with `precision` on `device`."""
    return (
        entry.get("operation") == "merge"
        and (dtype is None or entry.get("dtype") in (None, dtype))
        and [a.get("fingerprint") for a in entry.get("adapters", [])] == list(adapters)
        and entry.get("maths") == MATHS_VERSION
        and entry.get("precision") == precision
        and entry.get("device") == device
        and entry.get("torch") == torch_version()
    )
