"""Deciding, for a plan, which weights are decoded and encoded by a codec, and what happens to
their companion tensors: the storage axis of a plan (the method axis is the steps' ops).

- Kept format (no `--dtype`): untouched quantized weights and their scales are copied as
  they are; a touched weight is decoded, merged and encoded on its stored scales, and its
  companions are written after it from what encoding left (`Derived`).
- `--dtype`: every quantized weight is decoded into that dtype, touched or not, and its
  companions and the config's `quantization_config` are dropped; the codec says under which
  name and layout the dense weight is written (`Codec.dequantized`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from bonemerge.checkpoint import Checkpoint
from bonemerge.codecs import Derived, Stored, find_stored
from bonemerge.errors import AdapterError

if TYPE_CHECKING:
    from bonemerge.plan.build import Step

# A config update that removes the key (see `companions.updated_config`).
REMOVE = None


def plan_storage(
    steps: dict[str, Step], base: Checkpoint, dtype: str | None, operation: str, allow_lossy: bool
) -> tuple[dict[str, Step], dict[str, Any], list[str]]:
    """`steps` with codecs assigned, the config updates this needs, and notes for the report."""
    found = find_stored(base)
    if not found:
        return steps, {}, []
    kinds = sorted({s.codec.describe(s) for s in found.values()})
    if dtype is not None:
        note = (
            f"dequantized {len(found)} {' and '.join(kinds)} weights to {dtype}; their scales and "
            "the config's quantization_config were dropped"
        )
        return _dequantized(steps, found, dtype), {"quantization_config": REMOVE}, [note]
    read_only = {name: s for name, s in found.items() if not s.codec.encodes}
    if read_only:
        # formats bonemerge reads but does not write: dense in the dtype they were quantized from
        steps = _dequantized(steps, read_only, None)
        found = {name: s for name, s in found.items() if name not in read_only}
        written = sorted({s.codec.dense_dtype(s) for s in read_only.values()})
        read_kinds = sorted({s.codec.describe(s) for s in read_only.values()})
        note = (
            f"dequantized {len(read_only)} {' and '.join(read_kinds)} weights to {' and '.join(written)}, "
            "the dtype they were quantized from (bonemerge does not write this format; quantize the "
            "output again if you need it); their scales and the config's quantization_config were dropped"
        )
        if not found:
            return steps, {"quantization_config": REMOVE}, [note]
        kinds = sorted({s.codec.describe(s) for s in found.values()})
    done = dict(steps)
    touched = [s for name, s in found.items() if name in steps and steps[name].ops]
    if operation == "unmerge" and touched and not allow_lossy:
        raise AdapterError(
            f"{touched[0].name} and {len(touched) - 1} more weights of {base.root} are {kinds[0]}: "
            "unmerging re-rounds their codes, which brings the original codes back only where the "
            "rounding happens to land on them; pass --allow-lossy to accept that."
        )
    for stored in touched:
        step = steps[stored.name]
        if step.source is not stored.weight:
            raise AdapterError(
                f"{stored.name} of {base.root} is {stored.codec.describe(stored)}, and an adapter replaces "
                "it with a saved full tensor; pass --dtype bf16 to write a dequantized model instead."
            )
        coded = replace(step, decode=stored, encode=stored)
        done[stored.name] = coded
        for role, companion in stored.names.items():
            derived = Derived(coded, role, stored.companions[role], companion)
            done[companion] = replace(steps[companion], source=derived)
    note = (
        f"kept {' and '.join(kinds)}: {len(touched)} merged weights re-encoded on their stored scales, "
        f"{len(found) - len(touched)} quantized weights copied as they are"
    )
    return done, {}, [note]


def _dequantized(steps: dict[str, Step], found: dict[str, Stored], dtype: str | None) -> dict[str, Step]:
    """`steps` with every weight in `found` decoded to `dtype` (None: the codec's dense dtype)
    and its companion tensors dropped."""
    done = dict(steps)
    renamed = {}
    for name, stored in found.items():
        step = steps.get(name)
        if step is not None and step.source is stored.weight:
            done[name] = stored.codec.dequantized(step, stored, dtype or stored.codec.dense_dtype(stored))
            renamed[name] = done[name].name
        for companion in stored.names.values():
            done.pop(companion, None)
    # a codec may write the dense weight under the module's own name (MXFP4's `X_blocks` as `X`)
    return {renamed.get(name, name): step for name, step in done.items()}
