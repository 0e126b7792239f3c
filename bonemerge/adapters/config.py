"""Reading `adapter_config.json` into the few facts the maths depends on.

PEFT stores the variant in `init_weights` (true/false = default, "bat", "mini") and the block
size in `r` (and `mini_r`). Anything else a config says is kept as `raw` for companions and
model cards; anything that would change the maths and is not understood is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bonemerge.checkpoint import read_json
from bonemerge.errors import AdapterError, CheckpointError

METHODS = {"BONE": "bone_block", "MISS": "miss_block"}


@dataclass(frozen=True)
class AdapterConfig:
    """What an adapter's config says about its method, variant and block sizes."""

    method: str
    variant: str
    r: int
    mini_r: int | None
    raw: dict

    @property
    def block_suffix(self) -> str:
        return METHODS[self.method]

    @property
    def base_model(self) -> str | None:
        value = self.raw.get("base_model_name_or_path")
        return value if isinstance(value, str) and value else None

    @property
    def modules_to_save(self) -> tuple[str, ...]:
        value = self.raw.get("modules_to_save") or ()
        return tuple(value) if isinstance(value, list | tuple) else ()

    @property
    def tag(self) -> str:
        """Hub tag for the method: `bone`, `bat` (Bone's Bat variant) or `miss`."""
        if self.method == "BONE":
            return "bat" if self.variant == "bat" else "bone"
        return "miss"

    def describe(self) -> str:
        """`MiSS mini (r=16, mini_r=4)`: how reports and model cards name the adapter kind."""
        name = {"BONE": "Bone", "MISS": "MiSS"}[self.method]
        if self.method == "BONE" and self.variant == "bat":
            name = "Bat"
        elif self.variant != "default":
            name += f" {self.variant}"
        sizes = f"r={self.r}" + (f", mini_r={self.mini_r}" if self.variant == "mini" else "")
        return f"{name} ({sizes})"


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


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

    peft_type = raw.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in METHODS:
        kind = f"is a {peft_type} adapter" if isinstance(peft_type, str) else "is not a PEFT adapter config"
        raise AdapterError(
            f"{path} {kind}; bonemerge works with Bone and MiSS adapters only "
            "(use PEFT's merge_and_unload for other methods)."
        )
    r = raw.get("r", 64)
    if not _positive_int(r):
        raise AdapterError(f"{path} has r={r!r}; r must be a positive integer.")
    init = raw.get("init_weights", True)
    if init is True or init is False:
        variant = "default"
    elif init in ("bat", "mini"):
        variant = init
    else:
        raise AdapterError(
            f"{path} has init_weights={init!r}, which is not a {peft_type} variant "
            '(expected true, false, "bat" or "mini").'
        )
    if variant == "mini" and peft_type == "BONE":
        raise AdapterError(
            f'{path} is a Bone adapter with init_weights "mini", which only MiSS has; '
            "fix peft_type or init_weights."
        )
    mini_r = None
    if variant == "mini":
        mini_r = raw.get("mini_r", 1)
        if not _positive_int(mini_r):
            raise AdapterError(f"{path} has mini_r={mini_r!r}; mini_r must be a positive integer.")
    return AdapterConfig(peft_type, variant, r, mini_r, raw)
