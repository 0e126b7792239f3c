"""Reading `adapter_config.json` into an `AdapterConfig` through the method registry.

The config's `peft_type` picks the method; the method parses what its maths depends on.
Anything else a config says is kept as `raw` for companions and model cards; anything that
would change the maths and is not understood is an error.
"""

from __future__ import annotations

from pathlib import Path

from bonemerge.checkpoint import read_json
from bonemerge.errors import AdapterError, CheckpointError, shown
from bonemerge.methods import AdapterConfig, method_for, supported

__all__ = ["AdapterConfig", "read_adapter_config"]


def read_adapter_config(folder: Path) -> AdapterConfig:
    """Parse and check `folder/adapter_config.json`; one clear sentence for anything off."""
    path = folder / "adapter_config.json"
    if not path.is_file():
        nested = sorted(p.parent.name for p in folder.glob("*/adapter_config.json"))
        if nested:
            raise AdapterError(
                f"{folder} has no adapter_config.json but holds the adapters "
                f"{', '.join(nested)} in sub-folders; pass one of them, e.g. {folder / nested[0]}."
            )
        raise AdapterError(
            f"{folder} has no adapter_config.json; pass the folder that PEFT's save_pretrained wrote."
        )
    try:
        raw = read_json(path)
    except CheckpointError as exc:
        raise AdapterError(str(exc)) from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{path} does not hold a JSON object; it is not a PEFT adapter config.")
    peft_type = raw.get("peft_type")
    method = method_for(peft_type) if isinstance(peft_type, str) else None
    if method is None:
        kind = "is not a PEFT adapter config"
        if isinstance(peft_type, str):
            kind = f"is a {shown(peft_type, quote=False)} adapter"
        raise AdapterError(
            f"{path} {kind}; bonemerge works with {supported()} adapters only "
            "(use PEFT's merge_and_unload for other methods)."
        )
    _check_shared_fields(raw, path)
    return AdapterConfig(method, peft_type, method.read_config(peft_type, raw, path), raw)


# Fields every method has that no other check reads, with the JSON values PEFT accepts
# (`scope` checks the ones that place the adapter): anything else would fail in PEFT, and in
# bonemerge's reports.
_SHARED_FIELDS = {
    "modules_to_save": (
        lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
        "a list of module names",
    ),
    "revision": (lambda v: isinstance(v, str), "a Hub revision name"),
}


def _check_shared_fields(raw: dict, path: Path) -> None:
    """Refuse a shared field of the wrong JSON type in one sentence (null means unset)."""
    for key, (valid, expected) in _SHARED_FIELDS.items():
        value = raw.get(key)
        if value is not None and not valid(value):
            raise AdapterError(f"{path} has {key}={shown(value)}; it must be {expected} (or null).")
