"""What re-encoding did to a run's quantized weights, for the summary, `--json` and the card.

A LoRA update smaller than half a code step vanishes under rounding to nearest, so for every
weight written in a quantized format the run states how much of its update survived,
ρ = ⟨deq(W′) − deq(W), ΔW⟩ / ‖ΔW‖² (1: all of it; 0: none), names the worst modules, warns
about those that kept less than half, and says which blocks needed a new scale.
"""

from __future__ import annotations

from collections.abc import Mapping

from bonemerge.codecs.base import Encoded, Rounding
from bonemerge.codecs.mxfp4 import BLOCKS

WARN_BELOW = 0.5
WORST = 5


def _module(name: str) -> str:
    """The module a weight belongs to; for MXFP4's `X_blocks`, the parameter `X` (a module of
    experts holds two)."""
    return name.removesuffix(BLOCKS) if name.endswith(BLOCKS) else name.rsplit(".", 1)[0]


def summarize(
    encoded: Mapping[str, Encoded], rounding: Rounding, offer_stochastic: bool = True
) -> tuple[list[str], dict | None]:
    """Notes for the report and card, and the `quantized` section of `--json` (None when no
    weight was encoded); `offer_stochastic` when the command has `--rounding`."""
    if not encoded:
        return [], None
    survival = {_module(n): e.survival for n, e in encoded.items() if e.survival is not None}
    rescaled = {_module(n): [list(b) for b in sorted(e.rescaled)] for n, e in encoded.items() if e.rescaled}
    how = "to nearest" if rounding.mode == "nearest" else f"stochastically (seed {rounding.seed})"
    notes = []
    if survival:
        worst = sorted(survival.items(), key=lambda item: item[1])
        shown = ", ".join(f"{module} {rho:.3f}" for module, rho in worst[:WORST])
        notes.append(
            f"share of each update kept in the quantized codes (ρ, 1 = all), rounded {how}: "
            f"lowest {shown}; mean {sum(survival.values()) / len(survival):.3f} over {len(survival)} modules"
        )
        weak = [module for module, rho in worst if rho < WARN_BELOW]
        if weak:
            offer = offer_stochastic and rounding.mode == "nearest"
            hint = " (--rounding stochastic keeps it unbiased)" if offer else ""
            notes.append(
                f"warning: {len(weak)} module(s) kept less than half of their update, being smaller than "
                f"the code steps: {', '.join(weak[:WORST])}{' …' if len(weak) > WORST else ''}{hint}"
            )
    if rescaled:
        listed = [f"{module} {tuple(block)}" for module, found in rescaled.items() for block in found]
        notes.append(
            f"{len(listed)} block(s) in {len(rescaled)} module(s) overflowed the format once merged and got "
            f"a new scale, amax / max code (module (row block, column block)): {', '.join(listed[:WORST])}"
            + (" …; --json lists them all" if len(listed) > WORST else "")
        )
    section = {
        "rounding": rounding.mode,
        "seed": rounding.seed if rounding.mode == "stochastic" else None,
        "survival": dict(sorted(survival.items())),
        "rescaled_blocks": rescaled,
    }
    return notes, section
