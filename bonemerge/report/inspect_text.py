"""`bonemerge inspect` as a readable report: labelled lines, sizes with units, long lists of
tensor names grouped by layer (`model.layers.{0-31}.self_attn.q_proj.weight`) and cut after
a few items. `--json` prints the description itself; this is only its text form."""

from __future__ import annotations

from bonemerge.output.history import short
from bonemerge.report.inspect import group_names
from bonemerge.units import format_count, format_size

_WIDTH = 16
_SHOWN = 10


def _line(label: str, value: object) -> str:
    return f"  {label:<{_WIDTH - 1}} {value}"


def _list(label: str, items: list[str]) -> list[str]:
    """`label` then one item per line, at most `_SHOWN` of them."""
    shown = [*items[:_SHOWN]] + ([f"… and {len(items) - _SHOWN} more"] if len(items) > _SHOWN else [])
    return [_line(label if i == 0 else "", item) for i, item in enumerate(shown)]


def _dtypes(sizes: dict[str, int]) -> str:
    return ", ".join(f"{dtype} {format_size(size)}" for dtype, size in sizes.items())


def _adapter(info: dict) -> list[str]:
    lines = [
        _line("adapter", f"{info['adapter']}, peft_type {info['method']}"),
        _line("base model", info.get("base_model") or "not named in its config"),
        _line(
            "blocks",
            f"{info['blocks']} blocks, {format_count(info['parameters'])} parameters"
            + (f", {format_size(info['bytes'])} on disk" if "bytes" in info else ""),
        ),
        _line("dtypes", _dtypes(info["dtypes"])),
    ]
    width = max(len(leaf) for leaf in info["modules"])
    modules = [
        f"{leaf:<{width}}  {entry['count']} block{'s' if entry['count'] != 1 else ''}"
        + (f", layers {entry['layers']}" if entry["layers"] else "")
        for leaf, entry in info["modules"].items()
    ]
    lines += _list("modules", modules)
    if info.get("full_tensors"):
        lines += _list("full tensors", info["full_tensors"])
    if info.get("modules_to_save"):
        lines.append(_line("modules_to_save", ", ".join(info["modules_to_save"])))
    return lines


def _checkpoint(info: dict) -> list[str]:
    lines = [
        _line("tensors", f"{info['tensors']} tensors, {format_count(info['parameters'])} parameters"),
        _line("dtypes", _dtypes(info["dtypes"])),
    ]
    lines += _list("experts", info.get("experts") or [])
    files = info["files"]
    lines += _list(
        "files",
        [f"{len(files)} file{'s' if len(files) != 1 else ''}, {format_size(info['bytes'])}"]
        + [f"{f['name']}  {format_size(f['bytes'])}" for f in files],
    )
    quantization = info.get("quantization")
    if quantization and "refused" in quantization:
        lines.append(_line("quantized", quantization["refused"]))
    elif quantization:
        formats = ", ".join(f"{count} weights in {name}" for name, count in quantization["formats"].items())
        lines.append(_line("quantized", formats))
        lines.append(_line("", f"{format_size(quantization['dequantized_bf16_bytes'])} dequantized to bf16"))
    return lines


def _history(info: dict) -> list[str]:
    manifest = info.get("made_by_bonemerge")
    if not manifest:
        return []
    lines = [_line("made by", f"bonemerge {manifest.get('bonemerge')}, {manifest.get('created')}")]
    if manifest.get("command"):
        lines.append(_line("command", manifest["command"]))
    entries = []
    for number, op in enumerate(manifest.get("history") or [], start=1):
        adapters = ", ".join(
            f"{a.get('name')} ({a.get('kind')}, {short(str(a.get('fingerprint')))})"
            for a in op.get("adapters", [])
        )
        entries.append(f"{number}. {op.get('created')}  {op.get('operation'):<8} {adapters or '-'}")
    lines += _list("history", entries)
    if manifest.get("history_error"):
        lines.append(_line("history", f"unreadable: {manifest['history_error']}"))
    merged = info.get("adapters_merged_now")
    if merged is not None:
        lines.append(_line("adapters merged now:", ", ".join(merged) or "none"))
    return lines


def _against(against: dict) -> list[str]:
    head = f"against base {against['base']}: " + ("fits" if against["ok"] else "does not fit")
    if not against["ok"]:
        return [head, _line("mismatch:", against["mismatch"])]
    lines = [head]
    lines += _list("touches", [f"{len(against['touched'])} tensors", *group_names(against["touched"])])
    if against["replaced"]:
        lines += _list("replaces", group_names(against["replaced"]))
    lines.append(_line("merged weights", format_size(against["output_weight_bytes"])))
    lines += _list("notes", against["notes"])
    return lines


def render_inspection(info: dict) -> list[str]:
    """The lines `bonemerge inspect` prints for the description `info`."""
    kind = info["kind"]
    shown = {"adapter": "PEFT adapter", "peft-checkpoint": "full PEFT training checkpoint"}.get(kind, kind)
    lines = [
        info["path"],
        _line("kind", shown + (f" ({info['architecture']})" if info.get("architecture") else "")),
    ]
    if kind == "adapter":
        lines += _adapter(info)
    else:
        lines += _checkpoint(info)
    if kind == "peft-checkpoint":
        lines.append(_line("base tensors", info["base_tensors"]))
        for name, adapter in info["adapters"].items():
            lines.append(f"adapter {name}")
            lines += _adapter(adapter)
    lines += _history(info)
    if "against_base" in info:
        lines += _against(info["against_base"])
    return lines
